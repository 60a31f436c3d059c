"""The daemon hosts Python back-ends (issue 16): an export spec names
``"backend": "MODULE:CLASS"`` with ``"backend_opt"``, exactly as
``vhostuser-blk --backend``/``--backend-opt`` do, and ``vhostuser-ctl
add-blk``/``add-net`` take ``--backend``. Driven over the control socket
(vhostuser-ctl and the Python client) with real I/O from the library's
front-end."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import time
from pathlib import Path

import pytest

from vhostuser.frontend import (BackendClosed, BlkRequest, Buffer, Frontend, FrontendTimeout,
                                GuestMemory)
from vhostuser.frontend.device import DEFAULT_FEATURES
from vhostuser.manage.client import ControlError
from vhostuser.net import NetFeature
from vhostuser.net.spec import HDR
from vhostuser.protocol import bit
from vhostuser_devkit.daemon import WITH_PYTHON, DaemonProcess
from vhostuser_devkit.patterns import pattern

from .conftest import MIB, blk_frontend

REPO = str(Path(__file__).resolve().parents[2])
MODULE = "tests.manage.pybackends"


@pytest.fixture
def pydaemon(workdir):
    """The daemon run from the checkout, where tests.manage.pybackends
    imports (the daemon's working directory is on its import path)."""
    d = DaemonProcess(workdir, cwd=REPO, backends=WITH_PYTHON)
    yield d
    rc = d.terminate()
    assert rc == 0, d.output()
    assert "Traceback" not in d.output(), d.output()


def journal_lines(path) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def test_python_disk_added_with_vhostuser_ctl(pydaemon, workdir):
    journal = os.path.join(workdir, "journal.log")
    pydaemon.ctl("add-blk", "py0", "--socket-path", "py0.sock", "--queues", "2",
                 "--backend", f"{MODULE}:JournalDisk", "--backend-opt", f"size={16 * MIB}",
                 "--backend-opt", f"journal={journal}")
    described = pydaemon.ctl_json("describe", "py0")
    assert described["spec"]["backend"] == f"{MODULE}:JournalDisk"
    assert described["spec"]["backend_opt"] == {"size": str(16 * MIB), "journal": journal}
    assert described["device"]["backend"] == "JournalDisk"
    assert described["device"]["size"] == 16 * MIB and described["device"]["queues"] == 2
    assert described["device"]["aio_requested"] is None

    with blk_frontend(pydaemon.path("py0.sock"), queues=2) as blk:
        assert blk.capacity == 16 * MIB // 512
        # 16 writes on each queue at once: the coroutines overlap in the daemon
        for q in (0, 1):
            writes = [BlkRequest.write((q * 16 + i) * 16, pattern(q * 16 + i, 8192))
                      for i in range(16)]
            assert all(r.ok for r in blk.execute(writes, queue=q))
        blk.flush()
        reads = blk.execute([BlkRequest.read(i * 16, 8192) for i in range(32)], queue=1)
        assert [r.data for r in reads] == [pattern(i, 8192) for i in range(32)]
        stats = pydaemon.ctl_json("stats", "py0")
        assert stats["totals"]["writes"] == 32 and stats["totals"]["reads"] == 32
        assert [q["writes"] for q in stats["queues"]] == [16, 16]
    lines = journal_lines(journal)
    assert sorted(lines[:-1]) == sorted(f"W {i * 16 * 512} 8192" for i in range(32))
    assert lines[-1] == "F"
    # the other exports go on; removing this one closes its back-end
    pydaemon.ctl("add-blk", "ram0", "--socket-path", "ram0.sock", "--ramdisk", "1M")
    pydaemon.ctl("remove", "py0")
    assert journal_lines(journal)[-1].startswith("CLOSED pid=")
    assert not os.path.exists(pydaemon.path("py0.sock"))
    assert [e["name"] for e in pydaemon.call("list")] == ["ram0"]


def test_python_disk_from_a_config_file_with_typed_options(workdir):
    """A spec in --config: backend_opt values are JSON, passed as they are."""
    journal = os.path.join(workdir, "journal.log")
    config = os.path.join(workdir, "exports.jsonl")
    with open(config, "w") as f:
        f.write(json.dumps({"type": "blk", "name": "py1", "socket_path": f"{workdir}/py1.sock",
                            "backend": f"{MODULE}:JournalDisk",
                            "backend_opt": {"size": 4 * MIB, "journal": journal,
                                            "delay_ms": 0}}) + "\n")
    d = DaemonProcess(workdir, "--config", config, cwd=REPO, backends=WITH_PYTHON)
    try:
        with blk_frontend(d.path("py1.sock")) as blk:
            assert blk.capacity == 4 * MIB // 512
            blk.write(8, b"\x7e" * 4096)
            assert blk.read(8, 4096) == b"\x7e" * 4096
        assert journal_lines(journal) == ["W 4096 4096"]
    finally:
        assert d.terminate() == 0, d.output()
    assert journal_lines(journal)[-1].startswith("CLOSED")


# -- a network interface ----------------------------------------------------------------

ZERO_HDR = HDR.pack(0, 0, 0, 0, 0, 0, 0)


def test_python_nic_added_with_vhostuser_ctl(pydaemon):
    pydaemon.ctl("add-net", "echo0", "--socket-path", "echo0.sock",
                 "--backend", f"{MODULE}:EchoNet", "--backend-opt", "queue_pair=0")
    assert pydaemon.call("describe", name="echo0")["spec"]["backend"] == f"{MODULE}:EchoNet"
    with Frontend.connect(pydaemon.path("echo0.sock"), wait=10) as fe:
        fe.negotiate(DEFAULT_FEATURES | bit(NetFeature.MRG_RXBUF))
        mem = fe.own(GuestMemory([(0, 4 << 20)], name="net"))
        fe.set_mem_table(mem)
        rx, tx = fe.setup_queue(0, 64), fe.setup_queue(1, 64)
        for _ in range(8):
            gpa = mem.alloc(2048)
            rx.add([Buffer(gpa, 2048, True)], gpa)
        rx.notify()
        ours, theirs = b"\x52\x54\x00\x00\x00\x01", b"\x52\x54\x00\x00\x00\x02"
        sent = []
        for i in range(4):
            frame = theirs + ours + struct.pack("!H", 0x88B5) + pattern(i, 100 + 50 * i)
            gpa = mem.alloc(12 + len(frame))
            mem.write(gpa, ZERO_HDR + frame)
            tx.add([Buffer(gpa, 12 + len(frame))])
            tx.notify()
            tx.wait(1, timeout=10)
            sent.append(frame)
        got = [mem.read(u.token, u.length)[12:] for u in rx.wait(4, timeout=10)]
    assert got == [f[6:12] + f[0:6] + f[12:] for f in sent]
    stats = pydaemon.call("stats", name="echo0")["totals"]
    assert stats["tx_packets"] == 4 and stats["rx_packets"] == 4


# -- what is refused changes nothing --------------------------------------------------------

@pytest.mark.parametrize("argv, code, message", [
    (["add-blk", "x", "--backend", "no_such_module_here:Disk"], "bad-args",
     "'backend': no_such_module_here:Disk: No module named 'no_such_module_here'"),
    (["add-blk", "x", "--backend", f"{MODULE}:Missing"], "bad-args",
     f"'backend': {MODULE}:Missing: module '{MODULE}' has no attribute 'Missing'"),
    (["add-blk", "x", "--backend", f"{MODULE}:NotABackend"], "bad-args",
     f"'backend': {MODULE}:NotABackend: not a vhostuser.blk.BlockBackend subclass"),
    (["add-net", "x", "--backend", f"{MODULE}:JournalDisk"], "bad-args",
     f"'backend': {MODULE}:JournalDisk: not a vhostuser.net.NetBackend subclass"),
    (["add-blk", "x", "--backend", "JournalDisk"], "bad-args",
     "'backend' must be MODULE:CLASS, not 'JournalDisk'"),
    (["add-net", "x", "--backend", "nul"], "bad-args",
     "'backend' must be null or MODULE:CLASS, not 'nul'"),
    (["add-blk", "x", "--backend", f"{MODULE}:BrokenDisk", "--backend-opt", "size=1M"],
     "backend-error", f"x: {MODULE}:BrokenDisk: ValueError: no disk here (options ['size'])"),
    (["add-blk", "x", "--ramdisk", "1M", "--backend-opt", "size=1M"], "bad-args",
     "blk export: unknown argument 'backend_opt'"),
])
def test_refused_python_backends_change_nothing(pydaemon, argv, code, message):
    before = pydaemon.call("list")
    r = pydaemon.ctl(*argv, "--socket-path", "x.sock", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith(f"vhostuser-ctl: {code}: {message}"), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert pydaemon.call("list") == before
    assert not os.path.exists(pydaemon.path("x.sock"))


def test_backend_opt_wants_key_value(pydaemon):
    r = pydaemon.ctl("add-blk", "x", "--socket-path", "x.sock", "--backend",
                     f"{MODULE}:JournalDisk", "--backend-opt", "size", check=False)
    assert (r.returncode, r.stderr) == (1, "vhostuser-ctl: --backend-opt: 'size': want "
                                           "KEY=VALUE\n")


# -- the other sources vhostuser-ctl add-blk takes now -------------------------------------

def test_describe_says_when_io_uring_was_not_used(pydaemon):
    """A file on tmpfs is served synchronously although io_uring was asked
    for: describe says so (and the daemon logs it)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("needs a tmpfs at /dev/shm")
    image = f"/dev/shm/vhu-describe-{os.getpid()}.img"
    with open(image, "wb") as f:
        f.truncate(MIB)
    try:
        pydaemon.ctl("add-blk", "t0", "--socket-path", "t0.sock", "--blk-file", image,
                     "--aio", "io_uring")
        device = pydaemon.call("describe", name="t0")["device"]
        assert (device["aio"], device["aio_requested"]) == ("sync", "io_uring")
        assert "tmpfs" in device["aio_note"]
        assert "aio io_uring asked for, synchronous I/O used" in pydaemon.output()
        pydaemon.ctl("remove", "t0")
    finally:
        os.unlink(image)


# -- a plain method that blocks (GatedDisk: read() of sector 64 waits for a file)

def wait_until(condition, d: DaemonProcess, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, d.output()
        time.sleep(0.05)


@contextlib.contextmanager
def gated_daemon(workdir, *, closed_mark: str = ""):
    """A daemon with the export "stuck" (GatedDisk, gate file ``gate``) and
    the ramdisk "ok"; yields (daemon, gate). The gate opens at the end
    whatever happened, so no read stays blocked."""
    gate = os.path.join(workdir, "gate")
    d = DaemonProcess(workdir, cwd=REPO, backends=WITH_PYTHON,
                      env={"VHOSTUSER_DRAIN_TIMEOUT": "0.5"})
    try:
        d.call("add", type="blk", name="stuck", socket=d.path("s.sock"),
               backend=f"{MODULE}:GatedDisk",
               backend_opt={"size": 4 * MIB, "gate": gate, "closed_mark": closed_mark})
        d.call("add", type="blk", name="ok", socket=d.path("o.sock"), ramdisk="4M")
        yield d, gate
    finally:
        open(gate, "w").close()
        d.terminate()


@contextlib.contextmanager
def read_blocked_in_worker(d: DaemonProcess):
    """A front-end of "stuck" with a read blocked in the queue's worker;
    it disconnects when the block ends."""
    with blk_frontend(d.path("s.sock")) as blk:
        blk.submit([BlkRequest.read(64, 4096)])      # the sector GatedDisk blocks on
        wait_until(lambda: d.call("stats", name="stuck")["totals"]["inflight"] >= 1, d)
        yield blk


def io_works(path: str, byte: bytes) -> None:
    with blk_frontend(path) as blk:
        blk.write(8, byte * 4096)
        assert blk.read(8, 4096) == byte * 4096


def test_plain_method_blocked_at_disconnect_holds_up_only_its_export(workdir):
    """A plain read() still blocked in its queue's worker when the front-end
    goes: the disconnect waits for it to return (that worker's rings and the
    memory its request points into are freed only then), but off the event
    loop, so the daemon's other export and its control socket go on
    answering meanwhile; the export takes a front-end again afterwards."""
    with gated_daemon(workdir) as (d, gate):
        with read_blocked_in_worker(d):
            pass
        # Disconnected: the drain timeout passes, then the session waits for
        # the worker, whose read() still blocks.
        wait_until(lambda: "still in flight after 0.5s" in d.output(), d)
        io_works(d.path("o.sock"), b"o")
        assert {e["name"] for e in d.call("list")} == {"stuck", "ok"}
        assert os.path.exists(d.path("s.sock"))
        wait_until(lambda: "still inside the back-end" in d.output(), d)
        assert not os.path.exists(gate)                 # so the read still blocks

        open(gate, "w").close()                        # the store answers again
        deadline = time.monotonic() + 20
        while True:
            try:
                io_works(d.path("s.sock"), b"s")
                break
            except (BackendClosed, FrontendTimeout):
                # refused while the old session still tears down
                assert time.monotonic() < deadline, d.output()
                time.sleep(0.2)
    assert d.proc.returncode == 0, d.output()
    assert "Traceback" not in d.output(), d.output()


def test_remove_of_an_export_whose_plain_method_blocks(workdir):
    """vhostuser-ctl remove of a disk whose plain read() blocks in its
    worker: the export goes after the drain timeouts, the daemon's other
    export serves on, and the device (the back-end's close() with it) goes
    once the read returns, not before (its worker still runs in it)."""
    closed = os.path.join(workdir, "closed")
    with gated_daemon(workdir, closed_mark=closed) as (d, gate):
        with read_blocked_in_worker(d):
            started = time.monotonic()
            d.ctl("remove", "stuck")
            assert time.monotonic() - started < 10, d.output()
        assert [e["name"] for e in d.call("list")] == ["ok"]
        io_works(d.path("o.sock"), b"o")
        assert not os.path.exists(closed), "closed while its worker was inside read()"

        open(gate, "w").close()
        wait_until(lambda: os.path.exists(closed), d, timeout=20)
        io_works(d.path("o.sock"), b"p")
    output = d.output()
    assert d.proc.returncode == 0, output
    assert "Traceback" not in output, output
    assert "device closed after its last session ended" in output, output


def test_exit_closes_a_device_whose_plain_method_blocked_once_it_returns(workdir):
    """SIGTERM while a plain read() blocks in its worker: the daemon stops
    its exports, then waits for that call and runs the back-end's close()
    (which is where a back-end makes what it caches stable) before it
    exits, with status 0."""
    closed = os.path.join(workdir, "closed")
    with gated_daemon(workdir, closed_mark=closed) as (d, gate):
        with read_blocked_in_worker(d):
            d.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "waiting for a back-end call to return" in d.output()
                       or d.proc.poll() is not None, d, timeout=20)
        assert d.proc.poll() is None and not os.path.exists(closed), d.output()
        open(gate, "w").close()
        assert d.proc.wait(20) == 0, d.output()
        assert os.path.exists(closed), d.output()
    assert "Traceback" not in d.output(), d.output()


def test_a_removed_export_still_ending_is_not_added_again(workdir):
    """A disk removed while a back-end call blocks in its worker is closed
    only once that call returns. Adding it again meanwhile (same name,
    socket or image) would let a new guest use the image while the old
    session's call, a write perhaps, still lands in it afterwards: refused
    as bad-state, as start of a stopped export is then; accepted once the
    old device closed. (A Python back-end's image is its own business: the
    same class under another name and socket is another disk.)"""
    closed = os.path.join(workdir, "closed")
    with gated_daemon(workdir, closed_mark=closed) as (d, gate):
        spec = {"type": "blk", "name": "stuck", "socket": d.path("s.sock"),
                "backend": f"{MODULE}:GatedDisk",
                "backend_opt": {"size": 4 * MIB, "gate": gate}}
        with read_blocked_in_worker(d):
            d.ctl("remove", "stuck")
        for changed in ({}, {"socket": d.path("s2.sock")}, {"name": "other"}):
            with pytest.raises(ControlError) as err:
                d.call("add", **{**spec, **changed})
            assert err.value.code == "bad-state", err.value
            assert "still ending" in err.value.message
        assert [e["name"] for e in d.call("list")] == ["ok"]
        open(gate, "w").close()
        wait_until(lambda: os.path.exists(closed), d, timeout=20)
        wait_until(lambda: "device closed after its last session ended" in d.output(), d)
        d.call("add", **spec)
        io_works(d.path("s.sock"), b"n")
    assert "Traceback" not in d.output(), d.output()
