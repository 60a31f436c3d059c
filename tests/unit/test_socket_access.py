"""Who may connect to a socket we make: --socket-group and --socket-mode
(vhostuser-blk, vhostuser-net, daemon exports, the control socket), applied
as the socket is made, so that no client ever finds it with the wrong
group or mode (issue 16: QEMU run by libvirt as libvirt-qemu).

The race tests watch the socket path from another process, run as an
unprivileged user in the socket's group: it stats and connects to
whatever is at the path, as fast as it can, while sockets are made there
again and again. It must never see another group or mode, and never be
refused for permission. A deliberately naive maker (bind, then chown and
chmod) shows the watcher catches such a window."""
from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vhostuser.frontend import BlkClient, Frontend
from vhostuser.server import bind_unix, parse_socket_mode, resolve_group
from vhostuser_devkit.daemon import DaemonProcess
from vhostuser_devkit.program import BackendProgram

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a socket's group and "
                                                         "running a watcher as nobody need root")


def other_group() -> tuple[str, int]:
    """A group the tests give sockets to: kvm (QEMU's under libvirt) when
    the machine has it."""
    for name in ("kvm", "nogroup"):
        try:
            return name, grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    pytest.skip("neither group kvm nor nogroup exists")


@pytest.fixture
def open_dir():
    """A directory anyone may traverse (as a socket directory for QEMU is),
    with a subdirectory ``socks`` for the sockets."""
    top = tempfile.mkdtemp(prefix="vhu-acc-", dir="/tmp")
    os.chmod(top, 0o755)
    d = Path(top) / "socks"
    d.mkdir()
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(top, ignore_errors=True)


# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text, mode", [("0660", 0o660), ("660", 0o660), ("0o640", 0o640),
                                        ("600", 0o600), ("0777", 0o777)])
def test_socket_mode_is_octal(text, mode):
    assert parse_socket_mode(text) == mode


@pytest.mark.parametrize("text", ["", "rw", "0668", "4660", "1777", "12345", "0x1b6"])
def test_bad_socket_modes_are_refused(text):
    with pytest.raises(ValueError):
        parse_socket_mode(text)


def test_groups_by_name_or_number():
    name, gid = other_group()
    assert resolve_group(name) == gid == resolve_group(str(gid)) == resolve_group(gid)
    with pytest.raises(ValueError, match="no group named"):
        resolve_group("no-such-group-here")


# --------------------------------------------------------------------------
# bind_unix
# --------------------------------------------------------------------------

def test_defaults_private_or_group_readable(open_dir):
    name, gid = other_group()
    a = bind_unix(str(open_dir / "a.sock"))
    b = bind_unix(str(open_dir / "b.sock"), gid=gid) if os.geteuid() == 0 else None
    c = bind_unix(str(open_dir / "c.sock"), mode=0o640)
    try:
        assert stat.S_IMODE(os.stat(open_dir / "a.sock").st_mode) == 0o600
        if b is not None:
            st = os.stat(open_dir / "b.sock")
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
        assert stat.S_IMODE(os.stat(open_dir / "c.sock").st_mode) == 0o640
        # nothing of the private directories is left behind
        assert sorted(os.listdir(open_dir)) == [f"{x}.sock" for x in "abc" if x != "b" or b]
    finally:
        for s in (a, b, c):
            if s is not None:
                s.close()


def test_path_too_long_is_refused_with_its_length(tmp_path):
    path = str(tmp_path / ("x" * (108 - len(str(tmp_path)))))
    with pytest.raises(Exception, match=r"too long \(\d+ bytes, at most 107\)"):
        bind_unix(path)


def test_long_path_still_binds_through_the_private_directory(tmp_path):
    """The private directory's name is longer than the socket's: binding
    there must not hit the 107-byte limit for a path that itself fits."""
    path = str(tmp_path / ("y" * (107 - len(str(tmp_path)) - 1)))
    assert len(path) == 107
    sock = bind_unix(path, mode=0o640)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
    finally:
        sock.close()


