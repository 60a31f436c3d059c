"""The C file back-end keeps the virtio-blk write-cache contract (issue 15):
in write-through mode (FLUSH not negotiated, or writeback set to 0 through
CONFIG_WCE) a write completes only after a sync that started after its data
was written has ended; one sync covers many writes (group commit).

Checked from outside: the kernel's trace of the image's ext4 inode (data
written, sync started, sync ended) against the moment the driver saw each
completion. Write-back mode, where writes complete unsynced, is the control
that shows the check can fail.
"""
import os
import subprocess
import time

import pytest

from kernel_trace import Ext4Trace, TraceUnavailable, unsynced
from vhostuser.blk import BlkDevice, BlockBackend, FileBackend, RamBackend
from vhostuser.blk.spec import CONFIG_WRITEBACK_OFFSET
from vhostuser.frontend import BlkClient, Frontend
from vhostuser.frontend.blk import BLK_FEATURES, BlkFeature, BlkRequest, BlkType
from vhostuser.protocol import bit
from vhostuser.testing.server import BackgroundServer

KIB4 = 4096
WRITE_THROUGH = BLK_FEATURES & ~bit(BlkFeature.FLUSH) & ~bit(BlkFeature.CONFIG_WCE)


def ext4_image(tmp_path, size=8 << 20) -> str:
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.truncate(size)
    fstype = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True,
                            text=True).stdout.strip()
    if fstype != "ext2/ext3":       # what stat calls ext4 too
        pytest.skip(f"the image must be on ext4 for the kernel's trace (here: {fstype})")
    return path


@pytest.fixture
def traced(tmp_path):
    """(image path, Ext4Trace of its inode)"""
    path = ext4_image(tmp_path)
    try:
        trace = Ext4Trace(os.stat(path).st_ino)
    except (TraceUnavailable, OSError) as exc:
        pytest.skip(f"kernel tracing unavailable: {exc}")
    yield path, trace
    trace.close()


