"""A Python network back-end's transmit() failing on every batch is logged
once in full, then rate-limited, and counted in the metrics (transmit_errors,
log_suppressed); a value it returns, or an async transmit(), is said once."""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

import pytest

from vhostuser import loglimit
from vhostuser.frontend import Frontend
from vhostuser.net import NetBackend, NetDevice
from vhostuser.testing.server import BackgroundServer

LOGGER = "vhostuser.net.device"
FRAME = bytes.fromhex("020000000001" "020000000002" "88b5") + bytes(46)


class Broken(NetBackend):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def transmit(self, queue_pair, frames):
        self.calls += 1
        raise RuntimeError(f"broken on call {self.calls}")


class Returns(NetBackend):
    def transmit(self, queue_pair, frames):
        return len(frames)


class Async(NetBackend):
    async def transmit(self, queue_pair, frames):
        raise AssertionError("never runs")


class HandsOn(NetBackend):
    """Hands the frames to an executor: its work would read them after the
    call, when the guest may have reused their buffers."""

    def transmit(self, queue_pair, frames):
        return concurrent.futures.Future()


def send(path, n, queue_pairs=1):
    """n frames on each queue pair's transmit queue, one batch each (every
    frame waited for before the next)."""
    with Frontend.setup(path, queues=2 * queue_pairs) as fe:
        mem = fe.memory
        buf = mem.alloc(12 + len(FRAME))
        mem.write(buf, bytes(12) + FRAME)
        for qp in range(queue_pairs):
            tx = fe.queues[2 * qp + 1]
            for _ in range(n):
                tx.submit([(buf, 12 + len(FRAME))])
                tx.wait()


def records(caplog, level=logging.WARNING):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= level]


def test_failing_transmit_is_logged_once_in_full_and_counted(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(loglimit, "INTERVAL", 3600)     # however slow the machine
    backend = Broken()
    device = NetDevice(backend, queue_pairs=2)
    path = str(tmp_path / "net.sock")
    with BackgroundServer(device, path):
        send(path, 20, queue_pairs=2)
    assert backend.calls == 40
    metrics = device.metrics()
    assert [m["transmit_errors"] for m in metrics] == [20, 20]
    assert [m["log_suppressed"] for m in metrics] == [19, 20]
    stats = device.stats()
    assert stats["transmit_errors"] == 40 and stats["log_suppressed"] == 39
    device.close()
    lines = records(caplog)
    assert lines[0].getMessage() == ("Python network back-end failed on 1 frame (queue pair 0): "
                                     "RuntimeError: broken on call 1")
    assert lines[0].exc_info is not None
    assert caplog.text.count("Traceback") == 1
    # close() reports what was held back, in one line.
    assert len(lines) == 2
    assert lines[1].getMessage().endswith("(the last of 39 like it not logged)")


@pytest.mark.parametrize("backend, said", [
    (Returns(), "Returns.transmit() returned 1; return values are ignored"),
    (Async(), "Async.transmit() is async or returned a Future"),
    (HandsOn(), "HandsOn.transmit() is async or returned a Future"),
])
def test_what_transmit_returns_is_said_once(tmp_path, caplog, backend, said):
    device = NetDevice(backend)
    path = str(tmp_path / "net.sock")
    with BackgroundServer(device, path):
        send(path, 5)
    assert device.stats()["transmit_errors"] == (0 if isinstance(backend, Returns) else 5)
    device.close()
    lines = [r.getMessage() for r in records(caplog)]
    assert len(lines) == 1 and said in lines[0], lines
    assert "never awaited" not in caplog.text


def test_a_future_already_running_is_waited_for_before_the_frames_go_back(tmp_path):
    """A transmit() whose executor already runs the work it returned: the
    frames go back to the guest only once that work ended (it reads them)."""
    class Running(NetBackend):
        def __init__(self):
            self.pool = concurrent.futures.ThreadPoolExecutor(1)
            self.calls = self.finished = 0

        def transmit(self, queue_pair, frames):
            self.calls += 1
            started = threading.Event()

            def work():
                started.set()
                time.sleep(0.05)
                self.finished += 1
            future = self.pool.submit(work)
            started.wait(5)
            return future
    backend = Running()
    device = NetDevice(backend)
    path = str(tmp_path / "net.sock")
    with BackgroundServer(device, path):
        send(path, 5)
        assert backend.calls and backend.finished == backend.calls
    device.close()
    backend.pool.shutdown()


def test_an_os_error_in_transmit_is_one_line(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(loglimit, "INTERVAL", 3600)

    class Unreachable(NetBackend):
        def transmit(self, queue_pair, frames):
            raise OSError(113, "No route to host")
    device = NetDevice(Unreachable())
    path = str(tmp_path / "net.sock")
    with BackgroundServer(device, path):
        send(path, 3)
    assert device.stats()["transmit_errors"] == 3
    device.close()
    lines = [r.getMessage() for r in records(caplog)]
    assert lines[0] == ("Python network back-end: transmit of 1 frame (queue pair 0) failed: "
                        "[Errno 113] No route to host")
    assert "Traceback" not in caplog.text


class Blocking(NetBackend):
    """A transmit() that blocks its worker until the test lets it return,
    as a back-end whose uplink stopped answering does."""

    def __init__(self):
        super().__init__()
        self.arrived, self.release = threading.Event(), threading.Event()
        self.batches = 0

    def transmit(self, queue_pair, frames):
        self.batches += 1
        if self.batches == 1:
            self.arrived.set()
            assert self.release.wait(30)


def test_a_blocked_transmit_holds_up_no_front_end_message(tmp_path):
    """The worker runs transmit() without the device lock: stopping the
    ring is answered within the drain timeout, not when transmit returns,
    and the device serves the next front-end."""
    backend = Blocking()
    device = NetDevice(backend)
    device.drain_timeout = 0.2
    path = str(tmp_path / "net.sock")
    try:
        with BackgroundServer(device, path) as srv:
            with Frontend.setup(path, queues=2) as fe:
                mem = fe.memory
                buf = mem.alloc(12 + len(FRAME))
                mem.write(buf, bytes(12) + FRAME)
                fe.queues[1].submit([(buf, 12 + len(FRAME))])
                assert backend.arrived.wait(10)
                started = time.monotonic()
                fe.get_vring_base(1)
                assert time.monotonic() - started < 5
                backend.release.set()
            send(path, 3)                       # a new front-end: served
            assert backend.batches == 4
            assert srv.error is None
    finally:
        device.close()
