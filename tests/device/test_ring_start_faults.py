"""A ring whose addresses don't translate when it starts breaks alone
(issue 14, point 4): its error eventfd fires, the other rings serve, the
connection stays, and new ring addresses with another kick, or a device
reset, bring it back. Split and packed.
"""
import select

import pytest

from vhostuser.blk import BlkDevice, RamBackend
from vhostuser.frontend import BlkClient, Frontend
from vhostuser.frontend.packed import PackedRing
from vhostuser.frontend.split import SplitRing
from vhostuser.frontend.virtqueue import Virtqueue
from vhostuser.protocol import Feature
from vhostuser.testing.server import BackgroundServer


@pytest.fixture
def two_queue_disk(tmp_path):
    device = BlkDevice(RamBackend(1 << 20), num_queues=2)
    path = str(tmp_path / "blk.sock")
    with BackgroundServer(device, path) as srv:
        yield srv, path
    device.close()


def error_signalled(err_fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([err_fd], [], [], timeout)[0])


def start_ring(fe: Frontend, index: int, mem, *, packed: bool, desc: int | None = None):
    """Brings up ring ``index`` as setup_queue does, but with the descriptor
    table at user address ``desc`` if given. Returns the Virtqueue."""
    ring_type = PackedRing if packed else SplitRing
    ring = ring_type(mem, 64, event_idx=fe.has(Feature.RING_EVENT_IDX), base=None,
                     indirect_entries=0)
    q = Virtqueue(index, ring, err=True)
    fe.set_vring_num(index, 64)
    fe.set_vring_base(index, ring.base)
    fe.set_vring_addr(index, desc=mem.uva(ring.desc_gpa) if desc is None else desc,
                      used=mem.uva(ring.device_gpa), avail=mem.uva(ring.driver_gpa))
    fe.set_vring_err(index, q.err_fd)
    fe.set_vring_kick(index, q.kick_fd)       # acknowledged: the connection stays
    fe.set_vring_call(index, q.call_fd)
    fe.set_vring_enable(index, True)
    fe.queues[index] = q
    return q


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fault", ["misaligned", "unmapped"])
def test_bad_ring_address_at_start_breaks_only_that_ring(two_queue_disk, packed, fault):
    srv, path = two_queue_disk
    with Frontend.connect(path) as fe:
        blk = BlkClient.setup(fe, queues=1, packed=packed)
        mem = blk.mem
        # A descriptor table 3 bytes off its alignment, or outside every region.
        probe = SplitRing(mem, 64, event_idx=False, base=None, indirect_entries=0)
        desc = mem.uva(probe.desc_gpa) + 3 if fault == "misaligned" else 0x7f00_0000_0000
        q1 = start_ring(fe, 1, mem, packed=packed, desc=desc)
        assert error_signalled(q1.err_fd)
        queue = srv.device.session.dataplane.queues[1]
        assert queue.broken and "VU_ERR_RING_UNMAPPED" in queue.error
        # ring 0 serves on
        blk.write(0, b"a" * 512)
        assert blk.read(0, 512) == b"a" * 512
        # good addresses and a kick bring ring 1 back
        fe.set_vring_addr(1, desc=mem.uva(q1.ring.desc_gpa), used=mem.uva(q1.ring.device_gpa),
                          avail=mem.uva(q1.ring.driver_gpa))
        fe.set_vring_kick(1, q1.kick_fd)
        assert not queue.broken
        blk.queues.append(q1)
        blk.write(8, b"b" * 512, queue=1)
        assert blk.read(8, 512, queue=1) == b"b" * 512


@pytest.mark.parametrize("packed", [False, True])
def test_device_reset_restores_a_ring_broken_at_start(two_queue_disk, packed):
    srv, path = two_queue_disk
    with Frontend.connect(path) as fe:
        blk = BlkClient.setup(fe, queues=1, packed=packed)
        mem = blk.mem
        probe = SplitRing(mem, 64, event_idx=False, base=None, indirect_entries=0)
        q1 = start_ring(fe, 1, mem, packed=packed, desc=mem.uva(probe.desc_gpa) + 3)
        assert error_signalled(q1.err_fd)
        assert srv.device.session.dataplane.queues[1].broken
        fe.reset()
        blk = BlkClient.setup(fe, queues=2, packed=packed)
        for q in range(2):
            blk.write(q, bytes([q + 1]) * 512, queue=q)
            assert blk.read(q, 512, queue=q) == bytes([q + 1]) * 512
