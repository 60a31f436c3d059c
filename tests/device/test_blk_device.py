"""The virtio-blk device end to end over a real vhost-user socket, driven by
the library's front-end: C file back-end (io_uring and sync), RAM disk, the
Python back-end API with the examples, read-only disks, resize."""
import asyncio
import concurrent.futures
import os
import subprocess
import tempfile
import threading

import pytest

from examples.cow_overlay import CowOverlay
from examples.sparse_dict import SparseDictDisk
from examples.trace_disk import TracingDisk
from vhostuser.blk import (BackendError, BlkDevice, BlkFeature, BlockBackend, FileBackend,
                           RamBackend, Unsupported)
from vhostuser.frontend import BlkRequest, BlkStatus
from vhostuser.testing.server import BackgroundServer
from vhostuser_devkit.patterns import pattern

MIB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
    return path


@pytest.mark.parametrize("aio", ["io_uring", "sync"])
@pytest.mark.parametrize("packed", [False, True])
def test_file_backend_queue_depth_writes_land_in_the_image(blk_client, image, aio, packed):
    dev = BlkDevice(FileBackend(str(image)), num_queues=2, aio=aio)
    with blk_client(dev, queues=2, packed=packed) as (srv, blk):
        assert blk.capacity == 16 * MIB // 512
        writes = [BlkRequest.write(i * 16, pattern(i, 4096)) for i in range(32)]
        assert all(r.ok for r in blk.execute(writes, depth=32))
        blk.flush(queue=1)
        reads = blk.execute([BlkRequest.read(i * 16, 4096) for i in range(32)], queue=1, depth=16)
        assert [r.data for r in reads] == [pattern(i, 4096) for i in range(32)]
        # GET_VRING_BASE stops the ring where the driver's index stands
        # (packed: bit 15 carries the wrap counter, still 1 in the first lap)
        assert blk.fe.get_vring_base(0) == 32 | (0x8000 if packed else 0)
    data = image.read_bytes()
    for i in range(32):
        assert data[i * 8192:i * 8192 + 4096] == pattern(i, 4096)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm")
def test_image_in_memory_is_served_by_the_workers_without_io_uring(blk_client):
    """tmpfs can't do non-blocking I/O, so io_uring would give each request
    to a kernel thread: the device does the copies in its workers instead."""
    fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="vhu-test-")
    try:
        os.ftruncate(fd, 4 * MIB)
        dev = BlkDevice(FileBackend(path))
        assert dev.aio == "sync"
        with blk_client(dev) as (srv, blk):
            blk.execute([BlkRequest.write(i * 8, pattern(i, 4096)) for i in range(16)], depth=16)
            reads = blk.execute([BlkRequest.read(i * 8, 4096) for i in range(16)], depth=16)
            assert [r.data for r in reads] == [pattern(i, 4096) for i in range(16)]
        assert os.pread(fd, 4096, 5 * 4096) == pattern(5, 4096)
    finally:
        os.close(fd)
        os.unlink(path)


def test_out_of_range_and_unknown_requests_keep_the_device_serving(blk_client):
    with blk_client(BlkDevice(RamBackend(MIB))) as (srv, blk):
        bad = blk.execute([BlkRequest.read(2048, 512), BlkRequest(type=99),
                           BlkRequest.read(2**63, 512), BlkRequest.write(2047, b"x" * 1024)])
        assert [r.status for r in bad] == [BlkStatus.IOERR, BlkStatus.UNSUPP,
                                           BlkStatus.IOERR, BlkStatus.IOERR]
        blk.write(0, b"a" * 512)
        assert blk.read(0, 512) == b"a" * 512


def test_discard_and_write_zeroes_read_back_zeroes(blk_client, image):
    with blk_client(BlkDevice(FileBackend(str(image)))) as (srv, blk):
        blk.write(0, b"\xff" * 65536)
        blk.discard([(0, 16)])
        blk.write_zeroes([(32, 8)], unmap=True)
        blk.write_zeroes([(64, 8)])
        got = blk.read(0, 65536)
        assert got[:8192] == bytes(8192) and got[8192:16384] == b"\xff" * 8192
        assert got[16384:20480] == bytes(4096) and got[32768:36864] == bytes(4096)
    assert image.read_bytes()[:8192] == bytes(8192)


