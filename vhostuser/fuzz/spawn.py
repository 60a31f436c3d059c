"""The back-end under test as a child process (``vhostuser-fuzz --spawn``).

Start-up waits until the back-end really serves (its socket answers
GET_FEATURES), retrying while it starts. Its stdout and stderr are kept,
bounded, so each case can be given what the back-end printed during it
(an ASan report, a ``vu_panic`` line), and how it died is recorded. Its
stdin is a pipe held open: programs such as ``dpdk-testpmd`` run until it
closes. It runs in its own session, so ``stop`` ends wrapper and back-end.
"""
from __future__ import annotations

import codecs
import ctypes
import collections
import os
import resource
import shlex
import signal
import subprocess
import threading
import time

from ..frontend import FrontendError
from . import cores
from .execute import accepted_frontend
from ..errors import VhostUserError

MAX_LINES = 4000        # lines kept from the back-end's output, over all cases
MAX_LINE = 2000         # characters kept of one line
CORE_DUMP_WAIT = 300.0  # seconds a process writing its core may take
CORE_FILTER = 0x31      # private anonymous memory, ELF headers, private huge pages


class SpawnError(VhostUserError, RuntimeError):
    """The back-end did not start serving."""


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the fuzzer dies, so a killed
    campaign leaves no back-end behind (it runs in its own session)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def describe_exit(returncode: int | None) -> str | None:
    """How a process ended, as reproducers record it; None while it runs."""
    if returncode is None:
        return None
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "?"
        return f"signal {-returncode} ({name})"
    return f"exit {returncode}"


class OutputLog:
    """Reads a stream on a thread into the last MAX_LINES lines, numbered
    from the start so that callers can ask for "everything since line N"."""

    def __init__(self, stream):
        self._stream = stream
        self._lines: collections.deque[str] = collections.deque(maxlen=MAX_LINES)
        self._count = 0            # lines ever read
        self._partial = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="backend-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = self._stream.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            text = self._partial + decoder.decode(chunk, final=not chunk)
            *lines, self._partial = text.split("\n")
            if not chunk and self._partial:
                lines.append(self._partial)
                self._partial = ""
            with self._lock:
                for line in lines:
                    self._lines.append(line.rstrip("\r")[:MAX_LINE])
                    self._count += 1
            if not chunk:
                return

    def mark(self) -> int:
        with self._lock:
            return self._count

    def since(self, mark: int, limit: int) -> list[str]:
        """The last ``limit`` lines read after ``mark`` (fewer if they were
        pushed out of the buffer)."""
        with self._lock:
            new = min(self._count - mark, len(self._lines))
            if new <= 0:
                return []
            lines = list(self._lines)[-new:]
        return lines[-limit:]

    def finish(self, timeout: float) -> None:
        """Waits (bounded: a grandchild may hold the pipe) for end of output."""
        self._thread.join(timeout)


class Spawner:
    """Starts the back-end from a command line (``{socket}`` is replaced)
    and restarts it after a failing case, so one bug does not poison the
    cases after it."""

    def __init__(self, command: str, socket_path: str, *, startup: float = 30.0,
                 probe_timeout: float = 2.0, cwd: str | None = None, env: dict | None = None,
                 core_dumps: bool = False):
        self.argv = [a.replace("{socket}", socket_path) for a in shlex.split(command)]
        if not self.argv:
            raise ValueError("empty --spawn command")
        self.socket_path = socket_path
        self.startup = startup
        self.probe_timeout = probe_timeout
        self.cwd = cwd
        self.env = env
        self.core_dumps = core_dumps
        self.proc: subprocess.Popen | None = None
        self.output: OutputLog | None = None
        self.exe: str | None = None          # the program that ended up running
        self.restarts = 0

    # -- life cycle ----------------------------------------------------------------
    def start(self, attempts: int = 3) -> None:
        why = ""
        for attempt in range(attempts):
            why = self._start_once()
            if not why:
                return
            self.stop()
            time.sleep(0.2 * (attempt + 1))   # e.g. the old process still holds the path
        tail = "\n".join(self._last_output(20))
        raise SpawnError(f"back-end {self.argv[0]} did not start: {why}"
                         + (f"\n{tail}" if tail else ""))

    def _start_once(self) -> str:
        """'' once the back-end serves, else why not."""
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        if self.core_dumps:
            self._allow_core(self.proc.pid)
        self.output = OutputLog(self.proc.stdout)
        deadline = time.monotonic() + self.startup
        while True:
            if self.proc.poll() is not None:
                return f"it exited ({describe_exit(self.proc.returncode)})"
            if os.path.exists(self.socket_path):
                try:
                    accepted_frontend(self.socket_path, self.probe_timeout).close()
                    self._note_exe()
                    return ""
                except (FrontendError, OSError) as exc:
                    why = f"its socket does not serve yet: {exc}"
            else:
                why = f"no socket at {self.socket_path}"
            if time.monotonic() > deadline:
                return f"{why} after {self.startup:.0f}s"
            time.sleep(0.05)

    @staticmethod
    def _allow_core(pid: int) -> None:
        """Core dumps on, without shared mappings: the guest memory a
        front-end lent (a fuzz case may describe a region of a terabyte)
        would make the dump take minutes and tell nothing."""
        try:
            resource.prlimit(pid, resource.RLIMIT_CORE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            with open(f"/proc/{pid}/coredump_filter", "w") as f:
                f.write(f"{CORE_FILTER:#x}")
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            pass

    def _note_exe(self) -> None:
        try:
            self.exe = os.readlink(f"/proc/{self.proc.pid}/exe")
        except OSError:
            self.exe = None

    def alive(self) -> bool:
        """Running and not dying: a process writing its core dump still
        holds its socket open, but will never serve again."""
        return self.proc is not None and self.proc.poll() is None and not self.dumping_core()

    def dumping_core(self) -> bool:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("CoreDumping:"):
                        return line.split()[1] == "1"
        except (OSError, IndexError):
            pass
        return False

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                proc.stdin.close()          # testpmd waits for its stdin to end
            except OSError:
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                proc.wait()
        else:
            self._signal(signal.SIGKILL)    # whatever the wrapper left behind
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        if self.output:
            self.output.finish(1.0)
        self.proc = None

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)   # its own session: pid is the group id
        except (ProcessLookupError, PermissionError):
            pass

    # -- evidence ------------------------------------------------------------------
    def mark(self) -> int:
        return self.output.mark() if self.output else 0

    def output_since(self, mark: int, limit: int = 60) -> list[str]:
        return self.output.since(mark, limit) if self.output else []

    def _last_output(self, limit: int) -> list[str]:
        return self.output.since(0, limit) if self.output else []

    def wait_for_death(self, grace: float) -> str | None:
        """Up to ``grace`` seconds for a dying process to end; how it ended,
        with its output read to the end, or None if it still runs."""
        if self.proc is None:
            return "not running"
        if self.dumping_core():
            grace = max(grace, CORE_DUMP_WAIT)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            return None
        if self.output:
            self.output.finish(2.0)
        return describe_exit(self.proc.returncode)

    def core_path(self) -> str | None:
        """The core dump of the process that just died, if it left one."""
        if not self.core_dumps or self.proc is None:
            return None
        return cores.find_core(self.proc.pid, self.cwd or os.getcwd(), self.exe)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None
