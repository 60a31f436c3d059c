"""dpdk-testpmd in interactive mode, one port, driven over its stdin: the
third-party peer of the net interop tests and of the net benchmark."""
from __future__ import annotations

import codecs
import itertools
import os
import re
import shutil
import subprocess
import threading
import time
from typing import Callable, Sequence
from vhostuser.errors import VhostUserError

TESTPMD = shutil.which("dpdk-testpmd")
STDBUF = shutil.which("stdbuf")

_prefixes = itertools.count()


class TestPmdError(VhostUserError, RuntimeError):
    """testpmd exited, gave no prompt, or printed something unusable."""


def runtime_dir(prefix: str) -> str:
    base = "/var/run/dpdk" if os.geteuid() == 0 else os.path.join(
        os.environ.get("XDG_RUNTIME_DIR", "/tmp"), "dpdk")
    return os.path.join(base, prefix)


class TestPmd:
    """Starts testpmd without hugepages (memfd-backed memory, which a
    virtio-user port can share) with ``vdev`` as its only port.

    ``wrap`` prefixes the command (nice, taskset). Call :meth:`wait_ready`
    before the first command.
    """

    __test__ = False
    PROMPT = "testpmd> "

    def __init__(self, vdev: str, lcores: str, log_path, *, app_args: Sequence[str] = (),
                 tag: str = "vhu", wrap: Callable[[list[str]], list[str]] = list):
        if TESTPMD is None:
            raise TestPmdError("dpdk-testpmd is not installed (Debian package dpdk-dev)")
        self.prefix = f"{tag}-{os.getpid()}-{next(_prefixes)}"
        self.command = wrap([
            TESTPMD, "--no-huge", "--no-pci", "--single-file-segments", "--no-shconf",
            "--no-telemetry", f"--file-prefix={self.prefix}", "-m", "256",
            "--vdev", vdev, "--lcores", lcores,
            "--", "-i", "--no-mlockall", "--total-num-mbufs=16384", "--nb-cores=1",
            "--port-topology=loop", *app_args])
        # testpmd's printf output is block-buffered into a pipe; its prompt
        # is not. Line-buffered, a command's output comes before the prompt.
        argv = [STDBUF, "-oL", "-eL", *self.command] if STDBUF else list(self.command)
        self.log_path = log_path
        self._log = open(log_path, "w", errors="replace")
        self._out = ""
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name="testpmd-output", daemon=True)
        self._reader.start()
        self._ready = False

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits for the first prompt and checks the port came up."""
        if self._ready:
            return
        self._wait_prompt(0, timeout)
        startup = self.output()
        if "Port 0: " not in startup or "Start ports failed" in startup or "Fail to" in startup:
            raise TestPmdError(f"testpmd could not start its port:\n{startup[-4000:]}")
        self._ready = True

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            text = decoder.decode(chunk, final=not chunk)
            with self._cond:
                self._out += text
                self._cond.notify_all()
            if not chunk:
                return
            self._log.write(text)
            self._log.flush()

    def output(self) -> str:
        with self._cond:
            return self._out

    def _wait_prompt(self, start: int, timeout: float) -> int:
        """Waits for a prompt at or after ``start``; returns where it ends."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                at = self._out.find(self.PROMPT, start)
                if at >= 0:
                    return at + len(self.PROMPT)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise TestPmdError(f"testpmd exited with {self.proc.returncode}:\n"
                                       f"{self._out[-4000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestPmdError(f"testpmd gave no prompt in {timeout:.0f}s:\n"
                                       f"{self._out[-4000:]}")
                self._cond.wait(min(left, 0.5))

    def cmd(self, line: str, timeout: float = 30.0) -> str:
        """Runs one command; returns what testpmd printed for it."""
        with self._cond:
            start = len(self._out)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        end = self._wait_prompt(start, timeout)
        return self.output()[start:end - len(self.PROMPT)]

    def stats(self) -> dict[str, int]:
        """Port 0's counters (RX-packets, RX-bytes, TX-packets, ...)."""
        text = self.cmd("show port stats 0")
        stats = {k: int(v) for k, v in re.findall(r"([RT]X-[a-z]+):\s+(\d+)", text)}
        for key in ("RX-packets", "RX-bytes", "TX-packets", "TX-bytes"):
            if key not in stats:
                raise TestPmdError(f"no {key} in:\n{text}")
        return stats

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> int | None:
        """Quits (kills if it must) and cleans up; returns the exit status."""
        if self.alive():
            try:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(runtime_dir(self.prefix), ignore_errors=True)
        return self.proc.returncode