def test_read_only_disk_refuses_writes_and_offers_no_write_features(blk_client, image):
    image.write_bytes(b"\x11" * MIB)
    dev = BlkDevice(FileBackend(str(image), read_only=True))
    features = dev.features()
    assert features & (1 << BlkFeature.RO)
    for f in (BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES, BlkFeature.CONFIG_WCE):
        assert not features & (1 << f)
    with blk_client(dev) as (srv, blk):
        (w,) = blk.execute([BlkRequest.write(0, b"x" * 512)])
        assert w.status == BlkStatus.IOERR
        assert blk.read(0, 512) == b"\x11" * 512
    assert image.read_bytes() == b"\x11" * MIB


def test_resize_changes_capacity(blk_client):
    dev = BlkDevice(RamBackend(MIB))
    with blk_client(dev) as (srv, blk):
        srv.call(dev.resize, 2 * MIB)
        assert blk.read_config().capacity == 2 * MIB // 512
        blk.write(4000, b"z" * 512)          # beyond the old end
        assert blk.read(4000, 512) == b"z" * 512


@pytest.fixture
def held_round():
    """A queue worker's next file round held where it dropped the device
    lock, before its I/O goes to io_uring (test hook vu_fault_round_unlocked,
    csrc/vu_fault.h): yields (held, release), threading.Events: held is set
    once a round waits, which it does until release is set (10 s at most)."""
    from vhostuser.native import ffi, lib
    held, release = threading.Event(), threading.Event()

    def hook():
        if not held.is_set():
            held.set()
            release.wait(10)
    cb = ffi.callback("void(void)", hook)
    lib.vu_fault_round_unlocked = cb
    try:
        yield held, release
    finally:
        release.set()
        lib.vu_fault_round_unlocked = ffi.NULL


def uring_writes(image) -> BlkDevice:
    """A device on `image` whose writes go through io_uring (skips the test
    where there is none)."""
    dev = BlkDevice(FileBackend(str(image)))
    try:
        dev.set_io_path(write="uring")
    except ValueError:
        dev.close()
        pytest.skip("io_uring not available")
    return dev


