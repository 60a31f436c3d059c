"""The fuzzer's side of the coverage map a target exports (feedback mode).

A file in /dev/shm of MAP_SIZE byte counters, named to the back-end by the
environment variable VHOSTUSER_FUZZ_COVERAGE; fuzz/cov/covmap.c (C edges,
clang -fsanitize-coverage=trace-pc-guard) and :mod:`.pytrace` (Python line
transitions) fill it. Zeroed before each case; after it, each counter that
moved is a feature "cov:INDEX:BUCKET", bucketed as AFL does (coarser: a
back-end's own threads add noise to exact counts).
"""
from __future__ import annotations

import itertools
import mmap
import os
import re

MAP_SIZE = 65536
ENV = "VHOSTUSER_FUZZ_COVERAGE"
_names = itertools.count()
_NONZERO = re.compile(rb"[^\x00]")


def bucket(count: int) -> int:
    return 1 if count == 1 else 2 if count < 8 else 3 if count < 64 else 4


class CoverageMap:
    def __init__(self, tag: str = ""):
        self.path = f"/dev/shm/vhostuser-fuzz-{os.getpid()}-{next(_names)}{tag}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, MAP_SIZE)
            self._map = mmap.mmap(fd, MAP_SIZE)
        finally:
            os.close(fd)
        self._zero = bytes(MAP_SIZE)
        self.ever_c = False          # did the target ever write a C edge counter
        self.ever_python = False     # ... a Python line counter (vhostuser.fuzz.pytrace)

    def env(self) -> dict[str, str]:
        return {ENV: self.path}

    def reset(self) -> None:
        self._map[:] = self._zero

    def features(self) -> list[str]:
        data = self._map[:]
        hits = [m.start() for m in _NONZERO.finditer(data)]
        if hits:
            self.ever_c |= hits[0] < MAP_SIZE // 2
            self.ever_python |= hits[-1] >= MAP_SIZE // 2
        return [f"cov:{i}:{bucket(data[i])}" for i in hits]

    def close(self) -> None:
        self._map.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
