"""The Ceph RBD back-end against a real one-node cluster (one monitor, one
OSD on a sparse file) that the module starts, driven by our front-end:
data round trips checked with the ``rbd`` tool, read-only images, and the
cluster going away mid-I/O (the guest gets I/O errors in bounded time, the
process keeps serving, nothing acknowledged is lost). close() is also
checked with librbd replaced by a fake (no cluster needed).

Needs Debian's ceph-mon and ceph-osd packages; skipped without them, or if
the cluster can't start here (the reason quotes the daemons' logs), unless
VHOSTUSER_REQUIRE_CEPH=1 makes that a failure.
"""
import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import threading
import time

import pytest

from vhostuser.blk import BlkDevice, BlkFeature, BlockBackend
from vhostuser.frontend import BlkClient, BlkRequest, BlkStatus, Frontend
from vhostuser.server import Server
from vhostuser_devkit.ceph import PACKAGES, CephCluster, CephError, missing_tools
from vhostuser.testing.server import BackgroundServer, served_disk
from vhostuser_devkit.patterns import pattern
from vhostuser_devkit.program import BackendProgram

MIB = 1 << 20
IMAGE_SIZE = 64 * MIB
OBJECT = 4 * MIB            # rbd's default object size
LOSS_TIMEOUT = 3.0          # the back-end's timeout in the connection-loss tests
SLACK = 3.0                 # what we allow on top of it

_names = itertools.count()


def _unavailable(reason: str):
    if os.environ.get("VHOSTUSER_REQUIRE_CEPH") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def ceph():
    missing = missing_tools()
    if missing:
        _unavailable(f"Ceph not installed: no {', '.join(missing)} "
                     f"(apt-get install --no-install-recommends {' '.join(PACKAGES)})")
    try:
        from vhostuser.blk.rbd import load
        load()
    except Exception as exc:        # RbdError: librbd1 missing
        _unavailable(str(exc))
    cluster = CephCluster()
    try:
        cluster.start()
    except CephError as exc:
        _unavailable(f"the one-node Ceph cluster did not start: {exc}")
    print(f"\nceph: {cluster.objectstore} OSD, up in {cluster.startup_seconds:.1f}s"
          + (f" (bluestore failed: {cluster.fallback_reason})" if cluster.fallback_reason else ""))
    yield cluster
    cluster.stop()


@pytest.fixture
def image(ceph):
    """A fresh 64 MiB image: ``pool/name``."""
    return ceph.create_image(f"img{next(_names)}", IMAGE_SIZE)


def rbd_backend(ceph, spec, **kw):
    from vhostuser.blk.rbd import RbdBackend
    return RbdBackend.from_spec(spec, conf=ceph.conf_path, **kw)


def served(tmp_path, device, name="rbd.sock", **setup):
    """(BackgroundServer, BlkClient) for device; closes the device afterwards."""
    return served_disk(device, str(tmp_path / name), **setup)


@contextlib.contextmanager
def also_served(srv: BackgroundServer, device, path):
    """A second device on the same event loop as ``srv``'s: what a daemon
    serving several disks does."""
    server = Server(device, path=path)
    server.open()
    task = asyncio.run_coroutine_threadsafe(server.serve(), srv.loop)
    try:
        with Frontend.connect(path) as fe:
            yield BlkClient.setup(fe)
    finally:
        srv.loop.call_soon_threadsafe(server.close)
        task.cancel()      # an accept() in progress may not notice the close


class AsyncRamDisk(BlockBackend):
    """A Python back-end whose requests run on the event loop."""

    def __init__(self, size: int):
        self.data = bytearray(size)

    def size(self) -> int:
        return len(self.data)

    async def read(self, offset, bufs):
        await asyncio.sleep(0)
        for b in bufs:
            b[:] = self.data[offset:offset + len(b)]
            offset += len(b)

    async def write(self, offset, bufs):
        await asyncio.sleep(0)
        for b in bufs:
            self.data[offset:offset + len(b)] = b
            offset += len(b)


# -- data ---------------------------------------------------------------------------

