"""The C file back-end's I/O path (csrc/vu_blk_uring.c, "Choosing the I/O path"):
what the default picks for where the image lives, that every choice moves
the right bytes, and that a file system refusing RWF_NOWAIT for writes
(ext4's buffered writes) takes it away from writes only."""
import os
import subprocess
import sys
import time

import pytest

from vhostuser.blk.spec import OUTHDR, BlkStatus, BlkType
from vhostuser.native import ffi, lib
from vhostuser_devkit.ringlab import Lab

S = BlkStatus
T = BlkType
CAPACITY = 2048   # sectors (1 MiB)
INLINE, NOWAIT, URING = lib.VU_BLK_IO_INLINE, lib.VU_BLK_IO_NOWAIT, lib.VU_BLK_IO_URING


@pytest.fixture
def lab():
    lab = Lab(nqueues=1, size=64, prepare=lib.vu_blk_prepare_queue)
    yield lab
    lab.close()


def fstype(path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                          text=True).stdout.strip()


class FileDev:
    """A C file back-end over `path` (created with `data`), io_uring on."""

    def __init__(self, path, data: bytes, direct: bool = False):
        path.write_bytes(data)
        self.fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
        self.b = lib.vu_blk_new(lib.VU_BLK_BACKEND_FILE)
        lib.vu_blk_set_file(self.b, self.fd, direct)
        self.uring = lib.vu_blk_set_uring(self.b, True)
        if self.uring < 0:
            self.close()
            pytest.skip("io_uring not available on this kernel")
        self.b.lim.capacity = CAPACITY
        self.b.lim.writeback = True

    def close(self):
        lib.vu_blk_free(self.b)
        os.close(self.fd)


@pytest.fixture
def filedev(tmp_path):
    devs = []

    def make(data=None, direct=False, where=None):
        d = FileDev((where or tmp_path) / f"disk{len(devs)}.img",
                    data if data is not None else pattern(), direct)
        devs.append(d)
        return d
    yield make
    for d in devs:
        d.close()


