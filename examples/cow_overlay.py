"""Copy-on-write overlay: reads come from a read-only base image until a
sector is written; writes go to an overlay file. The base is never modified.

    vhostuser-blk --socket-path /tmp/disk.sock --backend examples.cow_overlay:CowOverlay \
        --backend-opt base=base.img --backend-opt overlay=overlay.img

The overlay keeps which sectors it holds in `<overlay>.map` (one bit per
sector), written on flush, so it can be reopened.

With several queues, writes and flushes run in several threads at once: the
sector map changes under a lock (two writes setting bits of one byte would
otherwise lose one, and that sector would read from the base again), and
one flush at a time writes the map file.
"""
from __future__ import annotations

import os
import threading

from vhostuser.blk import BlockBackend

SECTOR = 512


class CowOverlay(BlockBackend):
    def __init__(self, base: str, overlay: str):
        self.base_fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.lseek(self.base_fd, 0, os.SEEK_END)
        self.overlay_fd = os.open(overlay, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.overlay_fd, self._size)
        self.map_path = overlay + ".map"
        nsectors = self._size // SECTOR
        try:
            with open(self.map_path, "rb") as f:
                self.written = bytearray(f.read().ljust((nsectors + 7) // 8, b"\0"))
        except FileNotFoundError:
            self.written = bytearray((nsectors + 7) // 8)
        self._map_lock = threading.Lock()      # self.written
        self._flush_lock = threading.Lock()    # the map file

    def size(self) -> int:
        return self._size

    def _is_written(self, sector: int) -> bool:
        return bool(self.written[sector >> 3] & (1 << (sector & 7)))

    def _runs(self, offset: int, length: int):
        """Maximal runs of sectors that live in the same file."""
        sector = offset // SECTOR
        end = sector + length // SECTOR
        while sector < end:
            in_overlay = self._is_written(sector)
            run_end = sector + 1
            while run_end < end and self._is_written(run_end) == in_overlay:
                run_end += 1
            yield sector, run_end - sector, in_overlay
            sector = run_end

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        for buf in bufs:
            pos = 0
            for sector, count, in_overlay in self._runs(offset, len(buf)):
                fd = self.overlay_fd if in_overlay else self.base_fd
                n = count * SECTOR
                got = os.preadv(fd, [buf[pos:pos + n]], sector * SECTOR)
                if got != n:
                    raise OSError(f"short read at sector {sector}")
                pos += n
            offset += len(buf)

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        written = os.pwritev(self.overlay_fd, bufs, offset)
        if written != sum(len(b) for b in bufs):
            raise OSError(f"short write at offset {offset}")
        # After the data: a read that sees the bit finds the data there. (A
        # read overlapping a write of its sectors may get either, as on any
        # disk, so reads take no lock.)
        with self._map_lock:
            for sector in range(offset // SECTOR, (offset + written) // SECTOR):
                self.written[sector >> 3] |= 1 << (sector & 7)

    def flush(self) -> None:
        with self._flush_lock:
            # The map as it is now names writes that completed, so their
            # data is on disk after the fdatasync that follows; a write that
            # completes meanwhile is in the next flush's map.
            with self._map_lock:
                snapshot = bytes(self.written)
            os.fdatasync(self.overlay_fd)
            tmp = self.map_path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(snapshot)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.map_path)

    def close(self) -> None:
        self.flush()
        os.close(self.overlay_fd)
        os.close(self.base_fd)
