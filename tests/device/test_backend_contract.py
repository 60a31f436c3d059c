"""The Python block back-end contract (docs/python-api.md), over a socket:
a failure is an exception (Unsupported -> UNSUPP, anything else -> IOERR),
a return value never becomes a status (it is ignored, and warned about once
per method), size() and lifetime() are checked with one-line errors, and
failed requests are logged rate-limited with the lines held back counted
in the metrics."""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import inspect
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from vhostuser import loglimit
from vhostuser.blk import BackendError, BlkDevice, BlockBackend, FileBackend, Unsupported
from vhostuser.blk.spec import LIFETIME, BlkFeature, BlkType
from vhostuser.frontend import BlkRequest, BlkStatus
from vhostuser.frontend.blk import BLK_FEATURES
from vhostuser.frontend.device import DEFAULT_FEATURES
from vhostuser.protocol import bit

MIB = 1 << 20
LOGGER = "vhostuser.blk.device"


class Disk(BlockBackend):
    """A RAM disk whose methods' results and failures a test sets."""

    def __init__(self, size=MIB):
        self._size = size
        self.data = bytearray(MIB)
        self.returns = {}        # method -> value returned
        self.raises = {}         # method -> exception raised

    def _outcome(self, method):
        if method in self.raises:
            raise self.raises[method]
        return self.returns.get(method)

    def size(self):
        return self._size

    def read(self, offset, bufs):
        for b in bufs:
            b[:] = self.data[offset:offset + len(b)]
            offset += len(b)
        return self._outcome("read")

    def write(self, offset, bufs):
        for b in bufs:
            self.data[offset:offset + len(b)] = b
            offset += len(b)
        return self._outcome("write")

    def flush(self):
        return self._outcome("flush")

    def discard(self, offset, length):
        return self._outcome("discard")


class AsyncDisk(Disk):
    async def read(self, offset, bufs):
        await asyncio.sleep(0)
        return Disk.read(self, offset, bufs)

    async def write(self, offset, bufs):
        await asyncio.sleep(0)
        return Disk.write(self, offset, bufs)


def warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("cls", [Disk, AsyncDisk])
def test_a_return_value_is_ignored_and_warned_about_once(blk_client, caplog, cls):
    """write() returning 2 used to tell the guest UNSUPP although the data
    was written, read() returning True gave an I/O error."""
    disk = cls()
    disk.returns = {"write": 2, "read": True}
    with blk_client(BlkDevice(disk)) as (srv, blk):
        reqs = blk.execute([BlkRequest.write(i, bytes([i]) * 512) for i in range(4)])
        assert [r.status for r in reqs] == [BlkStatus.OK] * 4
        reqs = blk.execute([BlkRequest.read(i, 512) for i in range(4)])
        assert [r.status for r in reqs] == [BlkStatus.OK] * 4
        assert [r.data for r in reqs] == [bytes([i]) * 512 for i in range(4)]
    lines = warnings(caplog)
    assert len(lines) == 2, lines
    assert f"{cls.__name__}.write() returned 2; return values are ignored" in lines[0]
    assert f"{cls.__name__}.read() returned True" in lines[1]


@pytest.mark.parametrize("cls", [Disk, AsyncDisk])
def test_unsupported_answers_unsupp_and_logs_nothing(blk_client, caplog, cls):
    disk = cls()
    disk.raises = {"write": Unsupported("no writes here"), "discard": Unsupported("no")}
    with blk_client(BlkDevice(disk)) as (srv, blk):
        reqs = blk.execute([BlkRequest.write(0, b"x" * 512), BlkRequest.discard([(0, 8)]),
                            BlkRequest.read(0, 512)])
        assert [r.status for r in reqs] == [BlkStatus.UNSUPP, BlkStatus.UNSUPP, BlkStatus.OK]
        stats = srv.device.stats()
        assert stats["unsupported"] == 2 and stats["errors"] == 0
    assert warnings(caplog) == []


