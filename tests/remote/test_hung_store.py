"""A store that stops answering can't take the daemon down (issue 14, point 1).

qemu-nbd is frozen (SIGSTOP) under requests of one export whose remote
timeout is off (requests wait forever); `vhostuser-ctl remove` of that
export gives up waiting after the drain timeout, the requests become
orphans whose guest memory is detached, and the daemon's other export goes
on serving. When the server wakes up (SIGCONT) nothing crashes either.
"""
import os
import time

import pytest

from vhostuser.frontend import BlkClient, Frontend
from vhostuser.frontend.blk import BlkRequest
from vhostuser_devkit.daemon import DaemonProcess
from vhostuser_devkit.nbd import NbdServer, require_tools

MIB = 1 << 20


@pytest.fixture
def nbd_image(workdir):
    require_tools()
    path = os.path.join(workdir, "nbd.raw")
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
    return path


def io_works(path: str) -> None:
    with Frontend.connect(path) as fe:
        blk = BlkClient.setup(fe)
        data = os.urandom(4096)
        blk.write(8, data)
        assert blk.read(8, 4096) == data


def test_remove_of_an_export_whose_store_hangs(workdir, nbd_image):
    daemon = DaemonProcess(workdir, env={"VHOSTUSER_DRAIN_TIMEOUT": "0.5"})
    server = NbdServer.qemu_nbd(nbd_image, unix=os.path.join(workdir, "nbd.sock"),
                                log_path=os.path.join(workdir, "qemu-nbd.log")).start()
    try:
        daemon.call("add", type="blk", name="hung", socket=daemon.path("h.sock"),
                    nbd=server.uri, remote_timeout=0)
        daemon.call("add", type="blk", name="ok", socket=daemon.path("o.sock"), ramdisk="4M")
        fe = Frontend.connect(daemon.path("h.sock"))
        blk = BlkClient.setup(fe)
        blk.write(0, b"w" * 4096)           # the store answers ...
        server.pause()                      # ... until now
        blk.submit([BlkRequest.write(16, b"x" * 65536), BlkRequest.read(0, 4096)])
        deadline = time.monotonic() + 10
        while daemon.call("stats", name="hung")["totals"]["inflight"] < 2:
            assert time.monotonic() < deadline, daemon.output()
            time.sleep(0.05)

        started = time.monotonic()
        daemon.ctl("remove", "hung")
        removal = time.monotonic() - started
        assert removal < 10, f"remove took {removal:.1f}s"
        assert [e["name"] for e in daemon.call("list")] == ["ok"]
        io_works(daemon.path("o.sock"))

        server.resume()                     # the late answers find nothing to crash
        time.sleep(1.0)
        io_works(daemon.path("o.sock"))
        assert daemon.proc.poll() is None, daemon.output()
        fe.close()
    finally:
        if server.paused:
            server.resume()
        server.kill()
        rc = daemon.terminate()
    output = daemon.output()
    assert rc == 0, output
    assert "Traceback" not in output, output
    assert "still in flight after 0.5s" in output, output
