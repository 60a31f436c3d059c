"""A pure-Python storage back-end for the benchmarks.

    vhostuser-blk --socket-path S --backend bench.backends:PreadDisk \
        --backend-opt path=IMG

The cheapest honest Python back-end: os.preadv / os.pwritev straight into
the memoryviews over guest memory the device hands it (no copy in Python),
synchronously in the queue worker thread (which holds the GIL meanwhile).
"""
from __future__ import annotations

import os

from vhostuser.blk import BlockBackend


class PreadDisk(BlockBackend):
    def __init__(self, path: str, read_only: bool | str = False):
        self.read_only = str(read_only).lower() in ("1", "true", "yes", "on")
        self.fd = os.open(path, (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC)
        self._size = os.fstat(self.fd).st_size

    def size(self) -> int:
        return self._size

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        want = len(bufs[0]) if len(bufs) == 1 else sum(map(len, bufs))
        got = os.preadv(self.fd, bufs, offset)
        if got != want:
            raise OSError(f"short read: {got} of {want} bytes at {offset}")

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        want = len(bufs[0]) if len(bufs) == 1 else sum(map(len, bufs))
        got = os.pwritev(self.fd, bufs, offset)
        if got != want:
            raise OSError(f"short write: {got} of {want} bytes at {offset}")

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