@pytest.mark.parametrize("cls", [Disk, AsyncDisk])
def test_failed_requests_are_logged_rate_limited_and_counted(blk_client, caplog, monkeypatch,
                                                             cls):
    """A store that is down fails every request: one line for the first,
    the rest counted as log_suppressed on the queue they came from."""
    monkeypatch.setattr(loglimit, "INTERVAL", 3600)     # however slow the machine
    disk = cls()
    disk.raises = {"write": OSError(5, "Input/output error")}
    dev = BlkDevice(disk, num_queues=2)
    with blk_client(dev, queues=2) as (srv, blk):
        for q, n in ((0, 30), (1, 20)):
            reqs = blk.execute([BlkRequest.write(i, b"x" * 512) for i in range(n)], queue=q)
            assert all(r.status == BlkStatus.IOERR for r in reqs)
        metrics = dev.metrics()
        assert sum(m["errors"] for m in metrics) == 50
        assert [m["log_suppressed"] for m in metrics] == [29, 20]
        assert dev.stats()["log_suppressed"] == 49
    lines = warnings(caplog)
    assert lines[0] == "block back-end: write at sector 0 failed: [Errno 5] Input/output error"
    assert "Traceback" not in caplog.text
    # The device's close reports what was held back, in one line.
    assert len(lines) == 2 and "(the last of 49 like it not logged)" in lines[1], lines


def test_a_bug_in_the_backend_gets_one_traceback(blk_client, caplog, monkeypatch):
    monkeypatch.setattr(loglimit, "INTERVAL", 3600)
    disk = Disk()
    disk.raises = {"read": KeyError("oops")}
    with blk_client(BlkDevice(disk)) as (srv, blk):
        reqs = blk.execute([BlkRequest.read(i, 512) for i in range(10)])
        assert all(r.status == BlkStatus.IOERR for r in reqs)
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert errors[0].getMessage() == "block back-end failed on read at sector 0: KeyError: 'oops'"
    assert errors[0].exc_info is not None
    assert caplog.text.count("Traceback") == 1


class AsyncFlushDisk(AsyncDisk):
    async def flush(self):
        await asyncio.sleep(0)
        return self._outcome("flush")


WRITE_THROUGH = BLK_FEATURES & ~bit(BlkFeature.FLUSH) & ~bit(BlkFeature.CONFIG_WCE)


@pytest.mark.parametrize("cls", [Disk, AsyncDisk, AsyncFlushDisk])
def test_a_write_whose_stabilising_flush_is_unsupported_is_an_io_error(blk_client, cls):
    """In write-through mode a write is made stable by flush() (default
    write_fua, write-zeroes). A flush() raising Unsupported answered the
    WRITE with UNSUPP, as if writes were not supported; the write is
    supported, its durability failed: IOERR. Only the request's own method
    raising Unsupported gives UNSUPP."""
    disk = cls()
    disk.raises = {"flush": Unsupported("no flush here")}
    with blk_client(BlkDevice(disk), features=WRITE_THROUGH) as (srv, blk):
        reqs = blk.execute([BlkRequest.write(0, b"x" * 512), BlkRequest.write_zeroes([(8, 8)])])
        assert [r.status for r in reqs] == [BlkStatus.IOERR] * 2
        assert srv.device.stats()["unsupported"] == 0


class Boom(BaseException):
    """A library's own BaseException, not an Exception."""


@pytest.mark.parametrize("exc", [Boom, SystemExit, KeyboardInterrupt, asyncio.CancelledError])
@pytest.mark.parametrize("cls", [Disk, AsyncDisk])
def test_a_base_exception_fails_the_request_rather_than_hanging(blk_client, caplog, cls, exc):
    """Only Exception was caught: a method raising another BaseException
    left its request in flight for ever. It is an I/O error now, logged with
    its traceback. On the event loop KeyboardInterrupt and SystemExit then
    stop the loop (as asyncio has them do); in a queue worker there is no
    one to raise them to."""
    disk = cls()
    disk.raises = {"read": exc("read gone wrong")}
    dev = BlkDevice(disk)
    dev.drain_timeout = 1.0
    with blk_client(dev) as (srv, blk):
        with blk.mem.scratch():
            req = BlkRequest.read(0, 4096)
            blk.submit([req])
            assert blk.reap(1, timeout=5) == [req]      # FrontendTimeout if it hangs
        assert req.status == BlkStatus.IOERR
    stops_the_loop = cls is AsyncDisk and exc in (SystemExit, KeyboardInterrupt)
    assert isinstance(srv.error, exc) if stops_the_loop else srv.error is None
    if exc is not asyncio.CancelledError:
        assert "block back-end failed on read at sector 0" in caplog.text


