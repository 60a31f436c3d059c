"""The block examples under their own threading rules (docs/python-api.md):
with several queues, their plain methods run in several worker threads at
once. Each round writes, on every queue at the same time, a different
sector of the same 4 KiB blocks (the same byte of cow_overlay's sector
map, the same dict entry of sparse_dict), then everything is read back:
an update lost between two threads shows as a sector with the wrong data.

Python switches threads rarely (every 5 ms, and only at some bytecodes),
so such a race would show once in many runs; the examples' shared state is
given containers that pause inside each access, letting the other threads
run as a slower store would, so that a missing lock shows every time."""
from __future__ import annotations

import time

from examples.cow_overlay import CowOverlay
from examples.sparse_dict import SparseDictDisk
from vhostuser.blk import BlkDevice
from vhostuser.frontend import BlkRequest
from vhostuser_devkit.patterns import pattern

QUEUES = 4
BLOCKS = 24          # 4 KiB blocks per round (3 descriptors per write: fit the ring)
ROUNDS = 12
SECTORS = 8          # per block


class SlowDict(dict):
    """A missing block takes a while to report (a store looking it up),
    and other threads run meanwhile."""
    pause = 0.002

    def get(self, key, default=None):
        value = super().get(key, default)
        if value is default:
            time.sleep(self.pause)
        return value


class SlowBytearray(bytearray):
    """Each byte read takes a while, and other threads run meanwhile."""
    pause = 0.001

    def __getitem__(self, index):
        value = super().__getitem__(index)
        time.sleep(self.pause)
        return value


def sector_data(sector: int) -> bytes:
    return pattern(sector, 512)


def hammer(blk) -> list[int]:
    """Writes every (round, block, queue) sector; returns those written."""
    written = []
    for rnd in range(ROUNDS):
        first = rnd * BLOCKS * SECTORS
        with blk.mem.scratch():
            # Everything on the rings first, then all queues told at once:
            # the workers start together on the same blocks.
            for q in range(QUEUES):
                for b in range(BLOCKS):
                    s = first + b * SECTORS + q
                    req = BlkRequest.write(s, sector_data(s))
                    blk.queues[q].add(blk.build_chain(req), req)
                    written.append(s)
            for q in range(QUEUES):
                blk.queues[q].notify()
            for q in range(QUEUES):
                done = []
                while len(done) < BLOCKS:
                    done += blk.reap(queue=q)
                assert all(r.ok for r in done)
    return written


def check(blk, written: list[int]) -> None:
    reads = blk.execute([BlkRequest.read(s, 512) for s in written])
    wrong = [s for s, r in zip(written, reads) if r.data != sector_data(s)]
    assert not wrong, f"{len(wrong)} of {len(written)} sectors lost their write: {wrong[:10]}"


def test_sparse_dict_keeps_every_write(blk_client):
    disk = SparseDictDisk(size=16 << 20)
    disk.blocks = SlowDict()
    with blk_client(BlkDevice(disk, num_queues=QUEUES), queues=QUEUES) as (srv, blk):
        written = hammer(blk)
        disk.blocks.pause = 0
        check(blk, written)


def test_cow_overlay_keeps_every_write(blk_client, tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(b"B" * (4 << 20))
    disk = CowOverlay(base=str(base), overlay=str(tmp_path / "overlay.img"))
    disk.written = SlowBytearray(disk.written)
    with blk_client(BlkDevice(disk, num_queues=QUEUES), queues=QUEUES) as (srv, blk):
        written = hammer(blk)
        disk.written.pause = 0
        blk.flush()
        check(blk, written)
    # The sector map written at flush (and close) holds every write too.
    reopened = CowOverlay(base=str(base), overlay=str(tmp_path / "overlay.img"))
    try:
        assert all(reopened._is_written(s) for s in written)
    finally:
        reopened.close()
