"""Guest-memory table (csrc/vu_memory.c): mapping, translation, bounds.

vhost-user.rst "Memory access": addresses map to the region containing
them; we additionally require the whole [addr, addr+len) to be mapped.
"""
import mmap
import os

import pytest

from vhostuser.errors import AddressError, MemoryMapError
from vhostuser.memory import MemoryTable
from vhostuser.native import ffi, lib
from vhostuser.protocol import MemRegion

PAGE = mmap.PAGESIZE


def memfd(size: int, fill: int = 0) -> int:
    fd = os.memfd_create("t")
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, bytes([fill]) * size, 0)
    return fd


@pytest.fixture
def mem():
    ptr = lib.vu_mem_new()
    yield MemoryTable(ptr)
    lib.vu_mem_unpin(ptr)


def iov_list(mem, gpa, length, max_iov=8):
    iov = ffi.new("struct iovec[]", max_iov)
    n = ffi.new("uint32_t *", 0)
    rc = lib.vu_gpa_to_iov(mem._mem, gpa, length, iov, n, max_iov)
    return rc, [(int(ffi.cast("uintptr_t", iov[i].iov_base)), iov[i].iov_len) for i in range(n[0])]


def test_translation_reads_what_the_fd_holds(mem):
    mem.add(MemRegion(0x1000_0000, 4 * PAGE, 0x7000_0000, 0), memfd(4 * PAGE, 0xAB))
    assert bytes(mem.view(0x1000_0000 + 10, 4)) == b"\xab" * 4
    assert mem.regions == [MemRegion(0x1000_0000, 4 * PAGE, 0x7000_0000, 0)]


def test_mmap_offset_inside_fd_is_honoured(mem):
    fd = memfd(4 * PAGE)
    os.pwrite(fd, b"second page", PAGE)
    # region starts one page (plus some bytes) into the fd: unaligned offsets work too
    mem.add(MemRegion(0, 2 * PAGE, 0x5000, PAGE), fd)
    assert bytes(mem.view(0, 11)) == b"second page"


def test_range_past_region_end_is_refused(mem):
    mem.add(MemRegion(0, PAGE, 0x5000, 0), memfd(PAGE))
    mem.view(PAGE - 1, 1)
    with pytest.raises(AddressError):
        mem.view(PAGE - 1, 2)
    with pytest.raises(AddressError):
        mem.view(PAGE, 1)
    # a length that wraps the 64-bit space
    assert lib.vu_gpa_to_hva(mem._mem, 16, 2**64 - 8) == ffi.NULL


def test_buffer_crossing_adjacent_regions_splits_into_iovecs(mem):
    mem.add(MemRegion(0, PAGE, 0x10_0000, 0), memfd(PAGE))
    mem.add(MemRegion(PAGE, PAGE, 0x90_0000, 0), memfd(PAGE))
    rc, iovs = iov_list(mem, PAGE - 100, 300)
    assert rc == 0
    assert [length for _, length in iovs] == [100, 200]


def test_hole_between_regions_fails_whole_translation(mem):
    mem.add(MemRegion(0, PAGE, 0x10_0000, 0), memfd(PAGE))
    mem.add(MemRegion(2 * PAGE, PAGE, 0x90_0000, 0), memfd(PAGE))
    rc, _ = iov_list(mem, PAGE - 10, 20)
    assert rc == -lib.VU_ERR_ADDR_UNMAPPED


def test_iovec_limit_is_reported(mem):
    for i in range(4):
        mem.add(MemRegion(i * PAGE, PAGE, 0x100_0000 + i * 2 * PAGE, 0), memfd(PAGE))
    rc, iovs = iov_list(mem, 0, 4 * PAGE, max_iov=3)
    assert rc == -lib.VU_ERR_TOO_MANY_SEGMENTS


