"""The front-end's guest memory: memfd regions, addressing, the allocator."""
from __future__ import annotations

import mmap
import os

import pytest

from vhostuser.frontend import GuestMemory, GuestMemoryError
from vhostuser.protocol import MemRegion

MiB = 1 << 20


@pytest.fixture
def mem():
    # Two gpa-adjacent regions (the second 4 KiB into its memfd) and a far one.
    with GuestMemory([(0, MiB), (MiB, MiB, 4096), (0x4000_0000, MiB)]) as m:
        yield m


def test_table_describes_each_region_with_our_own_mapping(mem):
    table = mem.table()
    assert [(r.gpa, r.size, r.mmap_offset) for r in table] == [
        (0, MiB, 0), (MiB, MiB, 4096), (0x4000_0000, MiB, 0)]
    assert all(isinstance(r, MemRegion) for r in table)
    assert len(set(r.uva for r in table)) == 3
    assert mem.uva(MiB + 10) == table[1].uva + 10


def test_writes_land_in_the_memfd_at_the_mmap_offset(mem):
    mem.write(MiB + 100, b"hello")
    region = mem.regions[1]
    assert os.pread(region.fd, 5, 4096 + 100) == b"hello"
    # What a back-end would see mapping the fd itself.
    theirs = mmap.mmap(region.fd, 4096 + MiB)
    try:
        assert theirs[4096 + 100:4096 + 105] == b"hello"
    finally:
        theirs.close()


def test_reads_and_writes_cross_adjacent_regions(mem):
    mem.write(MiB - 3, b"abcdef")
    assert mem.read(MiB - 3, 6) == b"abcdef"
    assert os.pread(mem.regions[0].fd, 3, MiB - 3) == b"abc"
    assert os.pread(mem.regions[1].fd, 3, 4096) == b"def"


def test_unbacked_addresses_raise(mem):
    with pytest.raises(GuestMemoryError):
        mem.read(2 * MiB - 1, 2)             # runs off the end of region 1
    with pytest.raises(GuestMemoryError):
        mem.uva(0x3000_0000)
    with pytest.raises(GuestMemoryError):
        mem.locate(MiB - 1, 2)              # locate needs one region


def test_alloc_aligns_and_never_crosses_a_region(mem):
    a = mem.alloc(3, 1)
    b = mem.alloc(10, 64)
    assert (a, b) == (0, 64)
    c = mem.alloc(MiB - 50, 16)             # does not fit after b: next region
    assert mem.region_of(c, MiB - 50) is mem.regions[1]
    assert mem.alloc(16, region=2) == 0x4000_0000
    with pytest.raises(GuestMemoryError):
        mem.alloc(2 * MiB)


def test_alloc_at_reserves_a_straddling_range(mem):
    gpa = mem.alloc_at(MiB - 8, 16)
    assert gpa == MiB - 8
    with pytest.raises(GuestMemoryError):
        mem.alloc_at(MiB - 4, 4)            # already handed out
    assert mem.alloc(8, 8) == MiB + 8       # region 1 continues after it
    with pytest.raises(GuestMemoryError):
        mem.alloc(8, region=0)              # region 0 is used up to its end


def test_scratch_rewinds_allocations(mem):
    before = mem.alloc(8)
    with mem.scratch():
        inside = mem.alloc(4096)
    assert mem.alloc(4096) == inside != before


def test_regions_must_be_pages_and_disjoint():
    with pytest.raises(ValueError):
        GuestMemory([(0, 1000)])
    with pytest.raises(ValueError):
        GuestMemory([(0, MiB), (MiB // 2, MiB)])


def test_ring_index_stores_are_single_stores_that_touch_only_their_bytes():
    """Ring indices go to shared memory with one store (struct.pack_into
    zeroes its bytes first, and a device polling the ring read that 0 as an
    avail index jump). Neighbouring bytes stay as they were."""
    from vhostuser.frontend.memory import store16, store32
    mm = mmap.mmap(-1, 64)
    mm[:] = b"\xaa" * 64
    store16(mm, 8, 0x1234)
    store32(mm, 16, 0x89ABCDEF)
    store16(mm, 2, 0x1_0005)                 # masked to 16 bits, like a free-running index
    assert mm[8:10] == b"\x34\x12" and mm[16:20] == b"\xef\xcd\xab\x89" and mm[2:4] == b"\x05\x00"
    untouched = bytes(mm[0:2] + mm[4:8] + mm[10:16] + mm[20:])
    assert untouched == b"\xaa" * len(untouched)
    mm.close()                               # no view of it left behind
