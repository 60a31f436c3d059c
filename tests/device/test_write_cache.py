"""The write-cache contract for Python back-ends, end to end over a real
vhost-user socket with the library's front-end: in write-through mode every
completed write is stable (a back-end with only write + flush included),
CONFIG_WCE switched while writes run, write-zeroes, and flush before close.

``CacheDisk`` models storage with a volatile cache: write() lands in the
cache, flush() moves the cache to ``stable``, which is what a power cut
would leave. Reads see both, as a real cache does.
"""
import asyncio
import concurrent.futures
import threading
import time

import pytest

from vhostuser.blk import BlkDevice, BlkFeature, BlockBackend
from vhostuser.blk.record import RecordingBackend
from vhostuser.blk.recordlog import Kind, RecordLog
from vhostuser.frontend import BlkClient, BlkRequest, FeatureError, Frontend, FrontendTimeout
from vhostuser.frontend.blk import BLK_FEATURES
from vhostuser.protocol import bit, bits
from vhostuser_devkit.patterns import pattern
from vhostuser.testing.server import BackgroundServer

SECTOR = 512
DISK = 1 << 20
WRITE_THROUGH = BLK_FEATURES & ~bit(BlkFeature.FLUSH) & ~bit(BlkFeature.CONFIG_WCE)