class Garbage:
    """A return value that makes inspect.isawaitable() raise."""

    @property
    def __class__(self):
        raise ValueError("garbage")


class LateAndGarbage(Disk):
    """read() at sector 0: async, done after its batch; at 8: garbage; at
    32: async and slow (a new request on the element sector 0 had)."""

    def __init__(self):
        super().__init__()
        self.slow_done = threading.Event()

    def read(self, offset, bufs):
        if offset == 0:
            async def later():
                await asyncio.sleep(0.5)
                for b in bufs:
                    b[:] = b"L" * len(b)
            return later()
        if offset == 8 * 512:
            return Garbage()
        if offset == 32 * 512:
            async def slow():
                await asyncio.sleep(2)
                for b in bufs:
                    b[:] = b"S" * len(b)
                self.slow_done.set()
            return slow()
        return super().read(offset, bufs)


def test_each_request_of_a_failing_batch_completes_exactly_once(blk_client):
    """A failure after an earlier request of the batch was handed to the
    event loop (here inspect.isawaitable raising on a hostile return value)
    fails that request alone. The one handed over is the loop's: it was
    also answered IOERR by the batch, so completed twice -- its status byte
    rewritten after the guest saw it, and the element, reused by then,
    completed early for the next request."""
    disk = LateAndGarbage()
    with blk_client(BlkDevice(disk)) as (srv, blk):
        reqs = [BlkRequest.read(0, 4096), BlkRequest.read(8, 4096)]
        blk.submit(reqs)                                # one batch
        blk.reap(2, timeout=5)
        assert [r.status for r in reqs] == [BlkStatus.OK, BlkStatus.IOERR]
        assert reqs[0].data == b"L" * 4096
        new = BlkRequest.read(32, 4096)                 # on the element reqs[0] had
        blk.submit([new])
        assert blk.reap(1, timeout=10) == [new]
        assert disk.slow_done.is_set(), "completed before its back-end method finished"
        assert new.data == b"S" * 4096
        time.sleep(0.5)
        assert blk.mem.read(reqs[0].gpas["status"], 1)[0] == BlkStatus.OK


@pytest.mark.parametrize("size, why", [
    ("1G", "returned '1G'; it must return the size in bytes as an int"),
    (1000, "returned 1000; the size must be a positive multiple of 512 bytes"),
    (0, "returned 0; the size must be a positive multiple of 512 bytes"),
    (-512, "returned -512"),
    (4096.0, "returned 4096.0; it must return the size in bytes as an int"),
])
def test_a_bad_size_is_refused_in_one_line(size, why):
    with pytest.raises(BackendError) as info:
        BlkDevice(Disk(size))
    assert str(info.value).startswith(f"Disk.size() {why}")
    assert "\n" not in str(info.value)


def test_an_async_size_is_refused():
    class AsyncSize(Disk):
        async def size(self):
            return MIB
    with pytest.raises(BackendError, match=r"AsyncSize.size\(\) is async"):
        BlkDevice(AsyncSize())


def test_a_bad_size_on_resize_keeps_the_old_one():
    disk = Disk(MIB)
    dev = BlkDevice(disk)
    disk._size = 3 * MIB + 100
    with pytest.raises(BackendError, match="positive multiple of 512"):
        dev.resize()
    assert dev.capacity == MIB // 512
    disk._size = 2 * MIB
    dev.resize()
    assert dev.capacity == 2 * MIB // 512
    dev.close()