@needs_root
def test_a_group_we_are_not_in_is_refused_unprivileged(open_dir):
    """Only root or a member may give a file to a group: the error says so."""
    name, gid = other_group()
    nobody = pwd.getpwnam("nobody")
    os.chown(open_dir, nobody.pw_uid, -1)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                        # the child: nobody, not in the group
        try:
            os.close(read)
            _drop_to(nobody.pw_uid, nobody.pw_gid, [])()
            try:
                bind_unix(str(open_dir / "x.sock"), gid=gid)
                os.write(write, b"bound")
            except Exception as exc:
                os.write(write, str(exc).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        said = f.read()
    os.waitpid(pid, 0)
    assert f"can't give the socket to group {gid}: only root or a member" in said, said
    assert os.listdir(open_dir) == []


# --------------------------------------------------------------------------
# the race: a watcher in the socket's group, the socket made again and again
# --------------------------------------------------------------------------

WATCHER = r"""
import errno, json, os, socket, sys, time
path, until = sys.argv[1], time.monotonic() + float(sys.argv[2])
seen, states, outcomes = 0, {}, {}
while time.monotonic() < until and not os.path.exists(path + ".stop"):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        continue
    seen += 1
    key = f"{st.st_mode & 0o7777:o}:{st.st_gid}"
    states[key] = states.get(key, 0) + 1
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    try:
        s.connect(path)
        what = "connected"
    except OSError as exc:
        what = errno.errorcode.get(exc.errno, str(exc.errno))
    s.close()
    outcomes[what] = outcomes.get(what, 0) + 1
print(json.dumps({"seen": seen, "states": states, "outcomes": outcomes}))
"""


def _drop_to(uid: int, gid: int, groups: list[int]):
    def drop():
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    return drop


class Watcher:
    """The watcher process, as nobody with the socket's group as a
    supplementary group (as libvirt-qemu has kvm)."""

    def __init__(self, path, gid: int, seconds: float = 60.0):
        nobody = pwd.getpwnam("nobody")
        self.path = str(path)
        # the system's Python: nobody may not be able to run ours (in /root)
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        self.proc = subprocess.Popen([python, "-c", WATCHER, self.path, str(seconds)],
                                     stdout=subprocess.PIPE, text=True,
                                     preexec_fn=_drop_to(nobody.pw_uid, nobody.pw_gid, [gid]))

    def result(self) -> dict:
        open(self.path + ".stop", "w").close()
        out, _ = self.proc.communicate(timeout=90)
        os.unlink(self.path + ".stop")
        return json.loads(out)


def naive_bind(path: str, mode: int, gid: int) -> socket.socket:
    """What a program does without thinking about the window: bind, then
    chown and chmod (here with a pause to make the window visible)."""
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    time.sleep(0.002)
    os.chown(path, -1, gid)
    os.chmod(path, mode)
    sock.listen(4)
    return sock


def churn(make, path: str, rounds: int) -> None:
    """Makes the socket ``rounds`` times: half over a stale socket file
    (rename), half at an empty path (link)."""
    for i in range(rounds):
        sock = make()
        time.sleep(0.001)
        sock.close()
        if i % 2:
            os.unlink(path)
        time.sleep(0.001)


@needs_root
def test_the_watcher_catches_a_naive_maker(open_dir):
    """The watcher is able to see a window: with bind-then-chmod it does."""
    name, gid = other_group()
    path = str(open_dir / "naive.sock")
    watcher = Watcher(path, gid)
    time.sleep(0.3)
    churn(lambda: naive_bind(path, 0o660, gid), path, 100)
    got = watcher.result()
    wrong = {k: n for k, n in got["states"].items() if k != f"660:{gid}"}
    assert wrong, got


@needs_root
def test_no_client_sees_a_socket_with_the_wrong_group_or_mode(open_dir, capsys):
    name, gid = other_group()
    path = str(open_dir / "s.sock")
    watcher = Watcher(path, gid)
    time.sleep(0.3)
    churn(lambda: bind_unix(path, mode=0o660, gid=gid), path, 600)
    got = watcher.result()
    with capsys.disabled():
        print(f"\n[bind_unix x600] watcher: {got}")
    assert got["seen"] > 100, got
    assert got["states"] == {f"660:{gid}": got["seen"]}, got
    # listening whenever it is new; refused only once closed (a stale file)
    assert "EACCES" not in got["outcomes"] and "EPERM" not in got["outcomes"], got
    assert got["outcomes"].get("connected", 0) > 0, got


@needs_root
@pytest.mark.parametrize("program", ["blk", "net"])
def test_program_restarts_never_show_the_wrong_group_or_mode(open_dir, program, capsys):
    """vhostuser-blk/-net killed (-9, leaving a stale socket) and started
    again, as under <reconnect>: QEMU in the group is never refused."""
    name, gid = other_group()
    path = open_dir / f"{program}.sock"
    args = ["--ramdisk", "1M"] if program == "blk" else ["--sink"]
    watcher = Watcher(path, gid)
    for i in range(6):
        old = os.lstat(path).st_ino if path.exists() else None
        with BackendProgram(f"vhostuser.cli.{program}", *args, "--socket-group", name,
                            "--socket-mode", "0660", socket=path,
                            log=open_dir.parent / f"{program}.log") as prog:
            deadline = time.monotonic() + 20
            while not path.exists() or os.lstat(path).st_ino == old:   # the new socket
                assert prog.proc.poll() is None and time.monotonic() < deadline, prog.output()
                time.sleep(0.01)
            time.sleep(0.1)
            prog.kill()
        assert path.exists()           # left behind by kill -9: stale
    got = watcher.result()
    with capsys.disabled():
        print(f"\n[vhostuser-{program} x6 kill -9] watcher: {got}")
    assert got["seen"] > 0 and got["states"] == {f"660:{gid}": got["seen"]}, got
    assert "EACCES" not in got["outcomes"], got


# --------------------------------------------------------------------------
# the programs, the daemon, vhostuser-ctl
# --------------------------------------------------------------------------

def run_program(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("argv, message", [
    (["vhostuser.cli.blk", "--fd", "3", "--ramdisk", "1M", "--socket-group", "kvm"],
     "vhostuser-blk: --socket-group is for a socket made at --socket-path; an inherited --fd "
     "socket's maker sets it (systemd: SocketGroup=, SocketMode=)"),
    (["vhostuser.cli.net", "--connect", "/tmp/x.sock", "--sink", "--socket-mode", "0660"],
     "vhostuser-net: --socket-mode is for a socket made at --socket-path; with --connect QEMU "
     "makes the socket"),
    (["vhostuser.cli.blk", "--socket-path", "/tmp/vhu-never.sock", "--ramdisk", "1M",
      "--socket-mode", "0866"],
     "vhostuser-blk: --socket-mode: socket mode must be octal, like 0660, not '0866'"),
    (["vhostuser.cli.net", "--socket-path", "/tmp/vhu-never.sock", "--sink",
      "--socket-group", "no-such-group-here"],
     "vhostuser-net: --socket-group: no group named 'no-such-group-here'"),
    (["vhostuser.cli.daemon", "--control", "/tmp/vhu-never.sock", "--control-mode", "8"],
     "vhostuser-daemon: --control-mode: socket mode must be octal, like 0660, not '8'"),
    (["vhostuser.cli.blk", "--socket-path", "/nonexistent-vhu/x.sock", "--ramdisk", "1M"],
     "vhostuser-blk: /nonexistent-vhu/x.sock: directory /nonexistent-vhu does not exist"),
    (["vhostuser.cli.daemon", "--control", "/nonexistent-vhu/c.sock"],
     "vhostuser-daemon: --control: /nonexistent-vhu/c.sock: directory /nonexistent-vhu does "
     "not exist"),
    (["vhostuser.cli.net", "--socket-path", "/tmp/" + "n" * 103, "--sink"],
     "vhostuser-net: /tmp/" + "n" * 103 + ": socket path too long (108 bytes, at most 107)"),
])
def test_socket_option_mistakes_are_one_line(argv, message):
    r = run_program(*argv)
    assert (r.returncode, r.stderr) == (1, message + "\n"), r.stderr
    assert not os.path.exists("/tmp/vhu-never.sock")


@needs_root
def test_programs_make_their_sockets_as_asked(open_dir):
    name, gid = other_group()
    for module, args in (("vhostuser.cli.blk", ["--ramdisk", "1M"]),
                         ("vhostuser.cli.net", ["--loopback"])):
        path = open_dir / "p.sock"
        with BackendProgram(module, *args, "--socket-group", name, socket=path,
                            log=open_dir.parent / "p.log") as prog:
            st = os.stat(path)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid), module
            assert prog.terminate() == 0
        with BackendProgram(module, *args, "--socket-mode", "0604", socket=path,
                            log=open_dir.parent / "p.log") as prog:
            st = os.stat(path)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o604, os.getegid()), module
            assert prog.terminate() == 0
    # --switch: every port's socket
    paths = [open_dir / f"port{i}.sock" for i in range(2)]
    with BackendProgram("vhostuser.cli.net", "--switch", "--socket-path", str(paths[1]),
                        "--socket-group", name, "--socket-mode", "0620", socket=paths[0],
                        log=open_dir.parent / "sw.log") as prog:
        deadline = time.monotonic() + 20
        while not paths[1].exists():
            assert time.monotonic() < deadline, prog.output()
            time.sleep(0.05)
        for p in paths:
            st = os.stat(p)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o620, gid), p
        assert prog.terminate() == 0


