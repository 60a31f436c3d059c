"""A RAM disk that dies on purpose when a chosen sector is read, so the
fuzzer's triage can be tested against a real back-end process (the crash
is ours to choose, the vhost-user server and data plane are the product).

    vhostuser-blk --backend tests.fuzz.crashy:CrashyDisk ...

Sector 777: prints a panic line and aborts (SIGABRT). Sector 778: SIGSEGV.
Sector 779: prints, lingers 1.5 s (as ASan writing a report does), aborts.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from vhostuser.blk import BlockBackend

SECTOR = 512


class CrashyDisk(BlockBackend):
    def __init__(self, size: int | str = 8 << 20):
        self._size = int(size)

    def size(self) -> int:
        return self._size

    def read(self, offset: int, bufs) -> None:
        sector = offset // SECTOR
        if sector in (777, 779):
            print(f"crashy: panic: read of sector {sector} at offset {offset:#x}",
                  file=sys.stderr, flush=True)
            if sector == 779:
                time.sleep(1.5)
            os.abort()
        if sector == 778:
            os.kill(os.getpid(), signal.SIGSEGV)
        for buf in bufs:
            buf[:] = bytes(len(buf))

    def write(self, offset: int, bufs) -> None:
        pass