def test_bad_size_makes_vhostuser_blk_exit_with_one_line(tmp_path):
    (tmp_path / "strsize.py").write_text(
        "from vhostuser.blk import BlockBackend\n"
        "class StrSize(BlockBackend):\n"
        "    def __init__(self, size):\n"
        "        self._size = size          # a string from --backend-opt\n"
        "    def size(self):\n"
        "        return self._size\n")
    result = subprocess.run(
        [sys.executable, "-m", "vhostuser.cli.blk", "--socket-path", str(tmp_path / "s.sock"),
         "--backend", "strsize:StrSize", "--backend-opt", "size=1G"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 1, result.stderr
    assert result.stderr == ("vhostuser-blk: StrSize.size() returned '1G'; it must return the "
                             "size in bytes as an int\n")


class Lifetime(Disk):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def lifetime(self):
        return self.value


def lifetime_request(blk):
    [req] = blk.execute([BlkRequest(BlkType.GET_LIFETIME, in_len=LIFETIME.size)])
    return req


def test_lifetime_is_checked(blk_client, caplog):
    features = DEFAULT_FEATURES | BLK_FEATURES | bit(BlkFeature.LIFETIME)
    backend = Lifetime((1, 2, 3))
    with blk_client(BlkDevice(backend), features=features) as (srv, blk):
        req = lifetime_request(blk)
        assert req.status == BlkStatus.OK and LIFETIME.unpack(req.data) == (1, 2, 3)
        backend.value = (1, 2)
        assert lifetime_request(blk).status == BlkStatus.IOERR
        backend.value = (1, 2, 70000)
        assert lifetime_request(blk).status == BlkStatus.IOERR
        backend.value = None
        assert lifetime_request(blk).status == BlkStatus.UNSUPP
    lines = warnings(caplog)
    assert lines[0] == ("block back-end: lifetime at sector 0 failed: Lifetime.lifetime() "
                        "returned (1, 2); it must return None or (pre_eol_info, est_typ_a, "
                        "est_typ_b), each 0..65535")
    assert "Traceback" not in caplog.text


def test_an_async_close_is_reported_not_left_unawaited(caplog):
    class AsyncClose(Disk):
        async def close(self):
            raise AssertionError("never runs")
    BlkDevice(AsyncClose()).close()
    assert any("AsyncClose.close() is async and was not run" in m for m in warnings(caplog))


def test_an_image_with_a_partial_last_sector_is_served_with_a_warning(tmp_path, caplog):
    """The C file back-end keeps serving such images (they are common), but
    says that the tail is left out."""
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(MIB + 100))
    dev = BlkDevice(FileBackend(str(path)))
    try:
        assert dev.capacity == MIB // 512
    finally:
        dev.close()
    assert (f"{path}: the last 100 bytes are not a whole 512-byte sector; the guest sees the "
            f"disk without them") in warnings(caplog)


class FailingLifetime(Lifetime):
    """lifetime() raising `self.error` when set (storage that can't be asked)."""

    def __init__(self, value, error=None):
        super().__init__(value)
        self.error = error

    def lifetime(self):
        if self.error is not None:
            raise self.error
        return super().lifetime()


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), KeyError("bug")])
def test_a_raising_lifetime_fails_only_its_request(blk_client, error):
    """lifetime() raising in a GET_LIFETIME request fails that request
    with IOERR; the connection goes on serving."""
    features = DEFAULT_FEATURES | BLK_FEATURES | bit(BlkFeature.LIFETIME)
    backend = FailingLifetime((1, 2, 3))
    with blk_client(BlkDevice(backend), features=features) as (srv, blk):
        backend.error = error
        assert lifetime_request(blk).status == BlkStatus.IOERR
        [req] = blk.execute([BlkRequest.read(0, 512)])
        assert req.status == BlkStatus.OK
        backend.error = None
        assert LIFETIME.unpack(lifetime_request(blk).data) == (1, 2, 3)
        assert srv.error is None


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), KeyError("bug")])
def test_a_lifetime_raising_at_negotiation_is_offered_and_fails_its_requests(
        blk_client, caplog, error):
    """device_features() asks lifetime() whether to offer LIFETIME: its
    exception failed GET_FEATURES and closed the connection. The feature
    is offered (lifetime() is overridden) and each GET_LIFETIME request
    fails while lifetime() raises."""
    features = DEFAULT_FEATURES | BLK_FEATURES | bit(BlkFeature.LIFETIME)
    backend = FailingLifetime((1, 2, 3), error)
    dev = BlkDevice(backend)
    assert dev.device_features() & bit(BlkFeature.LIFETIME)
    with blk_client(dev, features=features) as (srv, blk):
        assert srv.device.session.features & bit(BlkFeature.LIFETIME)
        assert lifetime_request(blk).status == BlkStatus.IOERR
        backend.error = None
        assert LIFETIME.unpack(lifetime_request(blk).data) == (1, 2, 3)
        assert srv.error is None
    assert "FailingLifetime.lifetime() failed" in caplog.text


