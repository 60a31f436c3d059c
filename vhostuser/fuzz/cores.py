"""Backtraces of a crashed back-end from its core dump (``--core-dumps``).

Back-ends built without sanitizers (distribution packages of QEMU, DPDK)
print nothing useful when they die on a signal; gdb reading the core dump
gives the frames a crash signature needs. Works when the kernel writes
cores to a file (``/proc/sys/kernel/core_pattern`` not a ``|`` pipe); the
core is deleted once read, since they are large.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

GDB = shutil.which("gdb")
FRAMES = 16


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def usable() -> str:
    """'' when cores can be read here, else why not."""
    if GDB is None:
        return "gdb is not installed"
    if _read("/proc/sys/kernel/core_pattern").startswith("|"):
        return "core_pattern pipes cores to a handler, not to a file"
    return ""


def core_glob(pid: int, cwd: str, comm: str) -> str:
    """Where the kernel's core_pattern puts the core of ``pid``, as a glob."""
    pattern = _read("/proc/sys/kernel/core_pattern") or "core"
    subst = {"p": str(pid), "P": str(pid), "i": str(pid), "I": str(pid), "e": comm[:15],
             "%": "%"}
    path = re.sub(r"%(.)", lambda m: subst.get(m.group(1), "*"), pattern)
    if "%p" not in pattern and _read("/proc/sys/kernel/core_uses_pid") == "1":
        path += f".{pid}"
    return path if os.path.isabs(path) else os.path.join(cwd, path)


def find_core(pid: int, cwd: str, exe: str | None) -> str | None:
    comm = os.path.basename(exe) if exe else "*"
    found = sorted(glob.glob(core_glob(pid, cwd, comm)), key=os.path.getmtime)
    return found[-1] if found else None


TEXT = re.compile(r"^(0x[0-9a-f]+) - (0x[0-9a-f]+) is \.text(?: in (\S+))?$")
UNNAMED = re.compile(r"^(#\d+)\s+(0x[0-9a-f]+) in \?\? \(\)")


def _symbolise(frames: list[str], libraries: list[tuple[int, int, str]]) -> list[str]:
    """'#N 0xPC in ?? ()' (stripped code) becomes '#N 0xPC in FILE+0xOFF ()',
    the offset from the text of the executable or library holding PC: the
    same in every run, unlike PC."""
    out = []
    for line in frames:
        m = UNNAMED.match(line)
        if m:
            pc = int(m.group(2), 16)
            for lo, hi, path in libraries:
                if lo <= pc < hi:
                    line = f"{m.group(1)}  {m.group(2)} in {os.path.basename(path)}+{pc - lo:#x} ()"
                    break
        out.append(line)
    return out


def backtrace(exe: str | None, core: str | None, *, timeout: float = 120.0,
              keep: bool = False) -> list[str]:
    """gdb's backtrace of the crashing thread ('#N ...' lines); [] if none."""
    if not exe or not core or GDB is None:
        return []
    try:
        proc = subprocess.run([GDB, "-batch", "-nx", "-ex", "set pagination off",
                               "-ex", "info files", "-ex", f"bt {FRAMES}", exe, core],
                              capture_output=True, text=True, errors="replace", timeout=timeout)
        out = proc.stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    finally:
        if not keep:
            try:
                os.unlink(core)
            except OSError:
                pass
    libraries = [(int(m.group(1), 16), int(m.group(2), 16), m.group(3) or exe)
                 for m in map(TEXT.match, (x.strip() for x in out.splitlines())) if m]
    frames = [line.strip() for line in out.splitlines() if line.startswith("#")]
    # gdb prints frame 0 once more as it loads the core: keep one backtrace.
    if len(frames) > 1 and frames[0] == frames[1]:
        frames = frames[1:]
    return _symbolise(frames, libraries)
