"""Issue 14 (point 3) as the fuzzer sees it: requests sent without the
protocol feature they belong to, and header flags with reserved bits set.
A refusal (non-zero REPLY_ACK, or a disconnect) is correct behaviour and
never a failing verdict; an acceptance is counted, not judged."""
import random
import sys

import pytest

from vhostuser.fuzz import generate, profiles
from vhostuser.fuzz.case import Case, Setup, Verdict
from vhostuser.fuzz.execute import protocol_features_for
from vhostuser.fuzz.oracle import Target, run_case
from vhostuser.fuzz.runner import case_for
from vhostuser.fuzz.source import RandomSource
from vhostuser.fuzz.spawn import Spawner
from vhostuser.protocol import ProtocolFeature, Request, bit

NEED_REPLY, VERSION = 1 << 3, 1


def test_generator_withholds_the_feature_of_each_request():
    seen_requests, reserved = set(), 0
    for i in range(3000):
        src = RandomSource(random.Random(i))
        withhold, actions = generate.unnegotiated(src)
        for a in actions:
            if a["flags"] & ~0xf:
                reserved += 1
            else:
                needs = generate.NEEDS_PROTOCOL_FEATURE[a["request"]]
                assert needs in withhold
                seen_requests.add(a["request"])
    assert seen_requests == set(generate.NEEDS_PROTOCOL_FEATURE)
    assert reserved > 100


def test_withheld_features_are_not_negotiated():
    got = protocol_features_for(Setup(withhold=["STATUS", "CONFIG"]))
    assert not got & (bit(ProtocolFeature.STATUS) | bit(ProtocolFeature.CONFIG))
    assert got & bit(ProtocolFeature.REPLY_ACK)
    with pytest.raises(ValueError):
        Setup(withhold=["NO_SUCH_FEATURE"])


def test_campaigns_generate_the_kind():
    kinds = [case_for("blk", 5, i, allow_packed=True).kind for i in range(400)]
    assert kinds.count("unnegotiated") > 5


@pytest.fixture(scope="module")
def blk():
    import tempfile
    d = tempfile.mkdtemp()
    sp = Spawner(f"{sys.executable} -m vhostuser.cli.blk --socket-path {{socket}} --ramdisk 8M "
                 f"--num-queues 2", f"{d}/blk.sock")
    sp.start()
    yield Target(sp.socket_path, profiles.get("blk"), timeout=2.0, alive=sp.alive)
    sp.stop()


def without(request: Request, flags: int) -> Case:
    feature = generate.NEEDS_PROTOCOL_FEATURE[request]
    payload, fds = generate._well_formed(request)
    return Case("blk", "unnegotiated", Setup(withhold=[feature]),
                [{"op": "msg", "request": int(request), "flags": flags, "payload": payload,
                  "size": None, "fds": fds}])


@pytest.mark.parametrize("flags,how", [(VERSION | NEED_REPLY, "a non-zero ack"),
                                       (VERSION, "a disconnect")])
def test_a_refusal_is_not_a_failure(blk, flags, how):
    # Our back-end never offers LOG_SHMFD, so it refuses SET_LOG_BASE (the
    # way depends on NEED_REPLY).
    out = run_case(blk, without(Request.SET_LOG_BASE, flags))
    assert "refused-without:LOG_SHMFD:SET_LOG_BASE" in out.events, (how, out.events)
    assert out.verdict in (Verdict.PASS, Verdict.REJECT), out
    if flags == VERSION:
        assert out.closed


def test_reserved_flag_bits_are_fuzzed_and_judged(blk):
    case = Case("blk", "unnegotiated", Setup(), [
        {"op": "msg", "request": int(Request.GET_FEATURES), "flags": VERSION | 1 << 16,
         "payload": "", "size": None, "fds": []}])
    out = run_case(blk, case)
    assert any(e.endswith("-without:reserved-flags:GET_FEATURES/rsv") for e in out.events)
    assert not out.verdict.failing, out


@pytest.mark.parametrize("request_", sorted(generate.NEEDS_PROTOCOL_FEATURE), ids=lambda r: r.name)
def test_our_backend_refuses_requests_without_their_feature(blk, request_):
    out = run_case(blk, without(request_, VERSION | NEED_REPLY))
    feature = generate.NEEDS_PROTOCOL_FEATURE[request_]
    assert f"refused-without:{feature}:{request_.name}" in out.events, out.events