class Running:
    """An awaitable whose operation runs already (in a thread) and ends
    `seconds` later; awaiting it waits for that."""

    def __init__(self, seconds=0.3):
        self.done = threading.Event()
        threading.Timer(seconds, self.done.set).start()

    def __await__(self):
        while not self.done.is_set():
            yield from asyncio.sleep(0.01).__await__()


class SegmentDisk(Disk):
    """discard() and write_zeroes() give, per call in turn, what `plan`
    says: "running" (a Running), "coroutine" (one not started),
    "raising coroutine", or "raise"."""

    def __init__(self, plan):
        super().__init__()
        self.plan = list(plan)
        self.made = []                  # what each call returned
        self.ran = []                   # the coroutines that ran

    def _segment(self):
        what = self.plan.pop(0)
        if what == "raise":
            raise OSError(5, "segment failed")
        if what == "running":
            made = Running()
        else:
            made = self._coroutine(len(self.made), what == "raising coroutine")
        self.made.append(made)
        return made

    async def _coroutine(self, index, fails):
        self.ran.append(index)
        await asyncio.sleep(0)
        if fails:
            raise OSError(5, "segment failed")

    def discard(self, offset, length):
        return self._segment()

    def write_zeroes(self, offset, length, unmap):
        return self._segment()


def segments_request(kind):
    segs = [(0, 8), (8, 8), (16, 8)]
    return BlkRequest.discard(segs) if kind == "discard" else BlkRequest.write_zeroes(segs)


@pytest.mark.parametrize("kind", ["discard", "write_zeroes"])
@pytest.mark.parametrize("plan", [["running", "coroutine", "raise"],
                                  ["raising coroutine", "running", "coroutine"]])
def test_a_failing_segment_settles_the_others_before_the_answer(blk_client, recwarn, kind,
                                                                plan):
    """A segment's method failing (raising at once, or its coroutine
    raising) failed the request at once: what earlier segments had
    started still ran after the guest saw IOERR, and their coroutines not
    yet run were never awaited. The request fails once what is running
    has ended; the coroutines not started are closed, not run."""
    disk = SegmentDisk(plan)
    with blk_client(BlkDevice(disk)) as (srv, blk):
        [req] = blk.execute([segments_request(kind)])
        assert req.status == BlkStatus.IOERR
        running = [m for m in disk.made if isinstance(m, Running)]
        assert running and all(m.done.is_set() for m in running), "answered while running"
        for i, made in enumerate(disk.made):
            if not isinstance(made, Running):
                assert inspect.getcoroutinestate(made) == inspect.CORO_CLOSED
                assert (i in disk.ran) == (plan[i] == "raising coroutine")
    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


class ExecutorDisk(Disk):
    """Plain methods that hand their work to an executor and return its
    concurrent.futures.Future; the work ends `delay` seconds later, and is
    listed in `done` then. `fail`: methods whose work raises OSError."""

    def __init__(self, delay=0.2):
        super().__init__()
        self.pool = concurrent.futures.ThreadPoolExecutor(2)
        self.delay = delay
        self.done = []
        self.fail = set()

    def _later(self, name, work, *args):
        def run():
            time.sleep(self.delay)
            if name in self.fail:
                raise OSError(5, f"{name} failed")
            work(*args)
            self.done.append(name)
        return self.pool.submit(run)

    def read(self, offset, bufs):
        return self._later("read", Disk.read, self, offset, bufs)

    def write(self, offset, bufs):
        return self._later("write", Disk.write, self, offset, bufs)

    def flush(self):
        return self._later("flush", lambda: None)

    def discard(self, offset, length):
        return self._later("discard", lambda: None)

    def write_zeroes(self, offset, length, unmap):
        return self._later("write_zeroes", lambda: None)

    def close(self):
        self.done.append("close")
        self.pool.shutdown()


