"""A sparse disk kept in a dict: only written blocks take memory.

    vhostuser-blk --socket-path /tmp/disk.sock \
        --backend examples.sparse_dict:SparseDictDisk --backend-opt size=1G
"""
from __future__ import annotations

from vhostuser.blk import BlockBackend

BLOCK = 4096


class SparseDictDisk(BlockBackend):
    def __init__(self, size: int | str = 64 << 20):
        self._size = int(size)
        self.blocks: dict[int, bytearray] = {}

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
        for index, inner, n in self._spans(offset, length):
            if n == BLOCK:
                self.blocks.pop(index, None)      # a whole block: forget it
            elif index in self.blocks:
                self.blocks[index][inner:inner + n] = bytes(n)