def test_overlapping_regions_are_refused(mem):
    mem.add(MemRegion(0, 2 * PAGE, 0x10_0000, 0), memfd(2 * PAGE))
    with pytest.raises(MemoryMapError):
        mem.add(MemRegion(PAGE, 2 * PAGE, 0x90_0000, 0), memfd(2 * PAGE))
    with pytest.raises(MemoryMapError):   # same user address range
        mem.add(MemRegion(8 * PAGE, PAGE, 0x10_0000 + PAGE, 0), memfd(PAGE))
    assert len(mem) == 1


def test_user_address_translation(mem):
    mem.add(MemRegion(0x4000_0000, 2 * PAGE, 0x7F00_0000, 0), memfd(2 * PAGE, 0x11))
    assert lib.vu_uva_to_hva(mem._mem, 0x7F00_0000 + 8, 8) != ffi.NULL
    assert lib.vu_uva_to_hva(mem._mem, 0x7F00_0000 + 2 * PAGE - 4, 8) == ffi.NULL
    assert lib.vu_uva_to_hva(mem._mem, 0x4000_0000, 8) == ffi.NULL


def test_remove_region_and_reverse_lookup(mem):
    mem.add(MemRegion(0, PAGE, 0x10_0000, 0), memfd(PAGE))
    mem.add(MemRegion(PAGE, PAGE, 0x20_0000, 0), memfd(PAGE))
    hva = lib.vu_gpa_to_hva(mem._mem, PAGE + 5, 1)
    assert lib.vu_hva_to_gpa(mem._mem, hva) == PAGE + 5
    mem.remove(MemRegion(0, PAGE, 0x10_0000, 0))
    with pytest.raises(AddressError):
        mem.view(0, 1)
    with pytest.raises(MemoryMapError):
        mem.remove(MemRegion(0, PAGE, 0x10_0000, 0))
    assert bytes(mem.view(PAGE, 1)) == b"\0"


def test_region_table_holds_509_slots(mem):
    fd = memfd(PAGE)
    for i in range(lib.VU_MAX_REGIONS):
        assert lib.vu_mem_add_region(mem._mem, i * PAGE * 2, PAGE, 0x1_0000_0000 + i * PAGE * 2,
                                     0, fd, ffi.NULL) == 0
    assert lib.vu_mem_add_region(mem._mem, 10**12, PAGE, 10**13, 0, fd, ffi.NULL) == \
        -lib.VU_ERR_TOO_MANY_REGIONS
    os.close(fd)
    # binary search finds every one of them
    for i in (0, 1, 254, 508):
        assert lib.vu_gpa_to_hva(mem._mem, i * PAGE * 2 + 7, 1) != ffi.NULL
        assert lib.vu_gpa_to_hva(mem._mem, i * PAGE * 2 + PAGE, 1) == ffi.NULL


def test_bad_fd_and_zero_size_are_refused(mem):
    assert lib.vu_mem_add_region(mem._mem, 0, 0, 0, 0, 3, ffi.NULL) == -lib.VU_ERR_INVAL
    assert lib.vu_mem_add_region(mem._mem, 0, PAGE, 0, 0, -1, ffi.NULL) == -lib.VU_ERR_INVAL
    fd = os.open("/dev/null", os.O_RDONLY)
    assert lib.vu_mem_add_region(mem._mem, 0, PAGE, 0, 0, fd, ffi.NULL) == -lib.VU_ERR_MMAP
    os.close(fd)


def test_identical_region_added_twice_is_counted_not_refused(mem):
    # QEMU's multiqueue vhost-user-net sends every region once per queue pair
    # over the same connection (one vhost_dev each).
    region = MemRegion(0, PAGE, 0x10_0000, 0)
    mem.add(region, memfd(PAGE, 0x5A))
    mem.add(region, memfd(PAGE, 0x5A))
    assert len(mem) == 1
    mem.remove(region)
    assert bytes(mem.view(0, 1)) == b"\x5a"     # still mapped: one reference left
    mem.remove(region)
    with pytest.raises(AddressError):
        mem.view(0, 1)
