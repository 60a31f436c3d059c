"""Runs a Python back-end with its line-to-line transitions counted in the
coverage map vhostuser-fuzz shares (``VHOSTUSER_FUZZ_COVERAGE``), so
feedback mode sees the control plane (vhostuser.handler and friends) as
well as the C data plane's edges (fuzz/cov/covmap.c)::

    python3 -m vhostuser.fuzz.pytrace -m vhostuser.cli.blk --socket-path S ...

Only code of the ``vhostuser`` package is traced, and its own upper half of
the map is used. Costly (a Python call per traced line), which is the price
of coverage on the control plane; the data plane's C is not slowed.
"""
from __future__ import annotations

import mmap
import os
import runpy
import sys
import threading
import zlib

MAP_SIZE = 65536
HALF = MAP_SIZE // 2          # [0, HALF): C edges; [HALF, MAP_SIZE): Python


def install(path: str, prefix: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        counters = mmap.mmap(fd, MAP_SIZE)
    finally:
        os.close(fd)
    bases: dict[object, int] = {}
    skip = os.path.join(prefix, "fuzz")

    def trace_call(frame, event, arg):
        code = frame.f_code
        base = bases.get(code)
        if base is None:
            name = code.co_filename
            if not name.startswith(prefix) or name.startswith(skip):
                bases[code] = base = -1
            else:
                # Stable across runs (str hashes are not): where the code is.
                rel = os.path.relpath(name, prefix)
                bases[code] = base = zlib.crc32(f"{rel}:{code.co_qualname}".encode())
        if base < 0:
            return None
        last = 0

        def trace_line(frame, event, arg):
            nonlocal last
            if event == "line":
                line = frame.f_lineno
                i = HALF + (((base ^ (last * 40503 + line)) * 2654435761 >> 7) & (HALF - 1))
                value = counters[i]
                if value != 255:
                    counters[i] = value + 1
                last = line
            return trace_line
        return trace_line

    sys.settrace(trace_call)
    threading.settrace(trace_call)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: python3 -m vhostuser.fuzz.pytrace -m MODULE [ARGS...]")
    module = sys.argv[2]
    sys.argv = [module] + sys.argv[3:]
    path = os.environ.get("VHOSTUSER_FUZZ_COVERAGE")
    if path:
        import vhostuser
        install(path, os.path.dirname(os.path.abspath(vhostuser.__file__)) + os.sep)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