@needs_root
def test_daemon_exports_and_control_socket_get_group_and_mode(open_dir):
    name, gid = other_group()
    d = DaemonProcess(str(open_dir), "--control-group", name)
    try:
        st = os.stat(d.control)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
        # vhostuser-ctl: the options of the same names
        d.ctl("add-blk", "d0", "--socket-path", "d0.sock", "--ramdisk", "1M",
              "--socket-group", name, "--socket-mode", "0640")
        st = os.stat(d.path("d0.sock"))
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, gid)
        spec = d.call("describe", name="d0")["spec"]
        assert (spec["socket_group"], spec["socket_mode"]) == (name, "0640")
        # a spec: the keys of the same names; numbers are groups too
        d.call("add", type="net", name="n0", socket_path=d.path("n0.sock"), backend="null",
               socket_group=gid)
        st = os.stat(d.path("n0.sock"))
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
        # stop/start makes the socket again, the same way
        d.call("stop", name="d0")
        assert not os.path.exists(d.path("d0.sock"))
        d.call("start", name="d0")
        st = os.stat(d.path("d0.sock"))
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, gid)
        with Frontend.connect(d.path("d0.sock")) as fe:
            blk = BlkClient.setup(fe)
            blk.write(0, b"g" * 512)
            assert blk.read(0, 512) == b"g" * 512
        r = d.ctl("add-blk", "d1", "--socket-path", "d1.sock", "--ramdisk", "1M",
                  "--socket-mode", "999", check=False)
        assert r.returncode == 1
        assert r.stderr == ("vhostuser-ctl: bad-args: 'socket_mode': socket mode must be "
                            "octal, like 0660, not '999'\n"), r.stderr
        r = d.ctl("add-blk", "d1", "--socket-path", "d1.sock", "--ramdisk", "1M",
                  "--socket-group", "no-such-group-here", check=False)
        assert r.returncode == 1 and "no group named 'no-such-group-here'" in r.stderr
        assert not os.path.exists(d.path("d1.sock"))
    finally:
        assert d.terminate() == 0, d.output()
