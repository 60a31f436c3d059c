"""What makes two failing cases the same bug: a crash signature.

A CRASHED signature is how the process ended plus where, from the best
evidence there is: a sanitizer report's kind and top frames, a UBSan
location, a debugger backtrace (``--core-dumps``), a Python fatal error, a
panic or assertion line, else the back-end's last output line. A WEDGED or
TIMEOUT signature is what stopped working. Numbers, addresses and the
socket path are masked, so one bug reached by different inputs (or in a
different run) gives one signature.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from .case import Outcome, Verdict

SANITIZER = re.compile(r"ERROR: (\w+Sanitizer): ([\w-]+)")
SANITIZER_FRAME = re.compile(r"#\d+ 0x[0-9a-f]+ in (\S+)")
UBSAN = re.compile(r"([\w./-]+:\d+)(?::\d+)?: runtime error: (.*)")
GDB_FRAME = re.compile(r"^#\d+\s+(?:0x[0-9a-f]+ in )?([\w.:<>~+-]+) \(")
PY_FATAL = re.compile(r"Fatal Python error: (.*)")
PY_FRAME = re.compile(r'File "([^"]+)", line \d+,? in (\S+)')
PANIC = re.compile(r"panic|assert|abort|fatal|segmentation fault|bus error|core dumped", re.I)
# Frames that say nothing about where a bug is.
NOISE_FRAME = re.compile(r"^(__interceptor_|__asan|__ubsan|__sanitizer|__libc_|__GI_|raise$|abort$"
                         r"|__assert_fail|__pthread_kill_implementation"
                         r"|__pthread_kill|pthread_kill|__restore_rt|_start$|start_thread$|clone3?$)")
FRAMES = 3
MAX = 200
# The site of a crash whose backtrace names no frame at all.
WILD_PC = "pc outside any code (stack or function pointer overwritten?)"


def normalise(text: str, socket_path: str | None = None) -> str:
    """Masks what varies between runs of one bug."""
    if socket_path:
        text = text.replace(socket_path, "{socket}")
    text = re.sub(r"0x[0-9a-fA-F]+|(\d+(\.\d+)?)",
                  lambda m: "N" if m.group(1) else "0x?", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text[:MAX]


def _frames(lines: Iterable[str], pattern: re.Pattern) -> list[str]:
    out = []
    for line in lines:
        m = pattern.search(line)
        if m and not NOISE_FRAME.match(m.group(1)):
            out.append(m.group(1))
            if len(out) == FRAMES:
                break
    return out


def crash_site(lines: Sequence[str], backtrace: Sequence[str] = (),
               socket_path: str | None = None) -> str:
    """Where the back-end died, from its output and an optional backtrace."""
    for i, line in enumerate(lines):
        m = SANITIZER.search(line)
        if m:
            frames = _frames(lines[i + 1:], SANITIZER_FRAME)
            return f"{m.group(1)} {m.group(2)} in {' < '.join(frames) or '?'}"
    for line in lines:
        m = UBSAN.search(line)
        if m:
            return f"UBSan {m.group(1).rsplit('/', 1)[-1]}: {normalise(m.group(2))}"
    frames = _frames(backtrace, GDB_FRAME)
    if frames:
        return "in " + " < ".join(frames)
    if backtrace:       # a backtrace without one known frame: a jump into the wild
        return WILD_PC
    for i, line in enumerate(lines):
        m = PY_FATAL.search(line)
        if m:
            where = [f"{f.rsplit('/', 1)[-1]}:{fn}" for f, fn in
                     (PY_FRAME.search(x).groups() for x in lines[i + 1:] if PY_FRAME.search(x))]
            return f"Python {m.group(1).strip()}" + (f" in {where[0]}" if where else "")
    for line in reversed(lines):
        if PANIC.search(line):
            return normalise(line, socket_path)
    for line in reversed(lines):
        if line.strip():
            return "last output: " + normalise(line, socket_path)
    return ""


def _how(exit_status: str | None) -> str:
    if exit_status is None:
        return "alive"
    m = re.match(r"signal \d+ \((\w+)\)", exit_status)
    return m.group(1) if m else exit_status


def signature(outcome: Outcome, lines: Sequence[str] = (), backtrace: Sequence[str] = (),
              socket_path: str | None = None) -> str:
    """The signature of a failing outcome ('' for a passing one)."""
    v = outcome.verdict
    if not v.failing:
        return ""
    if v is Verdict.CRASHED:
        if outcome.exit_status is None:
            return f"CRASHED alive: {normalise(outcome.detail, socket_path)}"
        site = crash_site(lines, backtrace, socket_path)
        return f"CRASHED {_how(outcome.exit_status)}" + (f": {site}" if site else "")
    return f"{v.value}: {normalise(outcome.detail, socket_path)}"