def test_writes_and_reads_of_many_shapes_land_in_the_image(ceph, image, tmp_path):
    # (sector, length, descriptor size): odd sizes, object boundaries
    # crossed, many small descriptors, 1 MiB requests; no two overlap.
    shapes = [(0, 512, None), (1, 4096, None), (16, 65536, 512), (OBJECT // 512 - 3, 8192, 1536),
              (3 * OBJECT // 512 - 1, 1 * MIB, 4096), (IMAGE_SIZE // 512 - 8, 4096, 1024),
              (20000, 3 * 512, None)]
    with served(tmp_path, BlkDevice(rbd_backend(ceph, image))) as (srv, blk):
        assert blk.capacity == IMAGE_SIZE // 512
        assert blk.fe.has(BlkFeature.FLUSH) and blk.fe.has(BlkFeature.DISCARD)
        writes = [BlkRequest.write(s, pattern(i, n), segment=seg)
                  for i, (s, n, seg) in enumerate(shapes)]
        assert [r.status for r in blk.execute(writes, depth=8)] == [BlkStatus.OK] * len(shapes)
        blk.flush()
        reads = blk.execute([BlkRequest.read(s, n, segment=seg) for s, n, seg in shapes], depth=8)
        assert [r.data for r in reads] == [pattern(i, n) for i, (_, n, _) in enumerate(shapes)]
        # many requests in flight at once
        batch = [BlkRequest.write(40000 + 8 * i, pattern(100 + i, 4096)) for i in range(64)]
        assert all(r.ok for r in blk.execute(batch, depth=64))
        back = blk.execute([BlkRequest.read(40000 + 8 * i, 4096) for i in range(64)], depth=64)
        assert [r.data for r in back] == [pattern(100 + i, 4096) for i in range(64)]
    # Checked by the rbd tool, not our code.
    data = ceph.export(image)
    assert len(data) == IMAGE_SIZE
    for i, (s, n, _) in enumerate(shapes):
        assert data[s * 512:s * 512 + n] == pattern(i, n), shapes[i]
    for i in range(64):
        off = (40000 + 8 * i) * 512
        assert data[off:off + 4096] == pattern(100 + i, 4096)


def test_write_zeroes_and_discard(ceph, image, tmp_path):
    with served(tmp_path, BlkDevice(rbd_backend(ceph, image))) as (srv, blk):
        whole = pattern(1, 3 * OBJECT)
        for base in range(0, len(whole), 4 * MIB):    # what fits the 8 MiB of guest memory
            assert all(r.ok for r in blk.execute(
                [BlkRequest.write(off // 512, whole[off:off + MIB])
                 for off in range(base, base + 4 * MIB, MIB)], depth=4))
        blk.write_zeroes([(8, 16)])                              # keeps allocation
        blk.write_zeroes([(OBJECT // 512 - 4, 12)], unmap=True)  # across an object boundary
        blk.discard([(2 * OBJECT // 512, OBJECT // 512)])        # one whole object
        blk.flush()
        assert blk.read(8, 16 * 512) == bytes(16 * 512)
        assert blk.read(0, 8 * 512) == pattern(1, 4096)
    data = ceph.export(image)
    expect = bytearray(whole)
    expect[8 * 512:24 * 512] = bytes(16 * 512)
    expect[OBJECT - 2048:OBJECT + 4096] = bytes(6144)
    # rbd discards a whole object for real: it reads back as zeroes
    expect[2 * OBJECT:3 * OBJECT] = bytes(OBJECT)
    assert data[:3 * OBJECT] == bytes(expect)


def test_read_only_image_refuses_writes(ceph, image, tmp_path):
    ceph.rbd("import", "-", image + "-ro", input=pattern(7, MIB))
    ro = image + "-ro"
    with served(tmp_path, BlkDevice(rbd_backend(ceph, ro, read_only=True))) as (srv, blk):
        assert blk.fe.has(BlkFeature.RO)
        assert blk.read(0, 4096) == pattern(7, 4096)
        bad = blk.execute([BlkRequest.write(0, b"x" * 512)])
        assert bad[0].status == BlkStatus.IOERR
    # librbd itself refuses too, when the device is told to allow writes
    with served(tmp_path, BlkDevice(rbd_backend(ceph, ro, read_only=True), read_only=False),
                name="rw.sock") as (srv, blk):
        assert [r.status for r in blk.execute([BlkRequest.write(0, b"x" * 512)])] == \
            [BlkStatus.IOERR]
        assert blk.read(0, 512) == pattern(7, 512)
    assert ceph.export(ro) == pattern(7, MIB)


def test_image_with_a_partial_last_sector_serves_its_whole_sectors(ceph, image, tmp_path,
                                                                   caplog):
    """A virtio-blk disk is whole sectors: the image's tail is left out, and
    the log says so (size() must be a multiple of 512)."""
    odd = image + "-odd"
    ceph.rbd("import", "-", odd, input=pattern(8, MIB + 700))
    backend = rbd_backend(ceph, odd)
    assert backend.size() == MIB + 512
    assert "its last 188 bytes are not a whole 512-byte sector" in caplog.text
    with served(tmp_path, BlkDevice(backend)) as (srv, blk):
        assert blk.capacity == MIB // 512 + 1
        assert blk.read(MIB // 512, 512) == pattern(8, MIB + 700)[MIB:MIB + 512]


def test_open_errors_are_precise(ceph, image):
    from vhostuser.blk.rbd import RbdError, RbdBackend
    with pytest.raises(RbdError, match="No such file"):
        rbd_backend(ceph, "rbd/no-such-image")
    with pytest.raises(RbdError, match="pool nopool"):
        rbd_backend(ceph, "nopool/x")
    with pytest.raises(ValueError):
        rbd_backend(ceph, "just-a-name")
    # No monitor at that address: gives up after the timeout.
    t0 = time.monotonic()
    with pytest.raises(RbdError, match="connecting"):
        RbdBackend("x", mon_host="v2:127.0.0.1:9", timeout=2, conf=os.devnull)
    assert time.monotonic() - t0 < 2 + SLACK


# -- the command ------------------------------------------------------------------------

def test_vhostuser_blk_rbd_command(ceph, image, tmp_path):
    sock = str(tmp_path / "cli.sock")
    with BackendProgram("vhostuser.cli.blk", "--rbd", image, "--rbd-conf", ceph.conf_path,
                        "--rbd-id", "admin", "--remote-timeout", "5", socket=sock,
                        log=str(tmp_path / "cli.log"), timeout=20) as prog:
        with Frontend.connect(sock, wait=20) as fe:
            blk = BlkClient.setup(fe)
            assert blk.capacity == IMAGE_SIZE // 512
            blk.write(64, pattern(3, 8192))
            blk.flush()
            assert blk.read(64, 8192) == pattern(3, 8192)
        assert prog.terminate(30) == 0, prog.output()
    assert ceph.export(image)[64 * 512:64 * 512 + 8192] == pattern(3, 8192)
    bad = subprocess.run([sys.executable, "-m", "vhostuser.cli.blk", "--socket-path", sock,
                          "--rbd", "rbd/missing", "--rbd-conf", ceph.conf_path],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.strip() == ("vhostuser-blk: --rbd rbd/missing: image rbd/missing: "
                                  "No such file or directory")


@pytest.fixture
def ceph_daemon(ceph, workdir):
    """A daemon that may read the test cluster's ceph.conf and keyring (its
    sandbox shows it only the directories it is allowed)."""
    from vhostuser_devkit.daemon import DaemonProcess
    d = DaemonProcess(workdir, allow_dirs=(ceph.dir,))
    yield d
    rc = d.terminate()
    assert rc == 0, d.output()
    assert "Traceback" not in d.output(), d.output()


def test_daemon_rbd_export_added_with_vhostuser_ctl(ceph, image, ceph_daemon):
    """vhostuser-ctl add-blk --rbd with vhostuser-blk's options of the same
    names; what was written is in the image."""
    daemon = ceph_daemon
    daemon.ctl("add-blk", "r0", "--socket-path", "r0.sock", "--rbd", image,
               "--rbd-conf", ceph.conf_path, "--rbd-id", "admin", "--remote-timeout", "5")
    spec = daemon.call("describe", name="r0")["spec"]
    assert (spec["rbd"], spec["rbd_conf"], spec["rbd_id"]) == (image, ceph.conf_path, "admin")
    with Frontend.connect(daemon.path("r0.sock"), wait=20) as fe:
        blk = BlkClient.setup(fe)
        assert blk.capacity == IMAGE_SIZE // 512
        blk.write(128, pattern(11, 16384))
        blk.flush()
        assert blk.read(128, 16384) == pattern(11, 16384)
    daemon.ctl("remove", "r0")
    assert ceph.export(image)[128 * 512:128 * 512 + 16384] == pattern(11, 16384)
    r = daemon.ctl("add-blk", "r1", "--socket-path", "r1.sock", "--rbd", "rbd/missing",
                   "--rbd-conf", ceph.conf_path, check=False)
    assert r.returncode == 1 and r.stderr.startswith("vhostuser-ctl: backend-error: r1:"), \
        r.stderr
    assert daemon.call("list") == []


def test_rbd_export_added_to_a_sandboxed_daemon(ceph, image, tmp_path):
    """The daemon confined before it ever heard of the image: librados
    starts inside the sandbox (its ceph.conf and keyring under --allow-dir,
    in the view read-only), serves, and goes with remove."""
    from vhostuser_devkit.daemon import DaemonProcess
    from vhostuser_devkit.sandbox import wait_sandboxed
    workdir = tmp_path / "d"
    workdir.mkdir()
    daemon = DaemonProcess(str(workdir), allow_dirs=(ceph.dir,), backends="ramdisk,rbd")
    try:
        wait_sandboxed(daemon.proc.pid)
        daemon.call("add", type="blk", name="r", socket=daemon.path("r.sock"), rbd=image,
                    rbd_conf=ceph.conf_path, remote_timeout=10)
        with Frontend.connect(daemon.path("r.sock"), wait=20) as fe:
            blk = BlkClient.setup(fe)
            blk.write(128, pattern(5, 8192))
            blk.flush()
            assert blk.read(128, 8192) == pattern(5, 8192)
        daemon.call("remove", name="r")
    finally:
        rc = daemon.terminate()
    assert rc == 0, daemon.output()
    assert "Traceback" not in daemon.output(), daemon.output()
    assert ceph.export(image)[128 * 512:128 * 512 + 8192] == pattern(5, 8192)


def test_outage_shorter_than_the_timeout_is_ridden_out(ceph, image, tmp_path):
    """librados resends what the OSD missed: the guest sees only a delay."""
    backend = rbd_backend(ceph, image, timeout=10)
    with served(tmp_path, BlkDevice(backend)) as (srv, blk):
        ceph.pause_osd()
        try:
            reqs = [BlkRequest.write(8 * i, pattern(50 + i, 4096)) for i in range(4)]
            t0 = time.monotonic()
            blk.submit(reqs)
            time.sleep(1.5)
        finally:
            ceph.resume_osd()
        done = []
        while len(done) < len(reqs):
            done += blk.reap(timeout=10)
        assert all(r.ok for r in reqs)
        assert 1.5 <= time.monotonic() - t0 < 10
        assert blk.read(8, 4096) == pattern(51, 4096)


# -- the write cache ---------------------------------------------------------------------

def _recorded(rlog):
    from vhostuser.blk.recordlog import Kind, RecordLog
    with RecordLog(rlog) as log:
        done = {e.id for e in log.entries if e.kind == Kind.DONE and e.status == 0}
        return [e.kind.name for e in log.entries if e.kind != Kind.DONE and e.id in done]


def test_librbd_cache_is_off_and_write_through_writes_are_on_the_osds(ceph, image, tmp_path):
    """Our rbd_cache=false is what the open image runs with, so a write the
    guest sees completed is on the OSDs: another client (the rbd tool)
    reads it back with no flush in between."""
    from vhostuser.blk.record import RecordingBackend
    backend = rbd_backend(ceph, image)
    config = backend.image_config()
    assert config["rbd_cache"] == ("false", "config")
    assert config["rbd_disable_zero_copy_writes"][0] == "true"
    assert not backend.cache_enabled
    rlog = str(tmp_path / "rbd.rlog")
    with served(tmp_path, BlkDevice(RecordingBackend(backend, rlog))) as (srv, blk):
        blk.set_writeback(False)
        for i in range(2):
            blk.write(8 * i, pattern(60 + i, 4096))
            assert ceph.export(image)[4096 * i:4096 * (i + 1)] == pattern(60 + i, 4096)
    assert _recorded(rlog) == ["FUA", "FUA", "FLUSH"]      # the flush: the one before close


def counting_rbd_backend(ceph, spec):
    """An RbdBackend that counts the flushes it sends to librbd."""
    from vhostuser.blk.rbd import RbdBackend

    class Counting(RbdBackend):
        flushes = 0

        async def flush(self):
            self.flushes += 1
            await super().flush()
    return Counting.from_spec(spec, conf=ceph.conf_path)


def test_image_settings_turning_the_cache_on_make_write_through_writes_flush(
        ceph, image, tmp_path):
    """Image settings override the client's: with rbd_cache=true set on the
    image, each write-through write is followed by a flush, and is on the
    OSDs when it completes."""
    ceph.rbd("config", "image", "set", image, "rbd_cache", "true")
    backend = counting_rbd_backend(ceph, image)
    assert backend.image_config()["rbd_cache"] == ("true", "image")
    assert backend.cache_enabled
    with served(tmp_path, BlkDevice(backend)) as (srv, blk):
        blk.write(0, pattern(70, 4096))          # write-back: no flush of its own
        assert backend.flushes == 0
        blk.set_writeback(False)
        for i in range(1, 3):
            blk.write(8 * i, pattern(70 + i, 4096))
            assert backend.flushes == i
            assert ceph.export(image)[4096 * i:4096 * (i + 1)] == pattern(70 + i, 4096)


# -- losing the cluster ------------------------------------------------------------------
# Last in the module: they stop and restart the OSD.

def _outage_batch(blk, base: int):
    reqs = [BlkRequest.write(base + 8 * i, pattern(900 + i, 4096)) for i in range(6)]
    reqs += [BlkRequest.read(0, 4096), BlkRequest.flush()]
    return reqs


def _lose_and_recover(ceph, image, tmp_path, lose, recover):
    backend = rbd_backend(ceph, image, timeout=LOSS_TIMEOUT)
    other = BlkDevice(AsyncRamDisk(MIB))
    with served(tmp_path, BlkDevice(backend)) as (srv, blk), \
            also_served(srv, other, str(tmp_path / "other.sock")) as blk2:
        acked = [BlkRequest.write(8 * i, pattern(i, 4096)) for i in range(32)]
        assert all(r.ok for r in blk.execute(acked, depth=32))

        lose()
        t0 = time.monotonic()
        outage = _outage_batch(blk, 1000)
        blk.submit(outage)
        # Meanwhile the same event loop serves the other disk at once, and
        # the RBD device's own control plane answers.
        t1 = time.monotonic()
        blk2.write(0, b"still here" + bytes(502))
        assert blk2.read(0, 512)[:10] == b"still here"
        other_latency = time.monotonic() - t1
        assert other_latency < 1.0
        assert blk.read_config().capacity == IMAGE_SIZE // 512
        done = []
        while len(done) < len(outage):
            done += blk.reap(timeout=LOSS_TIMEOUT + SLACK)
        elapsed = time.monotonic() - t0
        assert [r.status for r in outage] == [BlkStatus.IOERR] * len(outage)
        assert LOSS_TIMEOUT - 0.5 < elapsed < LOSS_TIMEOUT + SLACK
        # ... and it keeps answering later requests with errors, not silence
        later = blk.execute([BlkRequest.read(8, 4096)], timeout=LOSS_TIMEOUT + SLACK)
        assert later[0].status == BlkStatus.IOERR

        recover()
        t2 = time.monotonic()
        deadline = t2 + 30
        while True:    # the client may need a moment to find the OSD again
            r = blk.execute([BlkRequest.write(2000, pattern(77, 4096))],
                            timeout=LOSS_TIMEOUT + SLACK)[0]
            if r.ok or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.ok, "no write succeeded within 30s of the OSD's return"
        recovered = time.monotonic() - t2
        reads = blk.execute([BlkRequest.read(8 * i, 4096) for i in range(32)], depth=32)
        assert [x.data for x in reads] == [pattern(i, 4096) for i in range(32)]
        assert blk.read(2000, 4096) == pattern(77, 4096)
    print(f"\nloss: {len(outage)} requests IOERR after {elapsed:.2f}s (timeout {LOSS_TIMEOUT:g}s), "
          f"other disk answered in {other_latency * 1000:.1f} ms; after recovery the "
          f"first write succeeded in {recovered:.2f}s")
    data = ceph.export(image)
    for i in range(32):
        assert data[8 * i * 512:8 * i * 512 + 4096] == pattern(i, 4096)


def test_frozen_osd_gives_io_errors_in_time_and_nothing_acknowledged_is_lost(
        ceph, image, tmp_path):
    try:
        _lose_and_recover(ceph, image, tmp_path, ceph.pause_osd, ceph.resume_osd)
    finally:
        ceph.resume_osd()


def test_killed_osd_gives_io_errors_and_a_restarted_one_has_every_acknowledged_write(
        ceph, image, tmp_path):
    try:
        _lose_and_recover(ceph, image, tmp_path, ceph.kill_osd, ceph.start_osd)
    finally:
        if ceph.osd.poll() is not None:
            ceph.start_osd()


# -- close, librbd replaced by a fake ---------------------------------------------------

class FakeLibrbd:
    """Just what a read and close() use; completes what
    rbd_aio_wait_for_complete waits for, as librbd does once the OSDs
    answer."""

    def __init__(self, ffi):
        self.ffi, self.next = ffi, 1
        self.started, self.completed = [], []

    def rbd_aio_create_completion(self, arg, cb, comp):
        comp[0] = self.ffi.cast("rbd_completion_t", self.next)
        self.next += 1
        return 0

    def rbd_aio_read(self, image, off, length, buf, c):
        self.started.append(c)
        return 0

    def rbd_aio_wait_for_complete(self, c):
        self.waited_in = threading.current_thread()
        self.completed.append(c)
        return 0

    def rbd_poll_io_events(self, image, events, n):
        k = 0
        while self.completed and k < n:
            events[k] = self.completed.pop(0)
            k += 1
        return k

    def rbd_aio_get_return_value(self, c):
        return 0

    def rbd_aio_release(self, c):
        pass

    def rbd_close(self, image):
        return 0


def fake_rbd_backend(timeout):
    from vhostuser.blk import rbd
    be = rbd.RbdBackend.__new__(rbd.RbdBackend)
    be.lib = FakeLibrbd(rbd.ffi)
    be.pool, be.namespace, be.image_name = "p", None, "i"
    be.read_only = False
    be.timeout = timeout
    be._cluster = be._ioctx = None
    be._image = object()
    be._pending = {}
    be._loop = None
    be._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    be._events = rbd.ffi.new("rbd_completion_t[]", rbd._POLL_BATCH)
    be.cache_enabled = False
    be.timeouts = 0
    return be


@pytest.mark.parametrize("timeout", [None, 1.0])
def test_requests_librbd_completed_during_close_are_answered(timeout):
    """close() on the device's loop (BlkDevice._close_backend) waits for
    librbd's completions; it reaped them without answering, so a request
    waiting for one never ended (timeout None: the device was never freed)
    or failed with RbdTimeout although librbd succeeded. It succeeds now,
    and the wait runs off the loop."""
    be = fake_rbd_backend(timeout)

    async def main():
        task = asyncio.ensure_future(be.read(0, [memoryview(bytearray(4096))]))
        await asyncio.sleep(0.05)
        assert be.lib.started                   # in librbd's hands
        be.close()
        done, _ = await asyncio.wait([task], timeout=3)
        assert done, "request never answered after close()"
        task.result()
    asyncio.run(main())
    assert be.lib.waited_in is not threading.current_thread()
    deadline = time.monotonic() + 5
    while be._efd != -1:                        # closed, in close()'s thread
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert be.pending() == 0
