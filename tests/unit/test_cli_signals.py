"""The back-end programs as a service manager runs them: signals, and what
a program serving only C back-ends loads."""
import os
import signal
import time

from vhostuser.frontend import BlkClient, Frontend
from vhostuser_devkit.program import BackendProgram

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mapped_libraries(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_sighup_does_not_end_vhostuser_net(tmp_path):
    """vhostuser-net has nothing to reload, but a SIGHUP (a service manager's
    reload) must not take the interface down: it is logged and ignored."""
    sock = tmp_path / "net.sock"
    with BackendProgram("vhostuser.cli.net", "--sink", socket=sock,
                        log=tmp_path / "net.log") as prog:
        prog.signal(signal.SIGHUP)
        time.sleep(0.5)
        assert prog.proc.poll() is None, "SIGHUP ended vhostuser-net"
        assert prog.terminate() == 0
        assert "SIGHUP" in prog.output()
    assert not os.path.exists(sock)


def test_c_backends_serve_without_loading_tls(tmp_path):
    """asyncio would map libssl and libcrypto (4 MB of RSS) that a C
    back-end never uses; the program keeps ssl out and still serves."""
    sock = tmp_path / "blk.sock"
    with BackendProgram("vhostuser.cli.blk", "--ramdisk", "1M", socket=sock,
                        log=tmp_path / "blk.log") as prog:
        assert "libssl" not in mapped_libraries(prog.pid)
        with Frontend.connect(str(sock)) as fe:
            blk = BlkClient.setup(fe)
            blk.write(8, b"\x42" * 4096)
            assert blk.read(8, 4096) == b"\x42" * 4096
        assert prog.terminate() == 0


def test_a_python_backend_keeps_tls_available(tmp_path):
    """A Python back-end may talk TLS to its store: nothing is kept out."""
    sock = tmp_path / "blk.sock"
    with BackendProgram("vhostuser.cli.blk", "--backend", "examples.sparse_dict:SparseDictDisk",
                        socket=sock, log=tmp_path / "blk.log", cwd=REPO) as prog:
        assert "libssl" in mapped_libraries(prog.pid)
        assert prog.terminate() == 0