class CacheDisk(BlockBackend):
    """Written to today's API: write() and flush() only."""

    def __init__(self, size=DISK):
        self.stable = bytearray(size)
        self.cache: dict[int, bytes] = {}     # sector -> data not yet flushed
        self.flushes = 0
        self.events: list[str] = []
        self.lock = threading.Lock()          # sync methods run in the queue workers

    def size(self):
        return len(self.stable)

    def read(self, offset, bufs):
        with self.lock:
            for b in bufs:
                for at in range(0, len(b), SECTOR):
                    s = (offset + at) // SECTOR
                    b[at:at + SECTOR] = self.cache.get(s, self.stable[s * SECTOR:(s + 1) * SECTOR])
                offset += len(b)

    def write(self, offset, bufs):
        with self.lock:
            for b in bufs:
                for at in range(0, len(b), SECTOR):
                    self.cache[(offset + at) // SECTOR] = bytes(b[at:at + SECTOR])
                offset += len(b)
            self.events.append("write")

    def flush(self):
        with self.lock:
            for s, data in self.cache.items():
                self.stable[s * SECTOR:(s + 1) * SECTOR] = data
            self.cache.clear()
            self.flushes += 1
            self.events.append("flush")

    def close(self):
        self.events.append("close")

    def stable_at(self, sector, n):
        return bytes(self.stable[sector * SECTOR:sector * SECTOR + n])


class AsyncCacheDisk(CacheDisk):
    """The same with async methods that take a while, so requests overlap."""

    async def write(self, offset, bufs):
        await asyncio.sleep(0.002)
        super().write(offset, bufs)

    async def flush(self):
        await asyncio.sleep(0.001)
        super().flush()


class DsyncDisk(CacheDisk):
    """Overrides write_fua: its own way to make one write stable."""

    def __init__(self):
        super().__init__()
        self.fua_writes = 0

    def write_fua(self, offset, bufs):
        with self.lock:
            for b in bufs:
                self.stable[offset:offset + len(b)] = b
                offset += len(b)
            self.fua_writes += 1


@pytest.mark.parametrize("disk_class", [CacheDisk, AsyncCacheDisk])
def test_write_through_completes_each_write_only_once_stable(blk_client, disk_class):
    disk = disk_class()
    with blk_client(BlkDevice(disk)) as (srv, blk):
        assert blk.read_config().writeback == 1         # FLUSH negotiated: write-back
        blk.write(0, pattern(1, 4096))
        assert disk.stable_at(0, 4096) == bytes(4096)   # cached: the device may wait for FLUSH
        blk.flush()
        assert disk.stable_at(0, 4096) == pattern(1, 4096)

        blk.set_writeback(False)
        assert blk.config.writeback == 0
        for i in range(8):
            blk.write(16 + 8 * i, pattern(10 + i, 4096))
            # completed, no FLUSH from the driver: already stable
            assert disk.stable_at(16 + 8 * i, 4096) == pattern(10 + i, 4096)
        blk.write_zeroes([(0, 8)])
        assert disk.stable_at(0, 4096) == bytes(4096)

        blk.set_writeback(True)
        blk.write(200, pattern(2, 512))
        assert disk.stable_at(200, 512) == bytes(512)   # write-back again: plain write
        assert blk.read(200, 512) == pattern(2, 512)


def test_without_flush_negotiated_every_write_is_stable(blk_client):
    disk = CacheDisk()
    features = bits(BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE)
    with blk_client(BlkDevice(disk), features=features) as (srv, blk):
        assert not blk.fe.has(BlkFeature.FLUSH)
        assert blk.read_config().writeback == 0
        with pytest.raises(FeatureError):
            blk.set_writeback(True)
        blk.write(8, pattern(3, 8192))
        assert disk.stable_at(8, 8192) == pattern(3, 8192)


def test_set_features_again_keeps_the_mode_the_driver_chose(blk_client):
    """QEMU sends SET_FEATURES again at each vhost_dev_start (VM stop/cont,
    LOG_ALL toggled for migration). The driver that chose write-through
    sends no FLUSH, so the device must not fall back to write-back then;
    only a reset (or other cache features) sets the initial mode again."""
    disk = CacheDisk()
    with blk_client(BlkDevice(disk)) as (srv, blk):
        blk.set_writeback(False)
        features = blk.fe.features
        blk.fe.set_features(features)                   # as at vhost_dev_start
        assert blk.read_config().writeback == 0
        blk.write(16, pattern(3, 4096))
        assert disk.stable_at(16, 4096) == pattern(3, 4096)
        blk.fe.reset()
        blk.fe.set_features(features)
        assert blk.read_config().writeback == 1         # FLUSH: write-back after a reset


def test_a_new_front_end_starts_in_the_mode_its_features_give(tmp_path):
    """The driver of one session chose write-through; the next session's
    driver negotiates FLUSH and gets write-back, as after a reset. The
    device kept the last driver's choice across sessions, so every write of
    the next one was synced (found by bench/run.py: buffered writes 15x
    slower after the write-through row, on the same daemon)."""
    device = BlkDevice(CacheDisk())
    path = str(tmp_path / "wce.sock")
    try:
        with BackgroundServer(device, path):
            with Frontend.connect(path) as fe:
                blk = BlkClient.setup(fe)
                blk.set_writeback(False)
                assert blk.read_config().writeback == 0
            with Frontend.connect(path) as fe:
                assert BlkClient.setup(fe).read_config().writeback == 1
    finally:
        device.close()


def test_an_overridden_write_fua_is_what_runs(blk_client):
    disk = DsyncDisk()
    with blk_client(BlkDevice(disk)) as (srv, blk):
        blk.set_writeback(False)
        blk.execute([BlkRequest.write(8 * i, pattern(i, 4096)) for i in range(16)], depth=16)
        assert disk.fua_writes == 16 and disk.flushes == 0 and not disk.cache
        assert disk.stable_at(0, 16 * 4096) == b"".join(pattern(i, 4096) for i in range(16))


def ops_by_sector(log_path):
    """{first sector: kind} of the logged data writes."""
    with RecordLog(log_path) as log:
        return {e.offset // SECTOR: e.kind for e in log.entries
                if e.kind in (Kind.WRITE, Kind.FUA)}


@pytest.mark.parametrize("disk_class,queues", [(AsyncCacheDisk, 1), (CacheDisk, 2)])
def test_config_wce_switched_while_writes_run(blk_client, tmp_path, disk_class, queues):
    """The mode is the one a request meets: writes submitted in write-back
    mode are still in flight when the driver switches to write-through;
    those submitted after the switch are write_fua and stable once they
    complete; more are in flight when it switches back, and those submitted
    after that are plain writes again. (A write whose whole life wasn't in
    write-through mode may be either: virtio 1.4, 5.2.6.)"""
    disk = disk_class(4 << 20)
    log = str(tmp_path / "wce.rlog")
    batches = {name: [BlkRequest.write(base + 8 * i, pattern(base + i, 4096))
                      for i in range(32)]
               for name, base in (("before", 0), ("through", 1024), ("straddle", 2048),
                                  ("after", 3072))}
    with blk_client(BlkDevice(RecordingBackend(disk, log), num_queues=queues),
                    queues=queues, queue_size=256) as (srv, blk):
        done = set()

        def submit(reqs):
            for q in range(queues):
                blk.submit(reqs[q::queues], queue=q)

        def reap_until(reqs):
            deadline = time.monotonic() + 30
            while not all(id(r) in done for r in reqs):
                assert time.monotonic() < deadline, "writes didn't complete"
                for q in range(queues):
                    try:
                        done.update(id(r) for r in blk.reap(1, queue=q, timeout=0.05))
                    except FrontendTimeout:
                        pass

        with blk.mem.scratch():
            submit(batches["before"])
            blk.set_writeback(False)            # acknowledged: applies from here on
            submit(batches["through"])
            reap_until(batches["through"])
            # No FLUSH was sent, yet every write made in write-through mode is stable.
            for r in batches["through"]:
                assert r.ok and disk.stable_at(r.sector, 4096) == r.out, r.sector
            submit(batches["straddle"])
            blk.set_writeback(True)
            submit(batches["after"])
            reap_until([r for reqs in batches.values() for r in reqs])
        assert all(r.ok for reqs in batches.values() for r in reqs)
        for reqs in batches.values():
            got = blk.execute([BlkRequest.read(r.sector, 4096) for r in reqs])
            assert [g.data for g in got] == [r.out for r in reqs]
    kinds = ops_by_sector(log)
    assert [kinds[r.sector] for r in batches["through"]] == [Kind.FUA] * 32
    assert [kinds[r.sector] for r in batches["after"]] == [Kind.WRITE] * 32


class HeldWriteDisk(CacheDisk):
    """An async write() that waits until the test lets it finish."""

    def __init__(self):
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    async def write(self, offset, bufs):
        self.started.set()
        while not self.release.is_set():
            await asyncio.sleep(0.001)
        super().write(offset, bufs)


@pytest.mark.parametrize("op", ["write", "write_zeroes"])
def test_an_async_write_ending_after_the_switch_to_write_through_is_stable(blk_client, op):
    """Begun under write-back, finished after the driver switched to
    write-through: the driver sees it complete in write-through mode, so it
    is stable by then (a flush runs before its completion). Write-zeroes
    (the default one, through the async write) likewise."""
    disk = HeldWriteDisk()
    disk.stable[:4096] = pattern(6, 4096)
    want = pattern(5, 4096) if op == "write" else bytes(4096)
    with blk_client(BlkDevice(disk)) as (srv, blk):
        with blk.mem.scratch():
            req = (BlkRequest.write(0, want) if op == "write"
                   else BlkRequest.write_zeroes([(0, 8)]))
            blk.submit([req])
            assert disk.started.wait(10)
            blk.set_writeback(False)
            disk.release.set()
            [done] = blk.reap(1, timeout=10)
        assert done is req and req.ok
        assert disk.events == ["write", "flush"]
        assert disk.stable_at(0, 4096) == want


class HeldPlainWriteDisk(CacheDisk):
    """A plain write() that blocks its queue's worker until the test lets
    it finish (the batch runs without the device lock meanwhile)."""

    def __init__(self):
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def write(self, offset, bufs):
        self.started.set()
        assert self.release.wait(30)
        super().write(offset, bufs)


class HeldPlainWriteAsyncFlushDisk(HeldPlainWriteDisk):
    async def flush(self):
        await asyncio.sleep(0.001)
        super().flush()


class HeldPlainWriteReturningLength(HeldPlainWriteDisk):
    """Returns the bytes written, a value the contract says is ignored."""

    def write(self, offset, bufs):
        super().write(offset, bufs)
        return sum(len(b) for b in bufs)


@pytest.mark.parametrize("disk_class", [HeldPlainWriteDisk, HeldPlainWriteAsyncFlushDisk,
                                        HeldPlainWriteReturningLength])
def test_a_plain_write_running_across_the_switch_to_write_through_is_stable(blk_client,
                                                                           disk_class):
    """A plain write() chosen in write-back mode is still running when the
    driver switches to write-through (the switch doesn't wait for it): the
    flush (plain or async) runs before its completion is published. Also
    when write() returns a value: it is ignored, the write is done all the
    same and needs the flush as much."""
    disk = disk_class()
    with blk_client(BlkDevice(disk)) as (srv, blk):
        with blk.mem.scratch():
            req = BlkRequest.write(0, pattern(7, 4096))
            blk.submit([req])
            assert disk.started.wait(10)
            blk.set_writeback(False)
            assert disk.events == []                    # still running
            disk.release.set()
            [done] = blk.reap(1, timeout=10)
        assert done is req and req.ok
        assert disk.events == ["write", "flush"]
        assert disk.stable_at(0, 4096) == pattern(7, 4096)
        blk.write(8, pattern(8, 4096))                  # write-through from here on
        assert disk.stable_at(8, 4096) == pattern(8, 4096)


def test_default_write_zeroes_awaits_an_async_write(blk_client):
    class AsyncOnly(BlockBackend):
        def __init__(self):
            self.data = bytearray(b"\xee" * (4 << 20))

        def size(self):
            return len(self.data)

        async def read(self, offset, bufs):
            for b in bufs:
                b[:] = self.data[offset:offset + len(b)]
                offset += len(b)

        async def write(self, offset, bufs):
            await asyncio.sleep(0)
            for b in bufs:
                self.data[offset:offset + len(b)] = b
                offset += len(b)

    disk = AsyncOnly()
    with blk_client(BlkDevice(disk)) as (srv, blk):
        # 3 MiB: three 1 MiB writes, each awaited in turn
        blk.write_zeroes([(8, 3 * 2048), (7000, 8)])
        assert blk.read(0, 4096) == b"\xee" * 4096
        assert bytes(disk.data[4096:4096 + 3 * (1 << 20)]) == bytes(3 << 20)
        assert bytes(disk.data[4096 + (3 << 20):4096 + (3 << 20) + 512]) == b"\xee" * 512
        assert bytes(disk.data[7000 * 512:7008 * 512]) == bytes(4096)


class AsyncWritePlainFlushDisk(CacheDisk):
    """Async read() and write(); a plain flush() (an fsync of a slow store)
    that blocks until the test lets it finish."""

    def __init__(self):
        super().__init__()
        self.in_flush, self.release = threading.Event(), threading.Event()

    async def read(self, offset, bufs):
        super().read(offset, bufs)

    async def write(self, offset, bufs):
        super().write(offset, bufs)

    def flush(self):
        self.in_flush.set()
        assert self.release.wait(30)
        super().flush()


def loop_answers(loop, within=2.0) -> bool:
    try:
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(within)
        return True
    except concurrent.futures.TimeoutError:
        return False


@pytest.mark.parametrize("kind", ["flush-request", "write-through-write", "write-zeroes"])
def test_a_blocking_plain_flush_never_blocks_the_event_loop(blk_client, kind):
    """A plain method runs in its queue's worker, so one that blocks holds
    up that queue only. The flush that makes an async write (the default
    write_fua, after an async write()) or write-zeroes stable ran on the
    event loop: a blocking one froze the control plane, other disks and
    every async request. It runs in a thread now."""
    disk = AsyncWritePlainFlushDisk()
    features = {} if kind == "flush-request" else {"features": WRITE_THROUGH}
    with blk_client(BlkDevice(disk), **features) as (srv, blk):
        with blk.mem.scratch():
            req = {"flush-request": BlkRequest.flush(),
                   "write-through-write": BlkRequest.write(0, pattern(1, 4096)),
                   "write-zeroes": BlkRequest.write_zeroes([(0, 8)])}[kind]
            blk.submit([req])
            assert disk.in_flush.wait(10)
            try:
                answers = loop_answers(srv.loop)
            finally:
                disk.release.set()
            assert blk.reap(1, timeout=10) == [req] and req.ok
        assert answers, f"{kind}: the back-end's plain flush() blocks the event loop"
        assert disk.events[-1] == "flush"


# -- flush before close -----------------------------------------------------------------

@pytest.mark.parametrize("disk_class", [CacheDisk, AsyncCacheDisk])
def test_close_flushes_the_back_end_first(tmp_path, disk_class):
    """As vhostuser-blk exits: the event loop is gone when close() runs."""
    disk = disk_class()
    device = BlkDevice(disk)
    with BackgroundServer(device, str(tmp_path / "c.sock")):
        from vhostuser.frontend import BlkClient, Frontend
        with Frontend.connect(str(tmp_path / "c.sock")) as fe:
            BlkClient.setup(fe).write(0, pattern(4, 4096))
    assert disk.stable_at(0, 4096) == bytes(4096)
    device.close()
    assert disk.events[-2:] == ["flush", "close"]
    assert disk.stable_at(0, 4096) == pattern(4, 4096)


def _disconnected(device, path):
    """Writes through a front-end that then goes away; returns once the
    device's session is over (the device may be closed only then)."""
    from vhostuser.frontend import BlkClient, Frontend
    with Frontend.connect(path) as fe:
        BlkClient.setup(fe).write(0, pattern(5, 512))
    deadline = time.monotonic() + 10
    while device.session is not None:
        assert time.monotonic() < deadline, "session still open"
        time.sleep(0.01)


def flush_loop_recording_disk(delay: float = 0.0):
    """An AsyncCacheDisk whose flush() notes the loop it runs on (after
    `delay` seconds, as a store taking a moment); returns it and that list."""
    disk = AsyncCacheDisk()
    loops = []
    real_flush = disk.flush

    async def flush():
        loops.append(asyncio.get_running_loop())
        if delay:
            await asyncio.sleep(delay)
        await real_flush()
    disk.flush = flush
    return disk, loops


def test_close_from_another_thread_flushes_on_the_serving_loop(tmp_path):
    """As a program that serves on a loop in one thread and closes the
    device from another."""
    disk, loops = flush_loop_recording_disk()
    device = BlkDevice(disk)
    path = str(tmp_path / "t.sock")
    with BackgroundServer(device, path) as srv:
        _disconnected(device, path)
        device.close()
        assert loops == [srv.loop]
    assert disk.events[-2:] == ["flush", "close"]
    assert disk.stable_at(0, 512) == pattern(5, 512)


def test_close_from_another_loop_flushes_on_the_device_loop(tmp_path):
    """As an application's own asyncio main closing a device served by a
    loop in another thread: the flush ran as a task on the caller's loop,
    not the device's, and was cancelled half-way when that loop ended
    (asyncio.run returning), the back-end closed all the same."""
    disk, loops = flush_loop_recording_disk(delay=0.05)     # a store takes a moment
    device = BlkDevice(disk)
    path = str(tmp_path / "o.sock")
    with BackgroundServer(device, path) as srv:
        _disconnected(device, path)

        async def app_main():
            device.close()
        asyncio.run(app_main())
        assert loops == [srv.loop]
        assert disk.events[-2:] == ["flush", "close"]
        assert disk.stable_at(0, 512) == pattern(5, 512)


def test_close_in_a_coroutine_then_the_loop_ends_still_flushes():
    """close() in the program's asyncio main (a finally after serving), with
    no device loop: main returns and asyncio.run cancels what is left; the
    flush close() left behind was cancelled, the back-end closed unflushed."""
    disk = AsyncCacheDisk()
    device = BlkDevice(disk)
    disk.cache[0] = pattern(9, 512)                     # an acknowledged write-back write

    async def main():
        device.close()
    asyncio.run(main())
    assert disk.events[-2:] == ["flush", "close"]
    assert disk.stable_at(0, 512) == pattern(9, 512)


def test_aclose_on_the_loop_awaits_the_flush(tmp_path):
    """As vhostuser-daemon removes an export."""
    disk = AsyncCacheDisk()
    device = BlkDevice(disk)
    path = str(tmp_path / "a.sock")
    with BackgroundServer(device, path) as srv:
        _disconnected(device, path)
        asyncio.run_coroutine_threadsafe(device.aclose(), srv.loop).result(10)
        assert disk.events[-2:] == ["flush", "close"]
        assert disk.stable_at(0, 512) == pattern(5, 512)
    device.close()                      # again: nothing more
    assert disk.events.count("flush") == 1 and disk.events.count("close") == 1


def test_a_failing_flush_at_close_still_closes(tmp_path, caplog):
    class Broken(CacheDisk):
        def flush(self):
            raise OSError("device gone")
    disk = Broken()
    BlkDevice(disk).close()
    assert disk.events == ["close"]
    assert "flush before close failed: device gone" in caplog.text


def test_a_hung_flush_at_close_is_given_up_after_the_drain_timeout(caplog):
    """As with requests in flight: a store that never answers doesn't hold
    up the exit or the removal of a disk forever."""
    class Hung(CacheDisk):
        async def flush(self):
            await asyncio.sleep(3600)
    disk = Hung()
    device = BlkDevice(disk)
    device.drain_timeout = 0.3
    t0 = time.monotonic()
    device.close()
    assert 0.3 <= time.monotonic() - t0 < 5
    assert disk.events == ["close"]
    assert "flush before close not done after 0.3s" in caplog.text
