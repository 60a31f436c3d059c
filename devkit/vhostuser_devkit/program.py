"""A back-end program (vhostuser-blk, vhostuser-net, ...) run as a process
for a test: started, waited for until its socket exists, and stopped the
way a service manager does (SIGTERM, then SIGKILL if it hangs)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from vhostuser.errors import VhostUserError


class ProgramError(VhostUserError, AssertionError):
    """The program exited early, never listened, or didn't stop cleanly."""


class BackendProgram:
    """``with BackendProgram("vhostuser.cli.blk", "--ramdisk", "1M",
    socket=path, log=log_path) as prog:`` runs ``python -m MODULE ARGS
    --socket-path SOCKET`` until the block ends."""

    def __init__(self, module: str, *args: str, socket: str, log: str,
                 cwd: str | None = None, timeout: float = 20.0,
                 socket_option: str = "--socket-path", env: dict[str, str] | None = None):
        """``env``: variables added to the program's environment."""
        self.socket = str(socket)
        self.log = str(log)
        self.argv = [sys.executable, "-m", module, socket_option, self.socket, *args]
        self.cwd = cwd
        self.env = env
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def start(self) -> "BackendProgram":
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, cwd=self.cwd,
                                         env=None if self.env is None else {**os.environ,
                                                                            **self.env})
        deadline = time.monotonic() + self.timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                raise ProgramError(f"{self.argv[2]} exited with {self.proc.returncode}:\n"
                                   f"{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise ProgramError(f"{self.socket} did not appear:\n{self.output()}")
            time.sleep(0.05)
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and the exit status; SIGKILL (and ProgramError) if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise ProgramError(f"no exit {timeout} s after SIGTERM:\n{self.output()}")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "BackendProgram":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
