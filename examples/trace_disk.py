"""A raw image that records every request to a trace file, one line each:
``<seconds> <op> <offset> <length> <crc32 of the data>`` (crc for writes and
reads). Useful to see what a guest's file system actually does.

    vhostuser-blk --socket-path /tmp/disk.sock --backend examples.trace_disk:TracingDisk \
        --backend-opt image=disk.img --backend-opt trace=disk.trace
"""
from __future__ import annotations

import os
import threading
import time
import zlib

from vhostuser.blk import BlockBackend


class TracingDisk(BlockBackend):
    def __init__(self, image: str, trace: str):
        self.fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        self._size = os.lseek(self.fd, 0, os.SEEK_END)
        self.trace = open(trace, "a", buffering=1)
        self._lock = threading.Lock()    # several queues may trace at once
        self._t0 = time.monotonic()

    def _record(self, op: str, offset: int, length: int, crc: int = 0) -> None:
        with self._lock:
            self.trace.write(f"{time.monotonic() - self._t0:.6f} {op} {offset} {length} "
                             f"{crc:08x}\n")

    @staticmethod
    def _crc(bufs) -> int:
        crc = 0
        for b in bufs:
            crc = zlib.crc32(b, crc)
        return crc

    def size(self) -> int:
        return self._size

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        n = os.preadv(self.fd, bufs, offset)
        if n != sum(len(b) for b in bufs):
            raise OSError(f"short read at {offset}")
        self._record("read", offset, n, self._crc(bufs))

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        n = os.pwritev(self.fd, bufs, offset)
        if n != sum(len(b) for b in bufs):
            raise OSError(f"short write at {offset}")
        self._record("write", offset, n, self._crc(bufs))

    def flush(self) -> None:
        os.fdatasync(self.fd)
        self._record("flush", 0, 0)

    def discard(self, offset: int, length: int) -> None:
        self._record("discard", offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        super().write_zeroes(offset, length, unmap)
        self._record("write_zeroes", offset, length)

    def close(self) -> None:
        os.close(self.fd)
        self.trace.close()