def hold_a_write_past_4_mib(blk, held) -> None:
    """A write at 12 MiB, checked against the 16 MiB disk, held by
    held_round in its round (queued for io_uring, not submitted)."""
    blk.submit([BlkRequest.write(12 * MIB // 512, b"w" * 4096)])
    assert held.wait(10)


@pytest.mark.parametrize("call", ["aresize", "resize"])
def test_a_shrink_truncates_once_a_write_past_the_new_end_taken_before_has_ended(
        blk_client, image, held_round, call):
    """aresize() (or resize(), blocking) to a smaller size while a write
    past the new end, checked against the old size, is still in flight
    (queued for io_uring): the ftruncate ran at once and the write landed
    after it, growing the file again (the disk larger than asked, the data
    past the end back). The truncate now waits for the requests taken
    before the shrink."""
    dev = uring_writes(image)
    held, release = held_round
    with blk_client(dev) as (srv, blk):
        hold_a_write_past_4_mib(blk, held)
        if call == "aresize":
            resize = asyncio.run_coroutine_threadsafe(dev.aresize(4 * MIB), srv.loop)
        else:
            resize = concurrent.futures.ThreadPoolExecutor(1).submit(dev.resize, 4 * MIB)
        with pytest.raises(concurrent.futures.TimeoutError):
            resize.result(0.3)       # the write taken before still runs
        assert dev.capacity == 4 * MIB // 512          # in force for new requests
        release.set()
        (write,) = blk.reap(1)
        assert write.status == BlkStatus.OK            # taken before the shrink
        resize.result(10)
        assert blk.read_config().capacity == 4 * MIB // 512
    assert os.path.getsize(image) == 4 * MIB


def test_a_shrink_with_a_write_in_flight_past_the_timeout_keeps_the_size(
        blk_client, image, held_round):
    """The write taken before still runs when the timeout passes: aresize()
    raises RequestsInFlight, and neither the file nor the disk shrank."""
    from vhostuser.errors import RequestsInFlight
    dev = uring_writes(image)
    held, release = held_round
    with blk_client(dev) as (srv, blk):
        hold_a_write_past_4_mib(blk, held)
        resize = asyncio.run_coroutine_threadsafe(dev.aresize(4 * MIB, timeout=0.2), srv.loop)
        with pytest.raises(RequestsInFlight, match=r"resize to 4194304: 1 request taken before "
                                                   r"still in flight after 0.2s"):
            resize.result(10)
        assert dev.capacity == 16 * MIB // 512
        release.set()
        (write,) = blk.reap(1)
        assert write.status == BlkStatus.OK
    assert os.path.getsize(image) == 16 * MIB


def test_serial_and_write_cache_toggle(blk_client, image):
    dev = BlkDevice(FileBackend(str(image)), serial="disk-0042")
    with blk_client(dev) as (srv, blk):
        assert blk.get_id() == b"disk-0042"
        assert blk.read_config().writeback == 1
        blk.fe.set_config(32, b"\x00")         # guest switches to write-through
        assert blk.read_config().writeback == 0
        blk.write(0, b"w" * 512)               # completed = stable now
        assert image.read_bytes()[:512] == b"w" * 512


# ---- Python back-ends --------------------------------------------------------

def test_sparse_dict_example(blk_client):
    backend = SparseDictDisk(size=4 * MIB)
    with blk_client(BlkDevice(backend)) as (srv, blk):
        blk.write(8, pattern(1, 8192))
        assert blk.read(8, 8192) == pattern(1, 8192)
        assert blk.read(4096, 512) == bytes(512)
        blk.discard([(8, 16)])
        assert blk.read(8, 8192) == bytes(8192)
    assert backend.blocks == {}              # the whole 8 KiB was forgotten


def test_cow_overlay_example_never_touches_the_base(blk_client, tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(pattern(7, MIB))
    overlay = tmp_path / "overlay.img"
    backend = CowOverlay(base=str(base), overlay=str(overlay))
    with blk_client(BlkDevice(backend)) as (srv, blk):
        assert blk.read(0, 4096) == pattern(7, MIB)[:4096]
        blk.write(1, b"N" * 1024)            # sectors 1 and 2 only
        got = blk.read(0, 4096)
        assert got[:512] == pattern(7, MIB)[:512]
        assert got[512:1536] == b"N" * 1024
        assert got[1536:] == pattern(7, MIB)[1536:4096]
        blk.flush()
    assert base.read_bytes() == pattern(7, MIB)
    assert (tmp_path / "overlay.img.map").exists()


def test_trace_example_records_requests(blk_client, image, tmp_path):
    trace = tmp_path / "trace.log"
    backend = TracingDisk(image=str(image), trace=str(trace))
    with blk_client(BlkDevice(backend)) as (srv, blk):
        blk.write(4, b"t" * 1024)
        blk.read(4, 1024)
        blk.flush()
    ops = [line.split()[1:4] for line in trace.read_text().splitlines()]
    # the guest's flush, then the device's own before it closes the back-end
    assert ops == [["write", "2048", "1024"], ["read", "2048", "1024"], ["flush", "0", "0"],
                   ["flush", "0", "0"]]


class AsyncDisk(BlockBackend):
    """An async back-end: requests stay in flight while coroutines run."""

    def __init__(self):
        self.data = bytearray(MIB)
        self.max_concurrent = 0
        self._running = 0

    def size(self):
        return len(self.data)

    async def read(self, offset, bufs):
        import asyncio
        self._running += 1
        self.max_concurrent = max(self.max_concurrent, self._running)
        await asyncio.sleep(0.01)
        for b in bufs:
            b[:] = self.data[offset:offset + len(b)]
            offset += len(b)
        self._running -= 1

    async def write(self, offset, bufs):
        for b in bufs:
            self.data[offset:offset + len(b)] = b
            offset += len(b)


class FailingDisk(BlockBackend):
    def size(self):
        return MIB

    def read(self, offset, bufs):
        raise OSError("medium error")

    def write(self, offset, bufs):
        pass


def test_async_python_backend_runs_requests_concurrently(blk_client):
    backend = AsyncDisk()
    with blk_client(BlkDevice(backend)) as (srv, blk):
        blk.write(0, pattern(3, 8192))
        reads = blk.execute([BlkRequest.read(i * 2, 1024) for i in range(8)], depth=8)
        assert [r.data for r in reads] == [pattern(3, 8192)[i * 1024:(i + 1) * 1024] for i in range(8)]
    assert backend.max_concurrent > 1


def test_python_backend_exception_is_an_io_error(blk_client):
    with blk_client(BlkDevice(FailingDisk())) as (srv, blk):
        (r,) = blk.execute([BlkRequest.read(0, 512)])
        assert r.status == BlkStatus.IOERR
        blk.write(0, b"still serving".ljust(512))


def test_python_backend_without_discard_does_not_offer_it():
    dev = BlkDevice(FailingDisk())
    assert not dev.features() & (1 << BlkFeature.DISCARD)
    assert BlkDevice(SparseDictDisk()).features() & (1 << BlkFeature.DISCARD)


def test_a_queue_that_never_runs_dry_is_served_to_the_end(tmp_path):
    """A driver that keeps the ring full (C load generator, QD 32) against a
    back-end slower than it (Python): the handler keeps saying "more" for
    longer than the worker's round budget, and the worker must not then
    sleep with the ring's notifications off (it did: the run stalled)."""
    from bench.backends import PreadDisk
    from vhostuser.blkload import run
    image = tmp_path / "busy.img"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    dev = BlkDevice(PreadDisk(str(image)))
    sock = str(tmp_path / "busy.sock")
    with BackgroundServer(dev, sock):
        result = run(sock, rw="randwrite", bs=4096, qd=32, seconds=3.0, warmup=0.2)
    dev.close()
    # Stalling took ~64k requests with the ring never empty (1000 rounds of
    # 64); this machine does them in well under the 3 s.
    assert result.get("error") is None, result
    assert result["errors"] == 0 and result["ios"] > 0, result


class ListDisk(BlockBackend):
    """Records what each call got: offset, buffer lengths; reads give the
    offset's pattern, a read at sector 7 fails, a write at sector 9 says
    UNSUPP."""

    def __init__(self):
        self.data = bytearray(MIB)
        self.calls = []

    def size(self):
        return len(self.data)

    def read(self, offset, bufs):
        self.calls.append(("read", offset, [len(b) for b in bufs]))
        if offset == 7 * 512:
            raise OSError("medium error")
        for b in bufs:
            b[:] = self.data[offset:offset + len(b)]
            offset += len(b)

    def write(self, offset, bufs):
        self.calls.append(("write", offset, [len(b) for b in bufs]))
        if offset == 9 * 512:
            raise Unsupported("no writes at sector 9")
        for b in bufs:
            self.data[offset:offset + len(b)] = b
            offset += len(b)


def test_python_batches_of_many_requests_one_and_many_buffers(blk_client):
    """A queue full of requests reaches Python in batches (up to 32 per
    call): single-buffer requests as slices of a mapping's view, split ones
    buffer by buffer, each with its own status."""
    backend = ListDisk()
    dev = BlkDevice(backend)
    sizes = []
    batch = dev._python_batch

    def counting(vq, reqs, n):
        sizes.append(n)
        return batch(vq, reqs, n)
    dev._python_batch = counting
    with blk_client(dev) as (srv, blk):
        writes = [BlkRequest.write(i * 8, pattern(i, 4096), segment=None if i % 3 else 1024)
                  for i in range(40)]
        assert all(r.status == BlkStatus.OK for r in blk.execute(writes, depth=40))
        reads = [BlkRequest.read(i * 8, 4096, segment=None if i % 2 else 512) for i in range(40)]
        done = blk.execute(reads, depth=40)
        assert [r.data for r in done] == [pattern(i, 4096) for i in range(40)]
        bad = blk.execute([BlkRequest.read(7, 512), BlkRequest.write(9, bytes(512)),
                           BlkRequest.read(0, 512)], depth=3)
        assert [r.status for r in bad] == [BlkStatus.IOERR, BlkStatus.UNSUPP, BlkStatus.OK]
    assert max(sizes) > 4 and max(sizes) <= 32
    split = [c for c in backend.calls if c[0] == "read" and c[2] == [512] * 8]
    assert len(split) == 20
    assert ("write", 0, [1024] * 4) in backend.calls and ("write", 8 * 512, [4096]) in backend.calls


@pytest.fixture
def disk_4kn(tmp_path):
    """A block device with 4096-byte logical sectors (a loop device over a
    file, made with `losetup -b 4096`), 8 MiB."""
    backing = tmp_path / "4kn.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MIB)
    if os.geteuid() != 0:
        pytest.skip("needs root for losetup")
    made = subprocess.run(["losetup", "-b", "4096", "-f", "--show", str(backing)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device: {made.stderr.strip()}")
    loop = made.stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


@pytest.mark.parametrize("aio", ["io_uring", "sync"])
def test_direct_io_on_4096_byte_sectors_tells_the_guest_and_refuses_smaller(blk_client,
                                                                             disk_4kn, aio):
    """O_DIRECT on storage whose logical block is 4096 bytes: the device
    says blk_size 4096 (so a guest does I/O in whole blocks), serves those,
    from unaligned guest buffers too (bounced), and fails smaller or
    misplaced I/O with IOERR, going on serving. (It said 512 before, and a
    guest's 512-byte reads, such as its partition table's at sector 1,
    failed.)"""
    dev = BlkDevice(FileBackend(disk_4kn, direct=True), aio=aio)
    with blk_client(dev) as (srv, blk):
        assert blk.config.blk_size == 4096 and blk.config.physical_block_exp == 0
        data = pattern(7, 8192)
        assert blk.execute([BlkRequest.write(8, data)])[0].ok
        assert blk.read(8, 8192) == data
        misfits = blk.execute([BlkRequest.read(1, 512), BlkRequest.read(8, 512),
                               BlkRequest.write(4, pattern(3, 4096))])
        assert [r.status for r in misfits] == [BlkStatus.IOERR] * 3
        assert blk.read(8, 8192) == data
    with open(disk_4kn, "rb") as f:
        f.seek(8 * 512)
        assert f.read(8192) == data


def test_direct_io_on_512_byte_sectors_keeps_blk_size_512(blk_client, image):
    try:
        dev = BlkDevice(FileBackend(str(image), direct=True))
    except BackendError as exc:
        pytest.skip(f"no O_DIRECT where the tests run: {exc}")
    with blk_client(dev) as (srv, blk):
        assert blk.config.blk_size == 512
        assert blk.execute([BlkRequest.write(1, pattern(1, 512))])[0].ok
        assert blk.read(1, 512) == pattern(1, 512)


class KeepingDisk(BlockBackend):
    """Misuses the API: keeps the buffers of each request (async or not)."""

    def __init__(self, is_async=False):
        self.data = bytearray(MIB)
        self.kept = []
        if is_async:
            self.read, self.write = self._aread, self._awrite

    def size(self):
        return len(self.data)

    def read(self, offset, bufs):
        self.kept.append(bufs)
        for b in bufs:
            b[:] = self.data[offset:offset + len(b)]
            offset += len(b)

    def write(self, offset, bufs):
        self.kept.append(bufs)

    async def _aread(self, offset, bufs):
        import asyncio
        await asyncio.sleep(0)
        KeepingDisk.read(self, offset, bufs)

    async def _awrite(self, offset, bufs):
        KeepingDisk.write(self, offset, bufs)


@pytest.mark.parametrize("is_async", [False, True], ids=["plain", "async"])
@pytest.mark.parametrize("segment", [None, 512], ids=["one-buffer", "split"])
def test_a_buffer_kept_after_its_request_completed_is_released(blk_client, is_async, segment):
    """docs/python-api.md: bufs are valid only until the method returns (or
    its coroutine finishes). One kept longer wrote into the guest's memory,
    which the guest had reused since; it is now released (ValueError)."""
    backend = KeepingDisk(is_async)
    with blk_client(BlkDevice(backend)) as (srv, blk):
        (r,) = blk.execute([BlkRequest.read(0, 2048, segment=segment)])
        assert r.status == BlkStatus.OK
        blk.execute([BlkRequest.write(8, bytes(1024), segment=segment)])
        assert len(backend.kept) == 2
        for bufs in backend.kept:
            for b in bufs:
                with pytest.raises(ValueError):
                    b[:4] = b"evil"
                with pytest.raises(ValueError):
                    bytes(b)
