"""The sandbox seen from outside (/proc/PID/status, /proc/PID/root), its
options, and what the sandboxed programs can still do: reconnect
(--connect), remove their socket, and in the daemon add exports under the
directories it was given."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from vhostuser.frontend import BlkClient, Frontend
from vhostuser.frontend.connection import FrontendConnection
from vhostuser.manage import ControlError
from vhostuser.sandbox import policy
from vhostuser_devkit.daemon import DaemonProcess
from vhostuser_devkit.program import BackendProgram
from vhostuser_devkit.sandbox import (caps, children, fd_targets, ids, proc_status, view,
                                       wait_sandboxed)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOBODY = 65534


def confined(pid: int, uid: int, gid: int) -> None:
    """Every thread: under a filter, no_new_privs, the ids, no capability."""
    checked = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            st = proc_status(pid, int(task))
        except (FileNotFoundError, ProcessLookupError):
            # The thread ended after the listing: before open() gives ENOENT,
            # between open() and read() ESRCH. A session's queue workers
            # and its "stop" joiner end just after its disconnect.
            continue
        checked += 1
        assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", (task, st)
        assert ids(st, "Uid") == {uid} and ids(st, "Gid") == {gid}, (task, st)
        if uid != 0:
            assert st["Groups"].strip() == "", st
        assert caps(st) == {k: 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}, st
    assert checked, f"no thread of {pid} left to check"


def io(path: str, queues: int = 1) -> None:
    with Frontend.connect(path, wait=20) as fe:
        blk = BlkClient.setup(fe, queues=queues)
        data = os.urandom(64 << 10)
        blk.write(8, data)
        blk.flush()
        assert blk.read(8, len(data)) == data


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    return str(path)


def test_blk_as_nobody_from_outside(tmp_path, image):
    """--user nobody: ids, no capability, no_new_privs, the filter, an empty
    view; the helper (a child, root, unfiltered) goes when the program does."""
    sock = str(tmp_path / "blk.sock")
    with BackendProgram("vhostuser.cli.blk", "--blk-file", image, "--num-queues", "2",
                        "--user", "nobody", "--group", "nogroup", socket=sock,
                        log=str(tmp_path / "log")) as prog:
        wait_sandboxed(prog.pid)
        io(sock, queues=2)              # worker threads started after the sandbox
        confined(prog.pid, NOBODY, NOBODY)
        assert view(prog.pid) == []
        helpers = children(prog.pid)
        assert len(helpers) == 1
        helper = proc_status(helpers[0])
        assert helper["Seccomp"] == "0" and ids(helper, "Uid") == {0}
        # the queues' io_uring rings were made before the filter
        rings = [t for t in fd_targets(prog.pid) if t == "anon_inode:[io_uring]"]
        assert len(rings) == 2, prog.output()
        # loaded before the view hides it: a thread ending at exit needs it
        with open(f"/proc/{prog.pid}/maps") as f:
            assert "libgcc_s.so" in f.read()
        assert prog.terminate() == 0, prog.output()
        assert "Traceback" not in prog.output()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{helpers[0]}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{helpers[0]}/status") or \
        proc_status(helpers[0])["State"].startswith("Z")
    assert not os.path.exists(sock), "the helper removes the socket at exit"


def test_root_without_user_keeps_uid_0_and_no_capability(tmp_path):
    sock = str(tmp_path / "blk.sock")
    with BackendProgram("vhostuser.cli.blk", "--ramdisk", "4M", socket=sock,
                        log=str(tmp_path / "log")) as prog:
        wait_sandboxed(prog.pid)
        io(sock)
        confined(prog.pid, 0, 0)
        assert view(prog.pid) == []
        assert prog.terminate() == 0


def test_net_sink_from_outside(tmp_path):
    sock = str(tmp_path / "net.sock")
    with BackendProgram("vhostuser.cli.net", "--sink", "--user", "nobody", socket=sock,
                        log=str(tmp_path / "log")) as prog:
        st = wait_sandboxed(prog.pid)
        assert ids(st, "Uid") == {NOBODY}
        confined(prog.pid, NOBODY, int(st["Gid"].split()[0]))
        assert prog.terminate() == 0


def test_sandbox_off_and_python_backends(tmp_path):
    """--sandbox off: nothing changes. A user's Python back-end: off unless
    asked; on, it serves within BASE (sparse_dict needs nothing more)."""
    sock = str(tmp_path / "a.sock")
    with BackendProgram("vhostuser.cli.blk", "--ramdisk", "4M", "--sandbox", "off",
                        socket=sock, log=str(tmp_path / "a.log")) as prog:
        io(sock)
        st = proc_status(prog.pid)
        assert st["Seccomp"] == "0" and st["NoNewPrivs"] == "0" and children(prog.pid) == []
        assert prog.terminate() == 0
    sock = str(tmp_path / "b.sock")
    with BackendProgram("vhostuser.cli.blk", "--backend", "examples.sparse_dict:SparseDictDisk",
                        socket=sock, log=str(tmp_path / "b.log"), cwd=REPO) as prog:
        io(sock)
        assert proc_status(prog.pid)["Seccomp"] == "0"
        assert prog.terminate() == 0
    sock = str(tmp_path / "c.sock")
    with BackendProgram("vhostuser.cli.blk", "--backend", "examples.sparse_dict:SparseDictDisk",
                        "--sandbox", "on", "--user", "nobody", socket=sock,
                        log=str(tmp_path / "c.log"), cwd=REPO) as prog:
        wait_sandboxed(prog.pid)
        io(sock)
        confined(prog.pid, NOBODY, int(proc_status(prog.pid)["Gid"].split()[0]))
        assert prog.terminate() == 0, prog.output()


def test_a_python_backend_names_the_calls_it_needs(tmp_path):
    """sandbox_syscalls on the class (and --seccomp-allow) widen the filter:
    a back-end that reads its clock with times(2) runs only with it."""
    mod = tmp_path / "timesdisk.py"
    mod.write_text(
        "import os\n"
        "from vhostuser.blk import BlockBackend\n"
        "class TimesDisk(BlockBackend):\n"
        "    sandbox_syscalls = ()\n"
        "    def size(self):\n"
        "        return 1 << 20\n"
        "    def read(self, offset, bufs):\n"
        "        os.times()\n"
        "        for b in bufs:\n"
        "            b[:] = bytes(len(b))\n"
        "    def write(self, offset, bufs):\n"
        "        pass\n"
        "class NamedTimesDisk(TimesDisk):\n"
        "    sandbox_syscalls = ('times',)\n")
    env = {"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    for cls, extra, works in (("TimesDisk", [], False), ("NamedTimesDisk", [], True),
                              ("TimesDisk", ["--seccomp-allow", "times"], True)):
        sock = str(tmp_path / f"{cls}{len(extra)}.sock")
        with BackendProgram("vhostuser.cli.blk", "--backend", f"timesdisk:{cls}", "--sandbox",
                            "on", *extra, socket=sock, log=str(tmp_path / f"{cls}.log"),
                            env=env) as prog:
            wait_sandboxed(prog.pid)
            if works:
                with Frontend.connect(sock, wait=20) as fe:
                    assert BlkClient.setup(fe).read(0, 512) == bytes(512)
                assert prog.terminate() == 0, prog.output()
            else:
                with Frontend.connect(sock, wait=20) as fe:
                    blk = BlkClient.setup(fe)
                    with pytest.raises(Exception):
                        blk.read(0, 512)
                assert prog.proc.wait(20) == -31, prog.output()


@pytest.mark.parametrize("argv, message", [
    (["--seccomp-allow", "no_such_call"],
     "vhostuser-blk: --seccomp-allow: 'no_such_call' is not a system call on this machine"),
    (["--user", "no-such-user-here"], "vhostuser-blk: sandbox: --user no-such-user-here: "
                                       "no such user"),
    (["--group", "no-such-group-here"], "vhostuser-blk: sandbox: --group no-such-group-here: "
                                         "no such group"),
    (["--sandbox", "off", "--user", "nobody"],
     "vhostuser-blk: --user is for the sandbox, which is off"),
])
def test_bad_sandbox_options_are_one_line(tmp_path, argv, message):
    r = subprocess.run([sys.executable, "-m", "vhostuser.cli.blk", "--socket-path",
                        str(tmp_path / "x.sock"), "--ramdisk", "1M", *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == message, r.stderr


def test_connect_mode_reconnects_through_the_helper(tmp_path):
    """--connect: the socket's path is out of the view; the helper connects,
    each time the front-end comes back."""
    path = str(tmp_path / "qemu.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(30)
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vhostuser.cli.blk", "--connect", path,
                                 "--ramdisk", "4M", "-v"], stdout=out, stderr=out)
    try:
        for _ in range(2):
            conn, _ = listener.accept()
            wait_sandboxed(proc.pid)
            fe = Frontend(FrontendConnection(conn))
            blk = BlkClient.setup(fe)
            blk.write(0, b"r" * 512)
            assert blk.read(0, 512) == b"r" * 512
            fe.close()
        assert view(proc.pid) == []
    finally:
        proc.terminate()
        assert proc.wait(20) == 0, log.read_text()
        listener.close()


# -- the daemon ------------------------------------------------------------------------

@pytest.fixture
def allowed(tmp_path):
    d = tmp_path / "allowed"
    d.mkdir()
    with open(d / "in.img", "wb") as f:
        f.truncate(4 << 20)
    with open(tmp_path / "out.img", "wb") as f:
        f.truncate(4 << 20)
    return d


def test_daemon_adds_only_under_its_directories(tmp_path, allowed):
    """--allow-dir: images and sockets there, nothing elsewhere; the default
    kinds leave nbd and rbd out of the filter; TAPs only by --allow-tap."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    d = DaemonProcess(str(workdir), "--user", "nobody", allow_dirs=(str(allowed),),
                      backends=None)
    try:
        st = wait_sandboxed(d.proc.pid)
        confined(d.proc.pid, NOBODY, int(st["Gid"].split()[0]))
        assert view(d.proc.pid) == []
        got = d.call("add", type="blk", name="in", socket=str(allowed / "in.sock"),
                     file=str(allowed / "in.img"))
        assert got["device"]["aio"] == "io_uring"
        io(str(allowed / "in.sock"))
        refusals = {
            "file": {"file": str(tmp_path / "out.img"), "socket": str(allowed / "x.sock")},
            "socket": {"ramdisk": "1M", "socket": str(tmp_path / "x.sock")},
            "symlink": {"file": str(allowed / "link.img"), "socket": str(allowed / "y.sock")},
            "nbd": {"nbd": "nbd://127.0.0.1:10809/", "socket": str(allowed / "z.sock")},
        }
        os.symlink(tmp_path / "out.img", allowed / "link.img")
        codes = {}
        for what, spec in refusals.items():
            with pytest.raises(ControlError) as err:
                d.call("add", type="blk", name=what, **spec)
            codes[what] = (err.value.code, err.value.message)
        assert codes["file"] == ("bad-args", f"'blk_file': {tmp_path}/out.img: outside the "
                                 f"directories the sandboxed daemon may use (--allow-dir: "
                                 f"{os.path.realpath(workdir)}, {os.path.realpath(allowed)})")
        assert codes["socket"][0] == "bad-args" and "outside the directories" in codes["socket"][1]
        assert codes["symlink"][0] == "bad-args" and "outside the directories" in codes["symlink"][1]
        assert codes["nbd"][0] == "not-supported" and "--backends" in codes["nbd"][1]
        with pytest.raises(ControlError) as err:
            d.call("add", type="net", name="t", socket=str(allowed / "t.sock"), tap="vhu-no")
        assert err.value.code == "backend-error" and "--allow-tap" in err.value.message
        assert [e["name"] for e in d.call("list")] == ["in"]
        d.call("remove", name="in")
        assert not os.path.exists(allowed / "in.sock")
        # a socket given back can be served again (the helper binds it)
        d.call("add", type="blk", name="again", socket=str(allowed / "in.sock"), ramdisk="1M")
        io(str(allowed / "in.sock"))
    finally:
        rc = d.terminate()
    assert rc == 0, d.output()
    assert "Traceback" not in d.output(), d.output()
    assert not os.path.exists(allowed / "in.sock")


