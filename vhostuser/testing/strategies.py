"""Hypothesis strategies for fuzzing vhost-user back-ends from pytest.

Each strategy draws plain data (JSON-able dicts and :class:`Case` objects)
from the same generators ``vhostuser-fuzz`` uses, so a failing example can
be run against any socket with :func:`vhostuser.fuzz.oracle.run_case`, or
saved as a reproducer file. Usage::

    from hypothesis import given
    from vhostuser.testing import strategies as vst

    @given(vst.cases("blk"))
    def test_never_wedges(case):
        assert not run_case(target, case).verdict.failing
"""
from __future__ import annotations

try:
    from hypothesis import strategies as st
except ImportError as exc:          # the extra, named, instead of a bare import error
    raise ImportError("vhostuser.testing.strategies needs hypothesis: "
                      "pip install 'vhostuser[testing]'") from exc

from ..fuzz import generate
from ..fuzz.case import KINDS, Case, Setup
from ..fuzz.source import HypothesisSource

__all__ = ["blk_requests", "cases", "memory_tables", "message", "messages", "net_frames",
           "ring_states", "setups"]


@st.composite
def message(draw) -> dict:
    """One vhost-user message action: any request, flags, payload shaped for
    the request (often mutated), size lies, fd counts."""
    return generate.message(HypothesisSource(draw))


@st.composite
def messages(draw, max_messages: int = 6) -> list[dict]:
    """A sequence of message actions (order and count vary)."""
    return generate.messages(HypothesisSource(draw), max_messages)


@st.composite
def memory_tables(draw, max_regions: int = 9) -> tuple[bytes, list[str]]:
    """(SET_MEM_TABLE payload, fd kinds): overlapping, tiny, unaligned,
    huge regions, holes, fd counts that do not match the region count."""
    return generate.memory_table(HypothesisSource(draw), max_regions)


@st.composite
def setups(draw, allow_packed: bool = True) -> Setup:
    return generate.setup(HypothesisSource(draw), allow_packed=allow_packed)


@st.composite
def ring_states(draw, packed: bool | None = None, blk: bool = False) -> tuple[Setup, list[dict]]:
    """(setup, actions) writing a raw split or packed ring: descriptor
    chains valid and invalid (loops, out-of-range indices and addresses,
    huge and zero lengths, wrong direction, indirect and nested indirect),
    avail index jumps."""
    src = HypothesisSource(draw)
    s = generate.setup(src, allow_packed=packed is not False)
    if packed is not None:
        s.packed = packed
    return s, generate.ring_actions(src, s, blk=blk)


@st.composite
def blk_requests(draw) -> list[dict]:
    """Actions adding one virtio-blk request through a well-formed ring."""
    return generate.blk_request(HypothesisSource(draw))


@st.composite
def net_frames(draw) -> list[dict]:
    """Actions adding one transmit chain: virtio-net header and frame."""
    return generate.net_frame(HypothesisSource(draw))


@st.composite
def cases(draw, profile: str = "blk", kinds: tuple[str, ...] | None = None,
          allow_packed: bool = True) -> Case:
    """Whole fuzz cases for a profile ("blk", "net", "echo")."""
    if kinds and not set(kinds) <= set(KINDS):
        raise ValueError(f"unknown kinds {kinds}")
    return generate.case(HypothesisSource(draw), profile, allow_packed=allow_packed, kinds=kinds)
