"""A sparse disk kept in a dict: only written blocks take memory.

    vhostuser-blk --socket-path /tmp/disk.sock \
        --backend examples.sparse_dict:SparseDictDisk --backend-opt size=1073741824

With several queues, writes run in several threads at once: blocks are
added and dropped under a lock (two writes to a new block would otherwise
each make one, and the first write would be lost). Reads take no lock: a
read overlapping a write of its sectors may get either, as on any disk.
"""
from __future__ import annotations

import threading

from vhostuser.blk import BlockBackend

BLOCK = 4096


class SparseDictDisk(BlockBackend):
    def __init__(self, size: int | str = 64 << 20):
        self._size = int(size)
        self.blocks: dict[int, bytearray] = {}
        self._lock = threading.Lock()

    def size(self) -> int:
        return self._size

    def _spans(self, offset: int, length: int):
        """(block index, offset inside the block, byte count) covering the range."""
        while length > 0:
            index, inner = divmod(offset, BLOCK)
            n = min(BLOCK - inner, length)
            yield index, inner, n
            offset += n
            length -= n

    def read(self, offset: int, bufs: list[memoryview]) -> None:
        for buf in bufs:
            pos = 0
            for index, inner, n in self._spans(offset, len(buf)):
                block = self.blocks.get(index)
                if block is None:
                    buf[pos:pos + n] = bytes(n)
                else:
                    buf[pos:pos + n] = block[inner:inner + n]
                pos += n
            offset += len(buf)

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        with self._lock:
            for buf in bufs:
                pos = 0
                for index, inner, n in self._spans(offset, len(buf)):
                    block = self.blocks.get(index)
                    if block is None:
                        block = self.blocks[index] = bytearray(BLOCK)
                    block[inner:inner + n] = buf[pos:pos + n]
                    pos += n
                offset += len(buf)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        with self._lock:
            for index, inner, n in self._spans(offset, length):
                if n == BLOCK:
                    self.blocks.pop(index, None)      # a whole block: forget it
                elif index in self.blocks:
                    self.blocks[index][inner:inner + n] = bytes(n)
