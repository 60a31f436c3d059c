"""Python back-ends for the daemon's tests, named as a user names them:
``tests.manage.pybackends:CLASS`` (importable from the checkout)."""
from __future__ import annotations

import asyncio
import os
import time

from vhostuser.blk import BlockBackend
from vhostuser.net import NetBackend


class JournalDisk(BlockBackend):
    """A RAM disk whose writes and flushes are coroutines that take a while
    (so requests overlap on every queue), each logged to ``journal``:
    ``W OFFSET LENGTH`` and ``F``. Options come as strings, as
    ``--backend-opt`` gives them, or typed, from a JSON spec."""

    def __init__(self, size: str | int, journal: str, delay_ms: str | int = "5"):
        self._data = bytearray(int(size))
        self.delay = int(delay_ms) / 1000
        self.journal = open(journal, "a", buffering=1)

    def size(self) -> int:
        return len(self._data)

    def read(self, offset, bufs):
        for b in bufs:
            b[:] = self._data[offset:offset + len(b)]
            offset += len(b)

    async def write(self, offset, bufs):
        await asyncio.sleep(self.delay)
        start = offset
        for b in bufs:
            self._data[offset:offset + len(b)] = b
            offset += len(b)
        self.journal.write(f"W {start} {offset - start}\n")

    async def flush(self):
        await asyncio.sleep(self.delay)
        self.journal.write("F\n")

    def close(self):
        self.journal.write(f"CLOSED pid={os.getpid()}\n")
        self.journal.close()


class EchoNet(NetBackend):
    """Sends every frame back to the guest with its addresses swapped."""

    def __init__(self, queue_pair: str | int = "0"):
        super().__init__()
        self.queue_pair = int(queue_pair)

    def transmit(self, queue_pair, frames):
        for f in frames:
            data = f.tobytes()
            self.inject(data[6:12] + data[0:6] + data[12:], self.queue_pair)


class BrokenDisk(BlockBackend):
    def __init__(self, **options):
        raise ValueError(f"no disk here (options {sorted(options)})")


class NotABackend:
    pass


class StrSizeDisk(BlockBackend):
    """A mistake a user makes: size() hands back the --backend-opt string."""

    def __init__(self, size: str):
        self._size = size

    def size(self):
        return self._size


class FailingDisk(BlockBackend):
    """A store that is down: every write fails with EIO."""

    def __init__(self, size: str | int = 1 << 20):
        self._size = int(size)

    def size(self) -> int:
        return self._size

    def read(self, offset, bufs):
        for b in bufs:
            b[:] = bytes(len(b))

    def write(self, offset, bufs):
        raise OSError(5, "Input/output error")


class FailingNet(NetBackend):
    """A network that is unreachable: every transmit fails."""

    def transmit(self, queue_pair, frames):
        raise OSError(113, "No route to host")


class GatedDisk(BlockBackend):
    """A RAM disk whose plain read() of sector ``stuck_sector`` blocks until
    the file ``gate`` exists (storage that stopped answering, in a worker
    thread); at most ``limit_s`` seconds, so a failing test ends."""

    def __init__(self, size: str | int, gate: str, stuck_sector: str | int = "64",
                 limit_s: str | int = "60", closed_mark: str = ""):
        self._data = bytearray(int(size))
        self.gate = gate
        self.closed_mark = closed_mark
        self.stuck_offset = int(stuck_sector) * 512
        self.limit = float(limit_s)

    def size(self) -> int:
        return len(self._data)

    def read(self, offset, bufs):
        if offset == self.stuck_offset:
            deadline = time.monotonic() + self.limit
            while not os.path.exists(self.gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        for b in bufs:
            b[:] = self._data[offset:offset + len(b)]
            offset += len(b)

    def write(self, offset, bufs):
        for b in bufs:
            self._data[offset:offset + len(b)] = b
            offset += len(b)

    def close(self):
        if self.closed_mark:
            open(self.closed_mark, "w").close()
