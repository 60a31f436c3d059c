"""vhostuser-daemon as a user runs it: a process of its own, managed over
its control socket with the Python client or with vhostuser-ctl (a process
too). For tests and tools."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from vhostuser.manage import ControlClient


#: Every built-in back-end kind: a test may add any export, as before the
#: sandbox (whose default leaves out the remote ones). Python back-ends
#: ("python") import code at run time, so a daemon allowing them isn't
#: confined: tests that add them ask for WITH_PYTHON.
ALL_KINDS = "file,ramdisk,tap,null,nbd,rbd"
WITH_PYTHON = ALL_KINDS + ",python"


class DaemonProcess:
    def __init__(self, workdir: str, *extra: str, env: dict[str, str] | None = None,
                 cwd: str | None = None, allow_dirs: tuple[str, ...] = (),
                 backends: str | None = ALL_KINDS):
        """``env``: variables added to the daemon's environment; ``cwd``: its
        working directory (Python back-ends there import). The sandboxed
        daemon may use images and sockets in ``workdir`` and ``allow_dirs``,
        and serve the ``backends`` kinds (None: its default)."""
        self.dir = workdir
        self.control = os.path.join(workdir, "ctl.sock")
        self.log = open(os.path.join(workdir, "daemon.log"), "w+b")
        sandbox = [a for d in (workdir, *allow_dirs) for a in ("--allow-dir", str(d))]
        if backends is not None:
            sandbox += ["--backends", backends]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vhostuser.cli.daemon", "--control", self.control,
             "--prometheus", "127.0.0.1:0", "-v", *sandbox, *extra],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd,
            env=None if env is None else {**os.environ, **env})
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.output()}")
            try:
                with ControlClient(self.control, timeout=10) as c:
                    c.version()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon not ready: {self.output()}")

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def client(self) -> ControlClient:
        return ControlClient(self.control, timeout=30)

    def call(self, cmd: str, **args):
        with self.client() as c:
            return c.call(cmd, args or None)

    def ctl(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """vhostuser-ctl as a separate process."""
        r = subprocess.run([sys.executable, "-m", "vhostuser.cli.ctl", "--control", self.control,
                            *argv], capture_output=True, text=True, timeout=60, cwd=self.dir)
        if check and r.returncode != 0:
            raise AssertionError(f"vhostuser-ctl {argv}: {r.returncode} {r.stderr}")
        return r

    def ctl_json(self, *argv: str):
        return json.loads(self.ctl(*argv).stdout)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