def run_writes(blk: BlkClient, offsets, depth: int) -> dict[int, float]:
    """Writes 4 KiB at each offset, `depth` at a time; returns when the
    driver saw each one complete."""
    seen = {}
    vq = blk.queues[0]
    offsets = list(offsets)
    with blk.mem.scratch():
        for i in range(0, len(offsets), depth):
            batch = [BlkRequest.write(off // 512, off.to_bytes(8, "little") * (KIB4 // 8))
                     for off in offsets[i:i + depth]]
            blk.submit(batch)
            left = len(batch)
            while left:
                for used in vq.wait(1):
                    req = blk._finish(used.token, used.length)
                    assert req.ok, req
                    seen[req.sector * 512] = time.monotonic()
                    left -= 1
    return seen


@pytest.mark.parametrize("aio", ["io_uring", "sync"])
def test_write_through_completes_only_after_a_covering_sync(tmp_path, traced, aio):
    image, trace = traced
    device = BlkDevice(FileBackend(image), aio=aio)
    path = str(tmp_path / "blk.sock")
    try:
        with BackgroundServer(device, path):
            with Frontend.connect(path) as fe:
                blk = BlkClient.setup(fe, features=WRITE_THROUGH)
                offsets = [i * KIB4 for i in range(96)]
                seen = run_writes(blk, offsets, depth=16)
        writes, syncs = trace.read()
        assert not unsynced(writes, syncs, seen, KIB4)
        totals = device.stats()
        assert totals["stable_writes"] == len(offsets)
        # group commit: fewer syncs than writes (16 in flight at a time)
        assert 0 < totals["stable_syncs"] < len(offsets), totals
        with open(image, "rb") as f:
            for off in offsets:
                f.seek(off)
                assert f.read(8) == off.to_bytes(8, "little")
    finally:
        device.close()


@pytest.mark.parametrize("aio", ["io_uring", "sync"])
def test_write_back_completions_are_unsynced_the_control(tmp_path, traced, aio):
    """With FLUSH negotiated writes may be cached: they complete without a
    sync, and the check above says so (it can fail)."""
    image, trace = traced
    device = BlkDevice(FileBackend(image), aio=aio)
    path = str(tmp_path / "blk.sock")
    try:
        with BackgroundServer(device, path):
            with Frontend.connect(path) as fe:
                blk = BlkClient.setup(fe)
                seen = run_writes(blk, [i * KIB4 for i in range(32)], depth=8)
        writes, syncs = trace.read()
        assert syncs == []
        assert len(unsynced(writes, syncs, seen, KIB4)) == 32
        assert device.stats()["stable_writes"] == 0
    finally:
        device.close()


def test_flush_completes_after_a_sync_covering_every_completed_write(tmp_path, traced):
    image, trace = traced
    device = BlkDevice(FileBackend(image))
    path = str(tmp_path / "blk.sock")
    try:
        with BackgroundServer(device, path):
            with Frontend.connect(path) as fe:
                blk = BlkClient.setup(fe)
                seen = run_writes(blk, [i * KIB4 for i in range(16)], depth=8)
                blk.flush()
                flushed = time.monotonic()
        writes, syncs = trace.read()
        # every write completed before the flush is covered by a sync that
        # ended before the flush completed
        assert not unsynced(writes, syncs, {off: flushed for off in seen}, KIB4)
    finally:
        device.close()


def test_flushes_in_flight_together_share_syncs_each_covering_what_completed_before_it(
        tmp_path, traced):
    """io_uring: a FLUSH waits for its queue's next sync, and every FLUSH
    waiting then shares it. Writes and FLUSHes run together, a FLUSH sent
    after every 4 write completions: each write is checked against the
    first FLUSH sent after the driver saw it complete (a FLUSH that joined a
    sync started before that write would fail this), and there must be fewer
    syncs than FLUSHes (a sync takes milliseconds, a FLUSH comes every few
    hundred microseconds; one sync per FLUSH, as before, counted none)."""
    image, trace = traced
    device = BlkDevice(FileBackend(image), aio="io_uring")
    path = str(tmp_path / "blk.sock")
    offsets = [i * KIB4 for i in range(160)]
    must_cover = {}      # FLUSH request -> offsets completed before it was sent
    covered_by = {}      # offset -> when the driver saw its FLUSH complete
    flushes = 0
    try:
        with BackgroundServer(device, path):
            with Frontend.connect(path) as fe:
                blk = BlkClient.setup(fe)
                vq = blk.queues[0]
                todo = iter(offsets)
                unflushed = []
                with blk.mem.scratch():
                    blk.submit([BlkRequest.write(next(todo) // 512, b"f" * KIB4)
                                for _ in range(16)])
                    in_flight = 16
                    while in_flight:
                        for used in vq.wait(1):
                            req = blk._finish(used.token, used.length)
                            assert req.ok, req
                            in_flight -= 1
                            if req.type == BlkType.FLUSH:
                                now = time.monotonic()
                                covered_by.update((off, now) for off in must_cover.pop(id(req)))
                                continue
                            unflushed.append(req.sector * 512)
                            new = [BlkRequest.write(off // 512, b"f" * KIB4)
                                   for off in [next(todo, None)] if off is not None]
                            if len(unflushed) == 4:
                                flush = BlkRequest.flush()
                                must_cover[id(flush)] = unflushed
                                unflushed = []
                                new.append(flush)
                                flushes += 1
                            if new:
                                blk.submit(new)
                                in_flight += len(new)
                assert not must_cover
        writes, syncs = trace.read()
        assert len(covered_by) == len(offsets)
        assert not unsynced(writes, syncs, covered_by, KIB4)
        totals = device.stats()
        assert totals["flushes"] == flushes == len(offsets) // 4
        assert 0 < totals["stable_syncs"] < flushes, totals
        assert totals["stable_writes"] == 0          # write-back: FLUSHes are not writes
    finally:
        device.close()


class PwriteDisk(BlockBackend):
    """A Python back-end as the docs show one: pwritev, flush an fdatasync
    (write_fua is the base class's write then flush)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read(self, offset, bufs) -> None:
        os.preadv(self.fd, bufs, offset)

    def write(self, offset, bufs) -> None:
        os.pwritev(self.fd, bufs, offset)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("aio", ["io_uring", "sync", "python"])
def test_switch_to_write_through_while_writes_run(tmp_path, traced, aio):
    """CONFIG_WCE: writeback set to 0 while writes are in flight. Every write
    the driver sees complete after the switch was acknowledged is stable:
    for the C file back-end and for a Python one ("python")."""
    image, trace = traced
    device = (BlkDevice(PwriteDisk(image)) if aio == "python"
              else BlkDevice(FileBackend(image), aio=aio))
    path = str(tmp_path / "blk.sock")
    try:
        with BackgroundServer(device, path):
            with Frontend.connect(path) as fe:
                blk = BlkClient.setup(fe)
                vq = blk.queues[0]
                assert blk.read_config().writeback == 1
                seen, switched = {}, None
                with blk.mem.scratch():
                    offsets = [i * KIB4 for i in range(256)]
                    blk.submit([BlkRequest.write(off // 512, b"s" * KIB4) for off in offsets[:32]])
                    pending = offsets[32:]
                    done = 0
                    while done < len(offsets):
                        if switched is None and done >= 16:
                            fe.set_config(CONFIG_WRITEBACK_OFFSET, b"\0")
                            switched = time.monotonic()
                            # Published before the switch took effect, seen
                            # only now: not bound by it.
                            for used in vq.poll():
                                req = blk._finish(used.token, used.length)
                                assert req.ok
                                done += 1
                                if pending:
                                    off = pending.pop(0)
                                    blk.submit([BlkRequest.write(off // 512, b"s" * KIB4)])
                        for used in vq.wait(1):
                            req = blk._finish(used.token, used.length)
                            assert req.ok
                            seen[req.sector * 512] = time.monotonic()
                            done += 1
                            if pending:
                                off = pending.pop(0)
                                blk.submit([BlkRequest.write(off // 512, b"s" * KIB4)])
                assert blk.read_config().writeback == 0
        writes, syncs = trace.read()
        after = {off: t for off, t in seen.items() if t > switched}
        assert len(after) >= 128      # all but the first ~48 writes
        assert not unsynced(writes, syncs, after, KIB4)
    finally:
        device.close()


def test_secure_erase_is_offered_only_where_it_erases(tmp_path):
    """A regular file: overwriting erases nothing on an SSD or a copy-on-write
    file system, so SECURE_ERASE is not offered; RAM: offered and done."""
    image = str(tmp_path / "disk.img")
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    for backend, offered in ((FileBackend(image), False), (RamBackend(1 << 20), True)):
        device = BlkDevice(backend)
        try:
            assert bool(device.device_features() & bit(BlkFeature.SECURE_ERASE)) == offered
        finally:
            device.close()
