"""Issue 20, point 1: a packed queue the oracle restarts at GET_VRING_BASE's
index must look as a real driver leaves it, or the probe's own ring wrap
reads an untouched slot as used and the oracle reports a false WEDGED."""
import os
import struct

import pytest

from vhostuser.frontend import GuestMemory, PackedRing, RingProtocolError
from vhostuser.fuzz import profiles
from vhostuser.fuzz.case import Case, Setup, Verdict
from vhostuser.fuzz.oracle import Target, run_case
from vhostuser.fuzz.runner import Spawner
from vhostuser.protocol import pack_packed_vring_base

AVAIL, USED = 1 << 7, 1 << 15
DESC = struct.Struct("<QIHH")

# Issue 20's minimal case: packed ring of 4, one descriptor at slot 0
# (len 16, AVAIL|WRITE), a kick. The back-end consumes it, so the oracle
# restarts the queue at slot 1 and its 3-descriptor probe wraps the ring.
MINIMAL = Case("blk", "ring", Setup(packed=True, queue_size=4), [
    {"op": "desc", "slot": 0, "addr": 0x80000, "len": 16, "flags": 0x82, "id": 0},
    {"op": "kick"}])


@pytest.fixture
def mem():
    with GuestMemory([(0, 1 << 20)]) as m:
        yield m


def device_completes(mem, ring, slot, wrap, ident):
    """What a device writes to mark the chain at ``slot`` used under ``wrap``."""
    mem.write(ring.desc_gpa + 16 * slot,
              DESC.pack(0, 0, ident, AVAIL | USED if wrap else 0))


@pytest.mark.parametrize("slot,wrap", [(1, True), (3, True), (1, False), (0, False)])
def test_resumed_ring_wraps_without_phantom_used_slots(mem, slot, wrap):
    ring = PackedRing(mem, 4, base=pack_packed_vring_base(slot, wrap))
    ident = ring.add([(0x80000, 16), (0x80100, 512, True), (0x80300, 1, True)])
    ring.publish()
    # The chain is available to a device at (slot, wrap), and nothing else is.
    flags = DESC.unpack(mem.read(ring.desc_gpa + 16 * slot, 16))[3]
    assert bool(flags & AVAIL) == wrap and bool(flags & USED) != wrap
    assert ring.collect() == []
    device_completes(mem, ring, slot, wrap, ident)
    assert [u.id for u in ring.collect()] == [ident]
    # The driver's used position wrapped past the end onto slots it never
    # wrote in this lap: they must not read as used (this raised
    # RingProtocolError "names id 0, which is not in flight" before the fix).
    assert ring.collect() == []
    ring.add([(0x80000, 16)])
    ring.publish()
    assert ring.collect() == []


def test_fresh_ring_is_still_all_zero(mem):
    ring = PackedRing(mem, 8)
    assert mem.read(ring.desc_gpa, 16 * 8) == bytes(16 * 8)


def test_minimal_case_is_not_wedged(tmp_path, blk_spawn):
    sock = str(tmp_path / "blk.sock")
    spawner = Spawner(blk_spawn, sock)
    spawner.start()
    try:
        target = Target(sock, profiles.get("blk"), timeout=2.0, alive=spawner.alive)
        outcome = run_case(target, MINIMAL)
    finally:
        spawner.stop()
    # The back-end consumed the descriptor, so the oracle restarted the queue:
    # the restart path is what this case exercises.
    assert outcome.recovery == "restart", outcome
    assert outcome.verdict in (Verdict.PASS, Verdict.REJECT), outcome


def test_restart_bug_would_be_caught(mem):
    """The check above fails on a ring left zeroed, as the old code left it."""
    ring = PackedRing(mem, 4, base=pack_packed_vring_base(1, True))
    mem.fill(ring.desc_gpa, 16 * 4, 0)
    ident = ring.add([(0x80000, 16), (0x80100, 512, True), (0x80300, 1, True)])
    ring.publish()
    device_completes(mem, ring, 1, True, ident)
    with pytest.raises(RingProtocolError, match="not in flight"):
        ring.collect()