def test_a_future_from_an_executor_is_waited_for(blk_client, caplog):
    """A plain method returning a concurrent.futures.Future was taken as
    done, its Future warned about as a return value: the guest saw reads
    complete before their data was there, writes before they were
    written. Each request completes when its Future does."""
    disk = ExecutorDisk()
    with blk_client(BlkDevice(disk)) as (srv, blk):
        [w] = blk.execute([BlkRequest.write(8, b"w" * 512)])
        assert w.status == BlkStatus.OK and disk.done == ["write"]
        [r] = blk.execute([BlkRequest.read(8, 512)])
        assert r.status == BlkStatus.OK and r.data == b"w" * 512
        for req, name in ((BlkRequest.flush(), "flush"),
                          (BlkRequest.discard([(0, 8), (8, 8)]), "discard"),
                          (BlkRequest.write_zeroes([(0, 8)]), "write_zeroes")):
            [done] = blk.execute([req])
            assert done.status == BlkStatus.OK and disk.done[-1] == name
        disk.fail = {"read", "write"}
        reqs = blk.execute([BlkRequest.read(0, 512), BlkRequest.write(0, b"x" * 512)])
        assert [q.status for q in reqs] == [BlkStatus.IOERR] * 2
    assert "returned <Future" not in caplog.text
    assert "block back-end: read at sector 0 failed: [Errno 5] read failed" in caplog.text


def test_a_future_makes_a_write_through_write_stable_before_it_completes(blk_client):
    """In write-through mode the default write_fua() is write() then
    flush(): write()'s Future was not waited for, flush() ran at once."""
    disk = ExecutorDisk()
    with blk_client(BlkDevice(disk), features=WRITE_THROUGH) as (srv, blk):
        [w] = blk.execute([BlkRequest.write(0, b"w" * 512)])
        assert w.status == BlkStatus.OK
        assert disk.done == ["write", "flush"]
        disk.done.clear()
        [z] = blk.execute([BlkRequest.write_zeroes([(8, 8)])])
        assert z.status == BlkStatus.OK and disk.done == ["write_zeroes", "flush"]


def test_a_future_of_the_close_flush_is_waited_for():
    """close() flushes first: a flush() returning a Future was taken as
    done, and close() followed before it ended."""
    disk = ExecutorDisk()
    BlkDevice(disk).close()
    assert disk.done == ["flush", "close"]


def test_a_cancelled_future_of_the_close_flush_is_a_failed_flush(caplog):
    """A flush() whose Future is cancelled (its executor shut down with
    cancel_futures) fails the flush: close() logs it and goes on, as for
    any failed flush; the CancelledError escaped from close()."""
    class CancelledFlush(Disk):
        def flush(self):
            future = concurrent.futures.Future()
            future.cancel()
            return future
    BlkDevice(CancelledFlush()).close()
    assert "block back-end: flush before close failed: it was cancelled" in caplog.text


class PipeReadDisk(Disk):
    """read() hands os.readv(pipe, bufs) to an executor: the guest's
    buffers are written when the test writes into the pipe."""

    def __init__(self):
        super().__init__()
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.rfd, self.wfd = os.pipe()
        self.started = threading.Event()

    def read(self, offset, bufs):
        def work():
            self.started.set()
            return os.readv(self.rfd, bufs)
        return self.pool.submit(work)

    def close(self):
        self.pool.shutdown()
        os.close(self.rfd)
        os.close(self.wfd)


def cancel_waiting_requests(loop) -> int:
    """Cancels, on `loop`, the tasks of the requests handed to it
    (_complete_later) once they wait (a task cancelled before it starts
    runs nothing at all); returns how many."""
    async def cancel():
        while True:
            tasks = [t for t in asyncio.all_tasks()
                     if "_complete_later" in t.get_coro().__qualname__
                     and inspect.getcoroutinestate(t.get_coro()) == "CORO_SUSPENDED"]
            if tasks:
                break
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        return len(tasks)
    return asyncio.run_coroutine_threadsafe(cancel(), loop).result(5)


def test_a_cancelled_request_waits_for_its_executor_work_still_running(blk_client):
    """The request of a Future already running in its executor, cancelled
    (its loop ending cancels what is left), was answered at once while the
    work still wrote into its buffers: into memory the guest had back. It
    is now answered once the work has ended."""
    from vhostuser.frontend.connection import FrontendTimeout
    disk = PipeReadDisk()
    with blk_client(BlkDevice(disk)) as (srv, blk):
        try:
            blk.submit([BlkRequest.read(0, 512)])
            assert disk.started.wait(5)

            assert cancel_waiting_requests(srv.loop) == 1
            with pytest.raises(FrontendTimeout):
                blk.reap(1, timeout=0.5)        # the work still writes into its buffer
        finally:
            os.write(disk.wfd, b"late" * 128)
        [r] = blk.reap(1, timeout=5)
        assert r.status == BlkStatus.IOERR
        blk.write(8, b"still serving".ljust(512))