def test_daemon_remote_kinds_widen_the_filter_and_view(tmp_path):
    """--backends with nbd: sockets and connect are in the filter, and the
    allowed directories are in the view, read-only (libnbd connects to a
    server socket there by itself)."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    d = DaemonProcess(str(workdir), backends="file,ramdisk,nbd")
    try:
        wait_sandboxed(d.proc.pid)
        seen = view(d.proc.pid)
        assert os.path.realpath(workdir).lstrip("/") in seen
        assert all(p.startswith(("tmp", "etc")) for p in seen), seen
        with pytest.raises(ControlError) as err:
            d.call("add", type="net", name="n", socket=d.path("n.sock"), tap="x")
        assert err.value.code == "not-supported"
    finally:
        assert d.terminate() == 0, d.output()


def test_every_kind_has_a_policy_and_names_resolve():
    for program in policy.PROGRAMS:
        for kind in policy.KINDS:
            p = policy.build(program, [kind])
            assert "execve" not in p.allowed_names() and "ptrace" not in p.allowed_names()
            assert "socket" not in p.allowed_names() or kind in ("nbd", "rbd")
    with pytest.raises(policy.PolicyError):
        policy.build("blk", ["no-such-kind"])


API_SCRIPT = r"""
import sys
from vhostuser.sandbox import Sandbox, Settings

sandbox = Sandbox("blk", Settings(user="nobody"))      # first thing, one thread only
from vhostuser.blk import BlkDevice, RamBackend
from vhostuser.server import Server, new_event_loop

device = BlkDevice(RamBackend(4 << 20))
server = Server(device, path=sys.argv[1])
server.open()
report = sandbox.enter(["ramdisk"], sockets=[sys.argv[1]])
print(report.summary(), flush=True)
new_event_loop().run_until_complete(server.serve())
"""


def test_the_python_api(tmp_path):
    """operations.md's "A Python back-end in the sandbox", in a program of
    one's own: Sandbox first, enter once the socket is bound, then serve."""
    sock = str(tmp_path / "api.sock")
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", API_SCRIPT, sock], stdout=out,
                                stderr=out)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        st = wait_sandboxed(proc.pid)
        io(sock)
        confined(proc.pid, NOBODY, int(st["Gid"].split()[0]))
        assert view(proc.pid) == []
        assert "sandbox: uid 65534" in log.read_text()
    finally:
        proc.kill()
        proc.wait()