def pattern() -> bytes:
    return bytes((i * 7 + i // 512) & 0xFF for i in range(CAPACITY * 512))


def request(lab, t, sector, data=None, length=4096, offset=0):
    """One chain on queue 0: header, data (at `offset` past a 4 KiB boundary),
    status. Returns (status gpa, data gpa)."""
    h = lab.alloc(16)
    lab.write(h, OUTHDR.pack(t, 0, sector))
    d = lab.alloc(length + 4096, 4096) + offset
    if data is not None:
        lab.write(d, data)
    s = lab.alloc(1)
    lab.write(s, b"\xff")
    head = lab.add_split_chain(0, [(h, 16, False), (d, length, t == T.IN), (s, 1, True)])
    lab.publish_split(0, [head])
    return s, d


def serve(lab, dev, status_gpa, timeout=10.0) -> tuple[int, int]:
    """Runs the handler until the request is answered; returns (status, the
    number of handler calls it took)."""
    vq = lab.vq(0)
    vq.enabled = True
    calls = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lab.run_handler(lib.vu_blk_handler, dev.b)
        calls += 1
        if lab.read(status_gpa, 1)[0] != 0xFF:
            return lab.read(status_gpa, 1)[0], calls
        time.sleep(0.005)
    raise AssertionError("request never answered")


def test_default_on_a_page_cache_file_system_tries_page_cache_hits_inline(tmp_path, filedev):
    if fstype(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("needs a file system with a page cache")
    dev = filedev()
    assert dev.uring == 0
    assert (dev.b.use_uring, dev.b.read_io, dev.b.write_io) == (True, NOWAIT, NOWAIT)


def test_default_on_tmpfs_is_inline_with_mapped_reads(filedev):
    if not os.path.isdir("/dev/shm") or fstype("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    from pathlib import Path
    import tempfile
    where = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        dev = filedev(where=where)
        assert dev.uring == 1
        assert (dev.b.use_uring, dev.b.read_io, dev.b.write_io) == (False, INLINE, INLINE)
        assert dev.b.map.len > 0
    finally:
        for f in where.iterdir():
            f.unlink()
        where.rmdir()


def test_default_with_o_direct_is_io_uring(tmp_path, filedev):
    try:
        dev = filedev(direct=True)
    except OSError as exc:
        pytest.skip(f"O_DIRECT not supported here: {exc}")
    assert (dev.b.read_io, dev.b.write_io) == (URING, URING)
    # RWF_NOWAIT would still wait for the device with O_DIRECT: refused.
    assert lib.vu_blk_set_io_path(dev.b, NOWAIT, URING) < 0
    assert lib.vu_blk_set_io_path(dev.b, URING, NOWAIT) < 0
    assert lib.vu_blk_set_io_path(dev.b, INLINE, URING) == 0


def test_unknown_io_path_is_refused(filedev):
    dev = filedev()
    assert lib.vu_blk_set_io_path(dev.b, 3, INLINE) < 0
    assert lib.vu_blk_set_io_path(dev.b, INLINE, -1) < 0


def test_refused_nowait_writes_leave_reads_inline(lab, tmp_path, filedev):
    """ext4 answers buffered pwritev2(RWF_NOWAIT) with EOPNOTSUPP. That
    used to switch RWF_NOWAIT off for reads too, sending every page-cache
    hit through io_uring afterwards."""
    probe = tmp_path / "probe"
    probe.write_bytes(bytes(4096))
    fd = os.open(probe, os.O_RDWR)
    try:
        os.pwritev(fd, [bytes(4096)], 0, os.RWF_NOWAIT)
        pytest.skip("this file system takes RWF_NOWAIT writes (the fallback is not used)")
    except OSError as exc:
        if exc.errno == 11:     # EAGAIN: supported, just not now
            pytest.skip("this file system takes RWF_NOWAIT writes")
        assert exc.errno == 95  # EOPNOTSUPP
    finally:
        os.close(fd)
    dev = filedev()
    # Out of the page cache: a write to pages in it goes through the mapping
    # and never tries RWF_NOWAIT.
    os.fsync(dev.fd)
    os.posix_fadvise(dev.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    data = bytes([0x5A]) * 4096
    s, _ = request(lab, T.OUT, 8, data)
    assert serve(lab, dev, s)[0] == S.OK
    assert dev.b.map.mapped_writes == 0
    assert dev.b.write_io == INLINE      # measured: beats io_uring's io-wq punts (RESULTS.md)
    assert dev.b.read_io == NOWAIT
    s, d = request(lab, T.IN, 8)
    status, calls = serve(lab, dev, s)
    assert status == S.OK and calls == 1           # answered inline, in the same call
    assert lab.read(d, 4096) == data


@pytest.mark.parametrize("read_io", ["INLINE", "NOWAIT", "URING"])
@pytest.mark.parametrize("write_io", ["INLINE", "NOWAIT", "URING"])
def test_every_io_path_moves_the_right_bytes(lab, tmp_path, filedev, read_io, write_io):
    dev = filedev()
    assert lib.vu_blk_set_io_path(dev.b, getattr(lib, f"VU_BLK_IO_{read_io}"),
                                  getattr(lib, f"VU_BLK_IO_{write_io}")) == 0
    expect = bytearray(pattern())
    for i, sector in enumerate((0, 8, 100, 2040)):
        data = bytes([i + 1]) * 4096
        s, _ = request(lab, T.OUT, sector, data)
        assert serve(lab, dev, s)[0] == S.OK
        expect[sector * 512:sector * 512 + 4096] = data
    for sector in (0, 4, 8, 96, 2040):
        s, d = request(lab, T.IN, sector)
        assert serve(lab, dev, s)[0] == S.OK
        assert lab.read(d, 4096) == expect[sector * 512:sector * 512 + 4096]
    with open(dev_path(tmp_path), "rb") as f:
        assert f.read() == bytes(expect)


def dev_path(tmp_path):
    return tmp_path / "disk0.img"


def test_io_uring_on_tmpfs_when_asked(lab, filedev):
    """The default keeps io_uring off on tmpfs; asking for it (to measure
    it) starts it, and it moves the right bytes."""
    if fstype("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    from pathlib import Path
    import tempfile
    where = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        dev = filedev(where=where)
        assert not dev.b.use_uring
        assert lib.vu_blk_set_io_path(dev.b, URING, URING) == 0
        assert dev.b.use_uring
        data = bytes([0xC3]) * 4096
        s, _ = request(lab, T.OUT, 16, data)
        assert serve(lab, dev, s)[0] == S.OK
        s, d = request(lab, T.IN, 16)
        assert serve(lab, dev, s)[0] == S.OK
        assert lab.read(d, 4096) == data
    finally:
        for f in where.iterdir():
            f.unlink()
        where.rmdir()


def test_o_direct_with_unaligned_buffers_is_bounced_not_failed(lab, tmp_path, filedev):
    """io_uring with O_DIRECT takes only aligned buffers; a guest buffer that
    is not is bounced in the worker instead of failing with EINVAL."""
    try:
        dev = filedev(direct=True)
    except OSError as exc:
        pytest.skip(f"O_DIRECT not supported here: {exc}")
    data = bytes(range(256)) * 16
    s, _ = request(lab, T.OUT, 24, data, offset=100)
    assert serve(lab, dev, s)[0] == S.OK
    s, d = request(lab, T.IN, 24, offset=36)
    assert serve(lab, dev, s)[0] == S.OK
    assert lab.read(d, 4096) == data


@pytest.mark.parametrize("read_io,write_io", [(NOWAIT, NOWAIT), (URING, URING)])
def test_a_queue_without_an_io_uring_ring_does_its_io_in_the_worker(tmp_path, read_io, write_io):
    """io_uring on, but the queue gets no ring (a sandbox whose pool of rings
    made before its filter is empty): every request is done in the worker.
    A read that missed the page cache used to be handed to the missing ring.
    In a child process: sealing the pool is for the whole process."""
    script = f"""
import os, sys
sys.path[:0] = [{os.path.dirname(__file__)!r}]
from test_blk_io_path import CAPACITY, FileDev, T, S, request, serve
from pathlib import Path
from vhostuser.native import ffi, lib
from vhostuser_devkit.ringlab import Lab
image = Path({str(tmp_path)!r}) / "sparse.img"
with open(image, "wb") as f:
    f.truncate(CAPACITY * 512)          # holes: never resident, reads miss the mapping
dev = FileDev.__new__(FileDev)
dev.fd = os.open(image, os.O_RDWR)
dev.b = lib.vu_blk_new(lib.VU_BLK_BACKEND_FILE)
lib.vu_blk_set_file(dev.b, dev.fd, False)
assert lib.vu_blk_set_uring(dev.b, True) >= 0
assert lib.vu_blk_set_io_path(dev.b, {read_io}, {write_io}) == 0
dev.b.lim.capacity = CAPACITY
dev.b.lim.writeback = True
lib.vu_uring_pool_seal()                # no ring can be made from here on
assert lib.vu_uring_pool_size() == 0
lab = Lab(nqueues=1, size=64, prepare=lib.vu_blk_prepare_queue)
s, _ = request(lab, T.OUT, 16, data=b"w" * 4096)
assert serve(lab, dev, s)[0] == S.OK
s, d = request(lab, T.IN, 16)
assert serve(lab, dev, s)[0] == S.OK
assert lab.read(d, 4096) == b"w" * 4096
s, d = request(lab, T.IN, 64)
assert serve(lab, dev, s)[0] == S.OK
assert lab.read(d, 4096) == bytes(4096)
lab.close()
dev.close()
print("served")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "served" in r.stdout, (r.returncode, r.stdout, r.stderr)


@pytest.fixture
def round_unlocked():
    """Sets the test hook vu_fault_round_unlocked (csrc/vu_fault.h) to fn for
    the test: it runs where a file engine's round dropped the device lock,
    before what it queued goes to io_uring."""
    keep = []

    def install(fn):
        cb = ffi.callback("void(void)", fn)
        keep.append(cb)
        lib.vu_fault_round_unlocked = cb
    yield install
    lib.vu_fault_round_unlocked = ffi.NULL


def test_a_write_orphaned_before_its_io_uring_entry_is_submitted_never_reaches_the_file(
        lab, tmp_path, filedev, round_unlocked):
    """The control plane gives up on the requests in flight (a reset, a
    disconnect) while the worker's round has its io_uring entries queued but
    not yet submitted. A write orphaned then must not start: the front-end
    may resubmit it, and the stale copy could land after a newer write. It
    used to be submitted anyway; its entry now goes as a no-op, and that
    no-op's short completion is not redone synchronously either."""
    dev = filedev()
    assert lib.vu_blk_set_io_path(dev.b, URING, URING) == 0
    orphaned = []

    def reset():
        lib.vu_dev_wrlock(lab.dev)
        lib.vu_vq_reset(lab.vq(0))          # what was in flight is an orphan now
        orphaned.append((lab.vq(0).inflight, lib.vu_vq_inflight(lab.vq(0))))
        lib.vu_dev_unlock(lab.dev)
    round_unlocked(reset)
    request(lab, T.OUT, 16, b"X" * 4096)
    vq = lab.vq(0)
    vq.enabled = True
    deadline = time.monotonic() + 10
    lab.run_handler(lib.vu_blk_handler, dev.b)
    round_unlocked(lambda: None)
    while vq.inflight and time.monotonic() < deadline:
        lab.run_handler(lib.vu_blk_handler, dev.b)
        time.sleep(0.005)
    assert orphaned == [(1, 0)]                  # in flight, an orphan
    assert vq.inflight == 0                      # its completion released it
    with open(dev_path(tmp_path), "rb") as f:
        assert f.read() == pattern()


def serve_with_uring_failing(tmp_path, err: str, sectors, then: str = "", timeout=30):
    """A child process serves, on an io_uring file device in write-through
    mode (a group sync per round) whose io_uring_enter fails with errno
    `err` (test hook vu_fault_uring_enter_errno, csrc/vu_fault.h): a write
    and its read back at each of `sectors` (the i-th writes byte i + 1),
    a FLUSH, then the statements in `then`; it checks nothing stays in
    flight and prints "served". In a child: a hang there is a timeout, not
    a stuck test run. Returns the child's CompletedProcess, once the image
    is checked."""
    script = f"""
import errno, os, sys
sys.path[:0] = [{os.path.dirname(__file__)!r}]
from test_blk_io_path import CAPACITY, FileDev, T, S, URING, pattern, request, serve
from pathlib import Path
from vhostuser.native import lib
from vhostuser_devkit.ringlab import Lab
dev = FileDev(Path({str(tmp_path)!r}) / "disk.img", pattern())
assert lib.vu_blk_set_io_path(dev.b, URING, URING) == 0
dev.b.lim.writeback = False
lab = Lab(nqueues=1, size=64, prepare=lib.vu_blk_prepare_queue)
lib.vu_fault_uring_enter_errno = errno.{err}
for i, sector in enumerate({tuple(sectors)!r}):
    s, _ = request(lab, T.OUT, sector, data=bytes([i + 1]) * 4096)
    assert serve(lab, dev, s)[0] == S.OK
    s, d = request(lab, T.IN, sector)
    assert serve(lab, dev, s)[0] == S.OK
    assert lab.read(d, 4096) == bytes([i + 1]) * 4096
s, _ = request(lab, T.FLUSH, 0, length=0)
assert serve(lab, dev, s)[0] == S.OK
{then}
assert lab.vq(0).inflight == 0
lab.close()
dev.close()
print("served")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0 and "served" in r.stdout, (r.returncode, r.stdout, r.stderr)
    return r


def assert_written(tmp_path, sectors):
    """The image holds byte i + 1 at the i-th of `sectors` (4 KiB each)."""
    with open(tmp_path / "disk.img", "rb") as f:
        image = f.read()
    for i, sector in enumerate(sectors):
        assert image[sector * 512:sector * 512 + 4096] == bytes([i + 1]) * 4096


def test_an_io_uring_that_fails_for_good_leaves_the_queue_serving_synchronously(tmp_path):
    """io_uring_enter failing every time with an error other than EINTR,
    EAGAIN or EBUSY: what the kernel did not take is done in the worker, a
    write-through write's group sync included, new requests skip the ring,
    the failure is logged once, and freeing the device does not wait for
    completions that never come. It used to leave them in flight for ever,
    and the drain at the end spun on io_uring_enter."""
    r = serve_with_uring_failing(tmp_path, "EINVAL", (16, 32, 48), timeout=60)
    assert r.stderr.count("io_uring_enter failed (Invalid argument)") == 1, r.stderr
    assert_written(tmp_path, (16, 32, 48))


@pytest.mark.parametrize("err", ["EAGAIN", "EBUSY"])
def test_an_io_uring_short_of_resources_for_a_while_leaves_the_queue_serving(tmp_path, err):
    """io_uring_enter refusing submissions for a while with EAGAIN (the
    kernel could not allocate for them: memory pressure) or EBUSY (its
    completion queue overflowed; our bound on entries in flight rules that
    out, but a kernel may say so): what it did not take is done in the
    worker, a write-through write's group sync included, and the ring is
    not given up on: used again once the kernel takes entries (here: the
    next failure, EINVAL, is the one logged). The submission used to be
    retried without end, the worker spinning in io_uring_enter and its
    queues stuck."""
    then = """lib.vu_fault_uring_enter_errno = errno.EINVAL
s, _ = request(lab, T.OUT, 48, data=bytes([3]) * 4096)
assert serve(lab, dev, s)[0] == S.OK"""
    r = serve_with_uring_failing(tmp_path, err, (16, 32), then)
    assert r.stderr.count("io_uring_enter failed") == 1, r.stderr
    assert r.stderr.count("io_uring_enter failed (Invalid argument)") == 1, r.stderr
    assert_written(tmp_path, (16, 32, 48))
