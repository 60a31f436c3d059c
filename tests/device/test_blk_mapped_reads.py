"""Reads of an image through a mapping of its page cache (csrc/vu_filemap.c),
on tmpfs and on local disk file systems: the same bytes as preadv, no memory
allocated for holes, and a file that shrinks under the device gives IOERR,
not SIGBUS."""
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

from vhostuser.blk import BlkDevice, FileBackend
from vhostuser.frontend import BlkRequest, BlkStatus
from vhostuser.frontend.memory import GuestMemory

from vhostuser.testing.patterns import pattern

MIB = 1 << 20
CHUNK = 2 * MIB     # VU_FILEMAP_CHUNK_SHIFT

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm")


@pytest.fixture
def shm_image():
    """make(size, written=True) -> path of an image on tmpfs."""
    paths = []

    def make(size: int, written: bool = True) -> str:
        fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="vhu-test-map-")
        paths.append(path)
        os.ftruncate(fd, size)
        if written:
            for off in range(0, size, MIB):
                os.pwrite(fd, pattern(off, MIB), off)
        os.close(fd)
        return path
    yield make
    for p in paths:
        os.unlink(p)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_reads_of_a_written_image_come_through_the_mapping(blk_client, shm_image):
    path = shm_image(8 * MIB)
    dev = BlkDevice(FileBackend(path))
    assert dev.mapped_reads
    with blk_client(dev) as (srv, blk):
        offsets = [0, 4096, 3 * MIB - 512, CHUNK - 4096, 7 * MIB]   # one spans two chunks
        reads = blk.execute([BlkRequest.read(o // 512, 8192) for o in offsets], depth=8)
        for o, r in zip(offsets, reads):
            base = o - o % MIB
            want = (pattern(base, MIB) + pattern(base + MIB, MIB))[o - base:o - base + 8192]
            assert r.ok and r.data == want
        stats = dev.map_stats()
        assert stats["mapped_reads"] == len(offsets) and stats["fallback_reads"] == 0
        # Our writes go through pwritev; mapped reads see them at once.
        blk.write(4096 // 512, b"\x5a" * 4096)
        assert blk.read(4096 // 512, 4096) == b"\x5a" * 4096


def test_holes_read_as_zeroes_without_allocating_memory(blk_client, shm_image):
    path = shm_image(8 * MIB, written=False)
    before = allocated(path)
    dev = BlkDevice(FileBackend(path))
    with blk_client(dev, memory=GuestMemory([(0, 32 * MIB)])) as (srv, blk):
        reads = blk.execute([BlkRequest.read(i * 256, 128 * 1024) for i in range(64)], depth=16)
        assert all(r.ok and r.data == bytes(128 * 1024) for r in reads)
        assert allocated(path) == before     # a mapped read of a hole would allocate a page
        assert dev.map_stats()["mapped_reads"] == 0
        # Filling one chunk makes it eligible; the rest stays on preadv.
        blk.execute([BlkRequest.write(CHUNK // 512 + i * 256, pattern(i, 128 * 1024))
                     for i in range(16)], depth=16)
        got = blk.execute([BlkRequest.read(CHUNK // 512 + i * 256, 128 * 1024)
                           for i in range(16)], depth=16)
        assert [r.data for r in got] == [pattern(i, 128 * 1024) for i in range(16)]
        assert dev.map_stats()["mapped_reads"] == 16
        assert allocated(path) == before + CHUNK


def test_discarded_chunk_reads_zeroes_and_stays_unallocated(blk_client, shm_image):
    path = shm_image(4 * MIB)
    dev = BlkDevice(FileBackend(path))
    with blk_client(dev) as (srv, blk):
        assert blk.read(0, 4096) == pattern(0, 4096)       # chunk 0 now known resident
        full = allocated(path)
        blk.discard([(0, 2048)])                            # the first MiB
        assert blk.read(0, 4096) == bytes(4096)
        assert blk.read(MIB // 512, 4096) == pattern(MIB, 4096)
        assert allocated(path) == full - MIB


def test_a_file_shrinking_under_the_device_gives_ioerr_and_serving_goes_on(blk_client, shm_image):
    path = shm_image(8 * MIB)
    dev = BlkDevice(FileBackend(path))
    with blk_client(dev) as (srv, blk):
        # Every chunk known resident, so the next reads go to the mapping.
        blk.execute([BlkRequest.read(c * CHUNK // 512, 4096) for c in range(4)])
        os.truncate(path, 3 * MIB)                          # mid-chunk: pages past EOF fault
        cut = blk.execute([BlkRequest.read((3 * MIB + 4096) // 512, 4096),
                           BlkRequest.read(6 * MIB // 512, 65536)])
        assert [r.status for r in cut] == [BlkStatus.IOERR, BlkStatus.IOERR]
        assert blk.read(MIB // 512, 4096) == pattern(MIB, 4096)
        assert blk.read((3 * MIB - 4096) // 512, 4096) == pattern(2 * MIB, MIB)[-4096:]
        assert dev.map_stats()["fallback_reads"] >= 2


def test_direct_io_and_other_file_systems_are_not_mapped(tmp_path, shm_image):
    """O_DIRECT asks to bypass the page cache; on a file system that is not
    tmpfs, ramfs or a local disk one (ext4, XFS, btrfs) a fault may wait on a
    server, so nothing is mapped there either."""
    devices = []
    if _tmpfs_has_o_direct():
        devices.append(BlkDevice(FileBackend(shm_image(MIB), direct=True)))
    if _fs_type(str(tmp_path)) in DISK_FS:
        other = tmp_path / "disk.img"
        other.write_bytes(bytes(MIB))
        try:
            devices.append(BlkDevice(FileBackend(str(other), direct=True)))
        except OSError:
            pass
    if not devices:
        pytest.skip("no file system here takes O_DIRECT")
    try:
        assert [d.mapped_reads for d in devices] == [False] * len(devices)
    finally:
        for d in devices:
            d.close()


DISK_FS = ("ext2/ext3", "xfs", "btrfs")     # as stat -f names them (ext4 is "ext2/ext3")


def test_an_image_on_a_disk_file_system_is_read_through_the_mapping_once_in_memory(
        blk_client, tmp_path):
    """On ext4/XFS/btrfs only chunks whose pages are all in the page cache
    are read through the mapping; what the kernel said is forgotten every
    VU_FILEMAP_RECHECK reads (it may drop pages), so a chunk read in since
    is mapped then, and the bytes are the file's either way."""
    if _fs_type(str(tmp_path)) not in DISK_FS:
        pytest.skip("tmp_path is not on a local disk file system")
    path = tmp_path / "disk.img"
    size = 4 * MIB
    with open(path, "wb") as f:
        for off in range(0, size, MIB):
            f.write(pattern(off, MIB))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)   # out of memory now
    dev = BlkDevice(FileBackend(str(path)))
    assert dev.mapped_reads
    try:
        with blk_client(dev) as (srv, blk):
            data = b"".join(pattern(off, MIB) for off in range(0, size, MIB))
            assert blk.read(MIB // 512, 4096) == data[MIB:MIB + 4096]
            first = dev.map_stats()
            assert first["mapped_reads"] == 0 and first["fallback_reads"] >= 1
            # Read it all (now in the page cache), then past a recheck.
            whole = blk.execute([BlkRequest.read(off // 512, 65536)
                                 for off in range(0, size, 65536)], depth=16)
            assert b"".join(r.data for r in whole) == data
            for start in range(0, 9000, 500):     # what the guest memory holds at once
                offs = [(i * 4096) % size for i in range(start, start + 500)]
                done = blk.execute([BlkRequest.read(o // 512, 4096) for o in offs], depth=32)
                assert all(r.data == data[o:o + 4096] for o, r in zip(offs, done))
            assert dev.map_stats()["mapped_reads"] > 0
    finally:
        dev.close()


def test_a_sigbus_outside_a_guarded_copy_still_ends_the_process(shm_image):
    """The guard handles only its own copies; any other SIGBUS gets the
    action it had before (here the default: the process dies of it)."""
    path = shm_image(MIB)
    script = textwrap.dedent(f"""
        import mmap, os
        from vhostuser.blk import BlkDevice, FileBackend
        dev = BlkDevice(FileBackend({path!r}))
        assert dev.mapped_reads
        fd = os.open({path!r}, os.O_RDWR)
        m = mmap.mmap(fd, {MIB})
        os.ftruncate(fd, 0)
        print(m[{MIB} - 1])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    # Killed by SIGBUS (not a hang, not a loop), or, under AddressSanitizer,
    # by ASan's handler that was there first and reports the BUS itself.
    died_of_it = proc.returncode == -signal.SIGBUS or (
        proc.returncode == -signal.SIGABRT and b"AddressSanitizer: BUS" in proc.stderr)
    assert died_of_it, (proc.returncode, proc.stderr.decode())


def _fs_type(path: str) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True)
    return out.stdout.strip()


def _tmpfs_has_o_direct() -> bool:
    probe = tempfile.mktemp(dir="/dev/shm", prefix="vhu-test-direct-")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True
