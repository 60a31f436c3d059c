"""NBD servers for tests: ``qemu-nbd`` and ``nbdkit`` in the foreground,
on a unix socket or a loopback TCP port, that a test can kill, freeze
(SIGSTOP) and start again on the same address."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from vhostuser.errors import VhostUserError

#: Debian packages: program -> package.
PACKAGES = {"qemu-nbd": "qemu-utils", "nbdkit": "nbdkit"}
LIBNBD_PACKAGE = "libnbd0"
START_TIMEOUT = 10.0


class NbdServerError(VhostUserError, RuntimeError):
    """The server didn't start (the message carries its stderr)."""


def missing() -> list[str]:
    """What the NBD tests need and isn't here, as Debian package names."""
    from vhostuser.blk import libnbd
    out = [pkg for prog, pkg in PACKAGES.items() if shutil.which(prog) is None]
    if not libnbd.available():
        out.append(LIBNBD_PACKAGE)
    return out


def require_tools() -> None:
    """Skips the calling test when the NBD tools are missing, or fails it
    where they must be there (``VHOSTUSER_REQUIRE_NBD=1``, as CI sets)."""
    import pytest
    absent = missing()
    if absent:
        reason = f"NBD tools missing: apt-get install {' '.join(absent)}"
        if os.environ.get("VHOSTUSER_REQUIRE_NBD") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NbdServer:
    """One server process. ``unix`` (a socket path) or ``port`` (on
    127.0.0.1) says where it listens; :attr:`uri` is for libnbd."""

    def __init__(self, argv: list[str], *, unix: str | None = None, port: int | None = None,
                 log_path: str | None = None):
        if (unix is None) == (port is None):
            raise ValueError("give one of unix, port")
        self.argv = argv
        self.unix = unix
        self.port = port
        self.log_path = log_path or os.devnull
        self.proc: subprocess.Popen | None = None
        self.paused = False

    # -- the two servers -------------------------------------------------------------------
    @classmethod
    def qemu_nbd(cls, image: str, *, unix: str | None = None, port: int | None = None,
                 read_only: bool = False, log_path: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> "NbdServer":
        # --persistent: stay up across client disconnects; --shared: several
        # connections (ours, plus the readiness probe) at once.
        argv = ["qemu-nbd", "-f", "raw", "--persistent", "--shared=16", "--discard=unmap"]
        argv += ["-k", unix] if unix else ["--bind", "127.0.0.1", "-p", str(port)]
        if read_only:
            argv.append("--read-only")
        return cls(argv + list(extra_args) + [image], unix=unix, port=port, log_path=log_path)

    @classmethod
    def nbdkit(cls, plugin: list[str], *, unix: str | None = None, port: int | None = None,
               read_only: bool = False, filters: tuple[str, ...] = (),
               log_path: str | None = None) -> "NbdServer":
        argv = ["nbdkit", "--foreground", "--exit-with-parent"]
        argv += ["-U", unix] if unix else ["-i", "127.0.0.1", "-p", str(port)]
        if read_only:
            argv.append("--readonly")
        argv += [f"--filter={f}" for f in filters]
        return cls(argv + plugin, unix=unix, port=port, log_path=log_path)

    @property
    def uri(self) -> str:
        if self.unix:
            return f"nbd+unix:///?socket={self.unix}"
        return f"nbd://127.0.0.1:{self.port}/"

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> "NbdServer":
        if self.unix and os.path.exists(self.unix):
            os.unlink(self.unix)        # left by a killed server: binding would fail
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        self.paused = False
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening():
            if self.proc.poll() is not None:
                raise NbdServerError(self.exit_report())
            if time.monotonic() > deadline:
                self.kill()
                raise NbdServerError(f"{self.argv[0]} not listening after {START_TIMEOUT}s")
            time.sleep(0.02)
        return self

    def _listening(self) -> bool:
        family, addr = ((socket.AF_UNIX, self.unix) if self.unix
                        else (socket.AF_INET, ("127.0.0.1", self.port)))
        with socket.socket(family) as s:
            s.settimeout(0.2)
            return s.connect_ex(addr) == 0

    def exit_report(self) -> str:
        """How the process ended, with the end of its log (once it has)."""
        return f"{self.argv[0]} exited with {self.proc.returncode}: {self.log_tail()}"

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace").strip()
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: connections break with no goodbye."""
        if self.alive:
            self.proc.kill()            # also ends a stopped process, which runs no more
        if self.proc is not None:
            self.proc.wait(10)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server).
        Returns once the process is stopped (signals arrive asynchronously)."""
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True
        self._wait_state(stopped=True)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False
        self._wait_state(stopped=False)

    def _wait_state(self, stopped: bool) -> None:
        # Every thread: qemu-nbd's workers can answer after the main one stopped.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                states = [_task_state(self.proc.pid, tid)
                          for tid in os.listdir(f"/proc/{self.proc.pid}/task")]
            except OSError:
                return                  # gone
            if all((s == "T") == stopped for s in states if s):
                return
            time.sleep(0.005)
        raise NbdServerError(f"{self.argv[0]} didn't {'stop' if stopped else 'continue'}")

    def restart(self) -> "NbdServer":
        self.kill()
        return self.start()

    def __enter__(self) -> "NbdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def _task_state(pid: int, tid: str) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]   # after the (command name)
    except (OSError, IndexError):
        return ""                       # the thread ended meanwhile