class GatedWriteDisk(Disk):
    """write() hands the copy of the guest's buffers to an executor, where
    it waits for the test's go first; no write_fua of its own (the default,
    write() then flush(), is a coroutine awaiting write()'s Future)."""

    def __init__(self):
        super().__init__()
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.started = threading.Event()
        self.go = threading.Event()
        self.copied = []

    def write(self, offset, bufs):
        def work():
            self.started.set()
            self.go.wait(10)
            try:
                self.copied.append(b"".join(bytes(b) for b in bufs))
            except ValueError:
                self.copied.append("released")
        return self.pool.submit(work)

    def close(self):
        self.go.set()
        self.pool.shutdown()


def test_a_cancelled_write_through_write_waits_for_its_executor_work_still_running(blk_client):
    """In write-through mode the default write_fua() wraps write()'s Future
    in a coroutine; cancelled (the loop ending), the request was answered
    at once while the executor still read its buffers (memory the guest had
    back). It is now answered once the work has ended."""
    from vhostuser.frontend.connection import FrontendTimeout
    disk = GatedWriteDisk()
    with blk_client(BlkDevice(disk), features=WRITE_THROUGH) as (srv, blk):
        try:
            blk.submit([BlkRequest.write(0, b"w" * 512)])
            assert disk.started.wait(5)

            assert cancel_waiting_requests(srv.loop) == 1
            with pytest.raises(FrontendTimeout):
                blk.reap(1, timeout=0.5)        # the work still reads its buffers
        finally:
            disk.go.set()
        [r] = blk.reap(1, timeout=5)
        assert r.status == BlkStatus.IOERR
        assert disk.copied == [b"w" * 512]


class ReadOnlyFromInside(Disk):
    """write() makes its own disk read-only (misuse: it waits for itself)."""

    def __init__(self):
        super().__init__()
        self.device = None
        self.errors = []

    def write(self, offset, bufs):
        try:
            self.device.set_read_only(True)
        except Exception as exc:
            self.errors.append(exc)
        return super().write(offset, bufs)


class AsyncReadOnlyFromInside(ReadOnlyFromInside):
    async def write(self, offset, bufs):
        try:
            await self.device.aset_read_only(True)
        except Exception as exc:
            self.errors.append(exc)
        return Disk.write(self, offset, bufs)


@pytest.mark.parametrize("cls", [ReadOnlyFromInside, AsyncReadOnlyFromInside])
def test_read_only_asked_from_inside_a_request_is_refused(blk_client, cls):
    """set_read_only(True) (or aset_read_only) called from a back-end's own
    request waited for that very request: the queue (or the request) hung
    for the whole drain timeout, then RequestsInFlight. It is now refused
    at once (RuntimeError) and the disk left as it was."""
    disk = cls()
    device = BlkDevice(disk)
    device.drain_timeout = 1.0
    disk.device = device
    with blk_client(device) as (srv, blk):
        start = time.monotonic()
        [w] = blk.execute([BlkRequest.write(0, b"w" * 512)])
        assert time.monotonic() - start < 0.9
        assert w.status == BlkStatus.OK
        [exc] = disk.errors
        assert isinstance(exc, RuntimeError) and "inside" in str(exc), exc
        assert not device.read_only


class ChangingLifetime(Lifetime):
    """lifetime() has metrics when first asked, none afterwards."""

    def lifetime(self):
        value, self.value = self.value, None
        return value


def test_set_features_is_checked_against_what_get_features_offered(blk_client):
    """A back-end's lifetime() changing its answer between GET_FEATURES and
    SET_FEATURES does not make the front-end's acknowledgement of what it
    was offered a protocol error."""
    features = DEFAULT_FEATURES | BLK_FEATURES | bit(BlkFeature.LIFETIME)
    with blk_client(BlkDevice(ChangingLifetime((1, 2, 3))), features=features) as (srv, blk):
        assert srv.device.session.features & bit(BlkFeature.LIFETIME)
        [req] = blk.execute([BlkRequest.read(0, 512)])
        assert req.status == BlkStatus.OK
        assert srv.error is None
