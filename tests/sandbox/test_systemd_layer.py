"""The sandboxed unit of docs/operations.md ("Under systemd: a second
layer"): systemd-analyze accepts it, and its SystemCallFilter= lets our own
sandbox set itself up and serve (emulated: the same groups as a seccomp
filter that kills, loaded before the program is exec'd, as systemd does)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhostuser.frontend import BlkClient, Frontend
from vhostuser_devkit.sandbox import proc_status, view, wait_sandboxed

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "operations.md"
SOCKET_UNIT = REPO / "examples" / "systemd" / "vhostuser-blk@.socket"


def analyze() -> str:
    for c in (shutil.which("systemd-analyze"), "/usr/bin/systemd-analyze"):
        if c and os.access(c, os.X_OK):
            return c
    pytest.skip("systemd-analyze not installed (Debian package systemd)")


def unit_text() -> str:
    """The block marked <!-- doc-test: sandboxed-unit -->."""
    lines = GUIDE.read_text().splitlines()
    i = lines.index("<!-- doc-test: sandboxed-unit -->")
    assert lines[i + 1].startswith("```")
    end = lines.index("```", i + 2)
    return "\n".join(lines[i + 2:end]) + "\n"


def directive(text: str, key: str) -> str:
    values = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]
    assert len(values) == 1, (key, values)
    return values[0]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    tool = analyze()
    program = shutil.which("vhostuser-blk")
    if program is None:
        pytest.skip("vhostuser-blk is not on $PATH (pip install the package)")
    text = unit_text().replace("/usr/local/bin/vhostuser-blk", program)
    (tmp_path / "vhostuser-blk@.service").write_text(text)
    shutil.copy(SOCKET_UNIT, tmp_path / "vhostuser-blk@.socket")
    names = [str(tmp_path / f"vhostuser-blk@vm1.{k}") for k in ("socket", "service")]
    r = subprocess.run([tool, "verify", *names], capture_output=True, text=True, cwd=tmp_path,
                       timeout=60)
    complaints = [line for line in (r.stdout + r.stderr).splitlines()
                  if "vhostuser-blk@" in line]
    if r.returncode != 0 and not complaints and "bus" in r.stderr.lower():
        pytest.skip(f"systemd-analyze verify cannot run here: {r.stderr.strip()}")
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


def allowed_syscalls(tool: str, spec: str) -> list[str]:
    """SystemCallFilter= words -> system call names, through systemd-analyze."""
    names = set()
    for word in spec.split():
        if not word.startswith("@"):
            names.add(word)
            continue
        out = subprocess.run([tool, "syscall-filter", word], capture_output=True, text=True,
                             check=True, timeout=30).stdout
        for line in out.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("@"):
                if line != word:
                    names.update(allowed_syscalls(tool, line))
            else:
                names.add(line)
    return sorted(names)


LAUNCHER = r"""
import os, sys
from vhostuser.sandbox import seccomp
names = sys.argv[1].split(",")
f = seccomp.Filter(seccomp.ACT_KILL_PROCESS)
for n in names:
    f.add(seccomp.ACT_ALLOW, n)
f.load()
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def test_the_units_system_call_filter_lets_our_sandbox_work(tmp_path):
    """Every call our program makes before its own filter (imports, the
    helper, the mount namespace, pivot_root, seccomp) and after it is in the
    unit's SystemCallFilter= groups: here they kill instead of EPERM, so a
    missing one fails loudly."""
    tool = analyze()
    spec = directive(unit_text(), "SystemCallFilter")
    names = allowed_syscalls(tool, spec)
    assert "seccomp" in names and "pivot_root" in names
    sock = tmp_path / "s.sock"
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, ",".join(names), "-m", "vhostuser.cli.blk",
             "--socket-path", str(sock), "--blk-file", str(image), "--num-queues", "2", "-v"],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, (proc.returncode, log.read_text())
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        # Already in filter mode under systemd's filter: wait for ours too.
        wait_sandboxed(proc.pid, filters=2)
        assert proc_status(proc.pid)["Seccomp_filters"] == "2"     # systemd's and ours
        with Frontend.connect(str(sock), wait=10) as fe:
            blk = BlkClient.setup(fe, queues=2)
            data = os.urandom(1 << 16)
            blk.write(0, data, queue=1)
            blk.flush()
            assert blk.read(0, len(data)) == data
        assert view(proc.pid) == []
    finally:
        proc.terminate()
        rc = proc.wait(30)
    assert rc == 0, (rc, log.read_text())
    assert re.search(r"view pivot_root", log.read_text())
