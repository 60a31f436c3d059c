"""Where the kernel won't give a mount namespace: a container's root without
CAP_SYS_ADMIN chroots into an empty directory; without CAP_SYS_CHROOT too,
the view stays the host's and the program says so, while the filter and
the privilege drop still hold. And a program that isn't root (a systemd
DynamicUser=) builds its view in a user namespace."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vhostuser.frontend import BlkClient, Frontend
from vhostuser_devkit.sandbox import caps, proc_status, view, wait_sandboxed

CAPSH = shutil.which("capsh")


def serve_and_check(tmp_path, prefix: list[str], *, expect_view: str, user_ns=False):
    sock = tmp_path / "s.sock"
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    os.chmod(image, 0o666)
    log = tmp_path / "log"
    argv = [sys.executable, "-m", "vhostuser.cli.blk", "--socket-path", str(sock),
            "--blk-file", str(image), "-v"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(prefix + argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        t0 = time.monotonic()
        while not sock.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() - t0 < 30, log.read_text()
            time.sleep(0.05)
        st = wait_sandboxed(proc.pid)
        with Frontend.connect(str(sock), wait=10) as fe:
            blk = BlkClient.setup(fe)
            blk.write(0, b"f" * 4096)
            assert blk.read(0, 4096) == b"f" * 4096
        assert st["NoNewPrivs"] == "1"
        assert caps(proc_status(proc.pid))["CapEff"] == 0
        text = log.read_text()
        assert f"view {expect_view}" in text, text
        if expect_view in ("pivot_root", "chroot"):
            assert view(proc.pid) == []
        else:
            assert "the filesystem view is not restricted" in text, text
            assert len(view_top(proc.pid)) > 3          # the host's root
    finally:
        proc.terminate()
        rc = proc.wait(30)
    assert rc == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def view_top(pid: int) -> list[str]:
    return os.listdir(f"/proc/{pid}/root")


@pytest.mark.skipif(CAPSH is None, reason="capsh not installed (libcap2-bin)")
def test_root_without_cap_sys_admin_chroots(tmp_path):
    serve_and_check(tmp_path, [CAPSH, "--drop=cap_sys_admin", "--", "-c", 'exec "$@"', "sh"],
                    expect_view="chroot")


@pytest.mark.skipif(CAPSH is None, reason="capsh not installed (libcap2-bin)")
def test_without_either_the_view_stays_and_says_why(tmp_path):
    serve_and_check(tmp_path, [CAPSH, "--drop=cap_sys_admin,cap_sys_chroot", "--", "-c",
                               'exec "$@"', "sh"], expect_view="none")


def test_not_root_uses_a_user_namespace(tmp_path):
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to become nobody")
    probe = subprocess.run([setpriv, "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                            sys.executable, "-c", "import subprocess, sys, vhostuser.native; "
                            "subprocess.run([sys.executable, '-I', '-S', '-c', ''], check=True)"],
                           capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if probe.returncode != 0:
        pytest.skip(f"this Python and checkout aren't usable by nobody: "
                    f"{probe.stderr.strip().splitlines()[-1:]}")
    # pytest's own temporary directories are root's alone (0700 all the way
    # down from /tmp/pytest-of-root): nobody needs one it can reach.
    where = Path(tempfile.mkdtemp(prefix="vhu-nobody-", dir="/tmp"))
    try:
        os.chmod(where, 0o777)
        serve_and_check(where, [setpriv, "--reuid", "nobody", "--regid", "nogroup",
                                "--clear-groups"], expect_view="pivot_root", user_ns=True)
    finally:
        shutil.rmtree(where, ignore_errors=True)
