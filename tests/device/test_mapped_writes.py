"""Writes through the mapping of the page cache (vu_filemap_write) keep the
virtio-blk write-cache contract like pwritev does: in write-back mode a
completed write may stay dirty in the page cache until a FLUSH, which
completes only once it is written back (clean); in write-through mode a
write completes clean.

pwritev shows up in the kernel's ext4 trace (test_write_through.py); a
store through a mapping does not, so this looks at the page cache itself:
the kernel's dirty flag of each page written (/proc/kpageflags, found
through a mapping of the same file in this process). In write-back mode the
pages are dirty before the FLUSH: the check can fail.
"""
import contextlib
import ctypes
import os
import struct
import subprocess

import pytest

from vhostuser.blk import BlkDevice, FileBackend
from vhostuser.frontend import BlkClient, Frontend
from vhostuser.frontend.blk import BlkRequest
from vhostuser.testing.server import BackgroundServer

KIB4 = 4096
KPF_DIRTY = 1 << 4
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63
SIZE = 4 << 20
PAGES = 64                       # written: every 4th page of the first 1 MiB

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class DirtyPages:
    """Which pages of a file the kernel holds dirty."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)
        addr = libc.mmap(None, SIZE, 1, 1, self.fd, 0)    # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        self.addr = addr
        try:
            self.pagemap = open("/proc/self/pagemap", "rb", buffering=0)
            self.kpageflags = open("/proc/kpageflags", "rb", buffering=0)
        except OSError as exc:
            pytest.skip(f"page flags unavailable: {exc}")

    def dirty(self, offsets) -> list[int]:
        out = []
        for off in offsets:
            ctypes.string_at(self.addr + off, 1)            # mapped in this process
            self.pagemap.seek((self.addr + off) // KIB4 * 8)
            entry, = struct.unpack("Q", self.pagemap.read(8))
            pfn = entry & PFN_MASK
            if not entry & PRESENT or pfn == 0:
                pytest.skip("pagemap gives no page frame numbers (CAP_SYS_ADMIN needed)")
            self.kpageflags.seek(pfn * 8)
            flags, = struct.unpack("Q", self.kpageflags.read(8))
            if flags & KPF_DIRTY:
                out.append(off)
        return out

    def close(self):
        libc.munmap(self.addr, SIZE)
        os.close(self.fd)
        self.pagemap.close()
        self.kpageflags.close()


@pytest.fixture
def image(tmp_path):
    """A written, synced (clean) image on a disk file system, all in the page cache."""
    path = str(tmp_path / "disk.img")
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                            text=True).stdout.strip()
    if fstype not in ("ext2/ext3", "xfs", "btrfs"):
        pytest.skip(f"needs a disk file system with a page cache (here: {fstype})")
    with open(path, "wb") as f:
        for off in range(0, SIZE, KIB4):
            f.write(b"\x5a" * KIB4)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        f.read()                                    # in memory, so chunks are resident
    return path


OFFSETS = [i * 4 * KIB4 for i in range(PAGES)]


def write_all(blk: BlkClient, fill: bytes) -> None:
    done = blk.execute([BlkRequest.write(off // 512, fill * KIB4) for off in OFFSETS], depth=16)
    assert all(r.ok for r in done)


@contextlib.contextmanager
def serving(tmp_path, image, aio):
    """(device, BlkClient, DirtyPages) for the image, served by the C file
    back-end with `aio`."""
    device = BlkDevice(FileBackend(image), aio=aio)
    sock = str(tmp_path / "blk.sock")
    pages = DirtyPages(image)
    try:
        with BackgroundServer(device, sock), Frontend.connect(sock) as fe:
            yield device, BlkClient.setup(fe), pages
    finally:
        pages.close()
        device.close()


@pytest.mark.parametrize("aio", ["io_uring", "sync"])
def test_mapped_writes_stay_dirty_until_a_flush_cleans_them(tmp_path, image, aio):
    with serving(tmp_path, image, aio) as (device, blk, pages):
        assert pages.dirty(OFFSETS) == []              # synced before the device came
        write_all(blk, b"w")
        assert device.map_stats()["mapped_writes"] >= PAGES   # the path under test
        assert pages.dirty(OFFSETS) == OFFSETS         # write-back: cached, not yet stable
        blk.flush()
        assert pages.dirty(OFFSETS) == []
    with open(image, "rb") as f:
        data = f.read()
    for off in OFFSETS:
        assert data[off:off + KIB4] == b"w" * KIB4
        assert data[off + KIB4:off + 2 * KIB4] == b"\x5a" * KIB4   # neighbours untouched


@pytest.mark.parametrize("aio", ["io_uring", "sync"])
def test_mapped_writes_in_write_through_mode_complete_clean(tmp_path, image, aio):
    with serving(tmp_path, image, aio) as (device, blk, pages):
        blk.set_writeback(False)
        write_all(blk, b"t")
        assert device.map_stats()["mapped_writes"] >= PAGES
        assert pages.dirty(OFFSETS) == []
        assert device.stats()["stable_writes"] == PAGES


@pytest.fixture
def full_fs(tmp_path):
    """A small ext4 file system, loop-mounted, holding a sparse 8 MiB image
    and a filler file that took every block left."""
    fs_img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(fs_img, "wb") as f:
        f.truncate(32 << 20)
    if subprocess.run(["mkfs.ext4", "-q", "-F", str(fs_img)], capture_output=True).returncode:
        pytest.skip("mkfs.ext4 unavailable")
    if subprocess.run(["mount", "-o", "loop", str(fs_img), str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("can't loop-mount here (root and a loop device needed)")
    try:
        image = mnt / "disk.img"
        with open(image, "wb") as f:
            f.truncate(8 << 20)
        with open(mnt / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\xff" * (1 << 20))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                pass
        for chunk in (1 << 20, KIB4, 1024):            # the crumbs too
            try:
                with open(mnt / "filler", "ab") as f:
                    while True:
                        f.write(b"\xff" * chunk)
                        f.flush()
                        os.fsync(f.fileno())
            except OSError:
                pass
        with open(image, "rb") as f:
            assert f.read() == bytes(8 << 20)          # holes now in the page cache
        yield str(image), mnt / "filler"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_write_into_a_hole_of_a_full_file_system_gets_ioerr_and_the_device_goes_on(
        tmp_path, full_fs):
    """The holes are in the page cache (read as zeroes), so their chunks are
    mapped; storing into one needs a block the file system no longer has:
    the kernel answers the mapping's fault with SIGBUS, the guard turns it
    into a pwritev, which fails with ENOSPC: IOERR, and the device serves on.
    Once there is room again, the same write succeeds."""
    image, filler = full_fs
    device = BlkDevice(FileBackend(image))
    sock = str(tmp_path / "blk.sock")
    try:
        with BackgroundServer(device, sock), Frontend.connect(sock) as fe:
            blk = BlkClient.setup(fe)
            done = blk.execute([BlkRequest.write(off // 512, b"n" * KIB4)
                                for off in range(0, 1 << 20, 64 * KIB4)], depth=4)
            statuses = {r.status for r in done}
            assert statuses == {1}, statuses                       # VIRTIO_BLK_S_IOERR
            assert device.map_stats()["faults"] >= 1               # through the mapping first
            assert blk.read(0, KIB4) == bytes(KIB4)                # still serving
            os.truncate(filler, 0)                                 # room again
            blk.write(0, b"y" * KIB4)
            blk.flush()
            assert blk.read(0, KIB4) == b"y" * KIB4
        with open(image, "rb") as f:
            assert f.read(KIB4) == b"y" * KIB4
    finally:
        device.close()
