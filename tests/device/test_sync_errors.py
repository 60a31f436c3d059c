"""A sync that fails is never followed by one that calls the same data
stable (virtio 1.4 5.2.6.5; issue 15's write-cache contract).

When the kernel can't write a page back it reports the error to the next
fsync of each open file once, and marks the page clean: a later fdatasync
returns 0 over data that never reached the storage. The image here sits on
a file system whose storage refuses the image's blocks from arm() on
(vhostuser_devkit.lostwrites), so what the guest was told can be compared
with what the storage holds.
"""
import os

import pytest

from vhostuser.blk import BlkDevice, FileBackend
from vhostuser.frontend import BlkClient, Frontend
from vhostuser.frontend.blk import BlkRequest
from vhostuser.testing.server import BackgroundServer
from vhostuser_devkit.lostwrites import LostWritesFs, Unavailable

KIB4 = 4096


@pytest.fixture
def lost_writes(tmp_path):
    fs = LostWritesFs(str(tmp_path))
    try:
        fs.setup()
    except Unavailable as exc:
        fs.remove()
        pytest.skip(f"no file system that loses writes here: {exc}")
    try:
        yield fs
    finally:
        fs.remove()


def serve(tmp_path, fs, body, **device_args):
    device = BlkDevice(FileBackend(fs.image), **device_args)
    path = str(tmp_path / "blk.sock")
    try:
        with BackgroundServer(device, path):
            with Frontend.connect(path) as fe:
                return body(BlkClient.setup(fe, queues=device.num_queues), device)
    finally:
        device.close()


@pytest.mark.parametrize("aio", ["sync", "io_uring"])
def test_no_flush_succeeds_after_one_failed(tmp_path, lost_writes, aio):
    """Write-back: a write, then FLUSH fails (the storage lost it); every
    FLUSH after that fails too, although the kernel reports the loss once.
    Before arm() the same steps succeed (the control)."""
    def body(blk, device):
        before = (blk.execute([BlkRequest.write(0, b"a" * KIB4)])
                  + blk.execute([BlkRequest.flush()]))
        assert all(r.ok for r in before), before
        assert lost_writes.on_disk(0, KIB4) == b"a" * KIB4
        lost_writes.arm()
        (write,) = blk.execute([BlkRequest.write(8, b"W" * KIB4)])
        assert write.ok                         # write-back: in the page cache
        flushes = [blk.execute([BlkRequest.flush()])[0] for _ in range(3)]
        return flushes, device.sync_error

    flushes, error = serve(tmp_path, lost_writes, body, aio=aio)
    assert lost_writes.on_disk(8 * 512, KIB4) != b"W" * KIB4     # lost indeed
    assert [f.ok for f in flushes] == [False, False, False], flushes
    assert error != 0


def test_a_write_through_write_fails_when_a_flush_took_the_error(tmp_path, lost_writes):
    """Write-through (CONFIG_WCE 0), the synchronous engine: a write and a
    FLUSH in one round. The FLUSH's sync takes the kernel's one report of
    the loss; the write's group sync, after it, must not call the write
    stable."""
    def body(blk, device):
        blk.set_writeback(False)
        lost_writes.arm()
        return blk.execute([BlkRequest.write(16, b"T" * KIB4), BlkRequest.flush()])

    write, flush = serve(tmp_path, lost_writes, body, aio="sync")
    assert lost_writes.on_disk(16 * 512, KIB4) != b"T" * KIB4
    assert not flush.ok
    assert not write.ok, "a write-through write completed OK while its data was lost"


@pytest.mark.parametrize("aio", ["sync", "io_uring"])
def test_each_queue_is_told_of_the_loss(tmp_path, lost_writes, aio):
    """Two queues. A write on queue 0, and another sync of the image (here
    one through the back-end's own fd, as another queue's running at the
    same moment would be) takes the kernel's report first: queue 1's FLUSH,
    which covers the write, fails all the same, since each queue syncs
    through an open file of its own and each open file is told."""
    def body(blk, device):
        lost_writes.arm()
        (write,) = blk.execute([BlkRequest.write(24, b"Q" * KIB4)], queue=0)
        assert write.ok
        with pytest.raises(OSError):
            os.fdatasync(device.backend.fd)
        (flush,) = blk.execute([BlkRequest.flush()], queue=1)
        return flush

    flush = serve(tmp_path, lost_writes, body, aio=aio, num_queues=2)
    assert lost_writes.on_disk(24 * 512, KIB4) != b"Q" * KIB4
    assert not flush.ok, "queue 1's FLUSH called a lost write stable"
