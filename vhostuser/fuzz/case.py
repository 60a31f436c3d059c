"""A fuzz case as plain data, and what running it gave.

A case is a ring/feature setup plus a list of actions (dicts with an "op"),
so it serialises to JSON as is, shrinks by dropping or simplifying actions,
and replays byte for byte. Ops:

``msg``     a raw vhost-user message: request, flags, payload (hex, or a
            template the executor fills in, see :mod:`.execute`), ``size``
            (a lie about the payload length, or None), ``fds`` (kinds of fd
            to attach: "eventfd", "memfd:SIZE", "socket").
``poke``    write ``data`` (hex) at guest-physical ``gpa``.
``desc``    write a raw descriptor into the fuzzed queue's table: ``slot``,
            ``addr``, ``len``, ``flags``, ``next`` (split) / ``id`` (packed).
``avail``   split: put ``heads`` in the avail ring and move avail->idx by
            ``advance`` (default len(heads)).
``chain``   a chain added through the driver's bookkeeping (well-formed
            ring, content up to the generator): ``buffers`` of [gpa, len,
            writable]; the ring stays usable for a probe without restart.
``kick``    notify the fuzzed queue.
"""
from __future__ import annotations

import copy
import enum
import json
from dataclasses import asdict, dataclass, field

from ..protocol import ProtocolFeature

FORMAT_VERSION = 1

KINDS = ("messages", "memory", "ring", "request", "frame", "unnegotiated")
STAGES = ("connect", "negotiated", "memory", "queues")


class Verdict(enum.Enum):
    PASS = "PASS"        # the malformed input was answered; the device still serves
    REJECT = "REJECT"    # refused (no answer, NACK, closed, queue broken); still serves
    WEDGED = "WEDGED"    # stopped serving though the socket is there
    CRASHED = "CRASHED"  # process died or the socket no longer accepts
    TIMEOUT = "TIMEOUT"  # the front-end gave up waiting outside the oracle's probes

    @property
    def failing(self) -> bool:
        return self in (Verdict.WEDGED, Verdict.CRASHED, Verdict.TIMEOUT)


@dataclass
class Setup:
    """How the case's connection is brought up before its actions run."""
    stage: str = "queues"          # how far the well-formed bring-up goes
    packed: bool = False
    indirect: bool = False
    event_idx: bool = False
    queue_size: int = 16
    # Protocol features (ProtocolFeature names) the front-end does not
    # negotiate, so the case can send their requests without them.
    withhold: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}")
        unknown = [n for n in self.withhold if n not in ProtocolFeature.__members__]
        if unknown:
            raise ValueError(f"unknown protocol features {unknown}")


@dataclass
class Case:
    profile: str
    kind: str
    setup: Setup = field(default_factory=Setup)
    actions: list[dict] = field(default_factory=list)
    seed: int | None = None
    index: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Case":
        data = dict(data)
        data["setup"] = Setup(**data.get("setup", {}))
        return cls(**data)

    def copy(self) -> "Case":
        return copy.deepcopy(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


@dataclass
class Outcome:
    """A verdict and the evidence for it."""
    verdict: Verdict
    detail: str = ""
    answered: bool = False          # the malformed input got a used element / reply
    closed: bool = False            # the back-end closed the case's connection
    error_signalled: bool = False   # the fuzzed queue's error eventfd fired
    recovery: str = "none"          # none | restart | reset | reconnect | failed
    reset_clears: bool | None = None  # for WEDGED: did a device reset bring it back
    # Triage, filled in when the back-end is a process we run (--spawn):
    exit_status: str | None = None    # "signal 11 (SIGSEGV)", "exit 1"; None: alive
    log_tail: list[str] = field(default_factory=list)   # its last output lines
    backtrace: list[str] = field(default_factory=list)  # from its core (--core-dumps)
    signature: str = ""               # what makes two failures the same bug
    # What the front-end saw, as behaviour features for feedback mode
    # (see feedback.py); not written to reproducers.
    events: list[str] = field(default_factory=list, repr=False, compare=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        del d["events"]
        return d

    @classmethod
    def from_json(cls, data: dict) -> "Outcome":
        data = dict(data)
        data["verdict"] = Verdict(data["verdict"])
        return cls(**data)
