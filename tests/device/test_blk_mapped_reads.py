"""Reads of an image through a mapping of its page cache (csrc/vu_filemap.c),
on tmpfs and on local disk file systems: the same bytes as preadv, no memory
allocated for holes, and a file that shrinks under the device gives IOERR,
not SIGBUS."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from vhostuser.blk import BlkDevice, FileBackend
from vhostuser.frontend import BlkRequest, BlkStatus
from vhostuser.frontend.memory import GuestMemory

from vhostuser_devkit.patterns import pattern

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
    VU_FILEMAP_RECHECK_NS (it may drop pages; looked at every 256 reads),
    so a chunk read in since is mapped then, and the bytes are the file's
    either way."""
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
            time.sleep(0.15)      # past VU_FILEMAP_RECHECK_NS (100 ms)
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


# ---- the guard and a program's own SIGBUS handling --------------------------
# The guard is process-wide, so each case runs in a process of its own: the
# program sets up SIGBUS its way (before the library, or after it), then
# faults outside a copy, sends itself SIGBUS, and has the device read a file
# that shrank under its mapping.

HELPER_C = r"""
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

static sigjmp_buf env;
static volatile int armed, calls, code, usr1_blocked, bus_blocked;
static volatile uintptr_t addr;

static void record(siginfo_t *si)
{
    sigset_t cur;
    pthread_sigmask(SIG_SETMASK, NULL, &cur);
    usr1_blocked = sigismember(&cur, SIGUSR1);
    bus_blocked = sigismember(&cur, SIGBUS);
    code = si ? si->si_code : -1000;
    addr = si ? (uintptr_t)si->si_addr : 0;
    calls++;
    if (armed) {
        armed = 0;
        siglongjmp(env, 1);
    }
}
static void on_info(int sig, siginfo_t *si, void *uc) { (void)sig; (void)uc; record(si); }
static void on_plain(int sig) { (void)sig; record(NULL); }

/* The program's own handler, with SIGUSR1 in its sa_mask. */
int install(int siginfo, int flags)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    if (siginfo)
        sa.sa_sigaction = on_info;
    else
        sa.sa_handler = on_plain;
    sa.sa_flags = flags | (siginfo ? SA_SIGINFO : 0);
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGUSR1);
    return sigaction(SIGBUS, &sa, NULL);
}

/* Reads *p; 1 when a SIGBUS handler jumped back instead. */
int touch(volatile const char *p)
{
    if (sigsetjmp(env, 1))
        return 1;
    armed = 1;
    (void)*p;
    armed = 0;
    return 0;
}

int calls_seen(void) { return calls; }
int last_code(void) { return code; }
uintptr_t last_addr(void) { return addr; }
int usr1_was_blocked(void) { return usr1_blocked; }
int bus_was_blocked(void) { return bus_blocked; }
"""

PROGRAM = r"""
import ctypes, json, mmap, os, signal, sys, tempfile, threading
from vhostuser.blk import BlkDevice, FileBackend
from vhostuser.frontend import BlkClient, BlkRequest, Frontend
from vhostuser.testing.server import BackgroundServer

helper_path, image, mode = sys.argv[1:4]
helper = ctypes.CDLL(helper_path)
helper.last_addr.restype = ctypes.c_size_t
SA_NODEFER, SA_RESETHAND = 0x40000000, 0x80000000
python_handled = []

def say(**kw):
    print(json.dumps(kw), flush=True)

def send_sigbus():
    signal.pthread_kill(threading.main_thread().ident, signal.SIGBUS)

def fault_outside_a_copy():
    fd = os.open(image + ".other", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 8192)
    m = mmap.mmap(fd, 8192)
    os.ftruncate(fd, 0)
    address = ctypes.addressof(ctypes.c_char.from_buffer(m)) + 4100
    return helper.touch(ctypes.c_void_p(address)), address

# The program's own SIGBUS handling, before the library's.
if mode == "siginfo":
    helper.install(1, 0)
elif mode == "nodefer":
    helper.install(1, SA_NODEFER)
elif mode == "plain":
    helper.install(0, 0)
elif mode == "resethand":
    helper.install(1, SA_RESETHAND)
elif mode == "ignore":
    signal.signal(signal.SIGBUS, signal.SIG_IGN)
elif mode == "default":
    signal.signal(signal.SIGBUS, signal.SIG_DFL)

dev = BlkDevice(FileBackend(image))
assert dev.mapped_reads
sock = tempfile.mktemp(prefix="vhu-sigbus-", suffix=".sock", dir="/tmp")
with BackgroundServer(dev, sock), Frontend.connect(sock) as fe:
    blk = BlkClient.setup(fe)
    if mode == "after":
        # A read through the mapping first: the worker has been told the
        # guard is in place, and must ask again (next handler run) after this.
        assert blk.read(16, 4096) is not None
        say(step="before", **dev.map_stats())
        # Installed after the library's: Python's handler returns, so a
        # fault in a copy would fault again forever if it got there.
        signal.signal(signal.SIGBUS, lambda *a: python_handled.append(1))

    def shrunk_read():
        # Chunk 0 seen resident, then the file shrinks under the mapping.
        assert blk.read(0, 4096) is not None
        os.truncate(image, 4096)
        (r,) = blk.execute([BlkRequest.read(8, 4096)])
        return r.status

    if mode in ("siginfo", "nodefer", "plain"):
        jumped, address = fault_outside_a_copy()
        say(step="fault", jumped=jumped, calls=helper.calls_seen(), code=helper.last_code(),
            addr_ok=helper.last_addr() == address, usr1=helper.usr1_was_blocked(),
            bus=helper.bus_was_blocked())
        send_sigbus()
        say(step="sent", calls=helper.calls_seen(), code=helper.last_code())
        say(step="read", status=int(shrunk_read()), calls=helper.calls_seen(), **dev.map_stats())
    elif mode == "resethand":
        send_sigbus()
        say(step="first", calls=helper.calls_seen())
        send_sigbus()
        say(step="second", calls=helper.calls_seen())
    elif mode == "ignore":
        send_sigbus()
        say(step="ignored")
        say(step="read", status=int(shrunk_read()), **dev.map_stats())
        fault_outside_a_copy()
        say(step="survived a fault")
    elif mode == "default":
        send_sigbus()
        say(step="survived a sent SIGBUS")
    elif mode == "after":
        send_sigbus()
        say(step="sent", python_handled=len(python_handled))
        say(step="read", status=int(shrunk_read()), **dev.map_stats())
dev.close()
say(step="end")
"""

IOERR = int(BlkStatus.IOERR)


@pytest.fixture(scope="module")
def sigbus_helper(tmp_path_factory):
    d = tmp_path_factory.mktemp("sigbus")
    src, lib_path = d / "helper.c", d / "helper.so"
    src.write_text(HELPER_C)
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(lib_path), str(src)], check=True)
    return str(lib_path)


def run_program(helper: str, image: str, mode: str):
    proc = subprocess.run([sys.executable, "-c", PROGRAM, helper, image, mode],
                          capture_output=True, text=True, timeout=60)
    steps = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            steps[record.pop("step")] = record
    return proc, steps


@pytest.mark.parametrize("mode,bus_blocked", [("siginfo", 1), ("nodefer", 0), ("plain", 1)])
def test_a_sigbus_that_is_not_ours_goes_to_the_programs_handler_as_it_was_installed(
        sigbus_helper, shm_image, mode, bus_blocked):
    proc, steps = run_program(sigbus_helper, shm_image(4 * MIB), mode)
    assert proc.returncode == 0 and "end" in steps, proc.stderr
    fault = steps["fault"]
    assert fault["jumped"] == 1 and fault["calls"] == 1
    # Its sa_mask while it runs, and SIGBUS itself unless SA_NODEFER.
    assert fault["usr1"] == 1 and fault["bus"] == bus_blocked
    if mode == "plain":
        assert fault["code"] == -1000                 # called as a plain handler
    else:
        assert fault["code"] == 2 and fault["addr_ok"]   # BUS_ADRERR at that address
    assert steps["sent"]["calls"] == 2
    if mode != "plain":
        assert steps["sent"]["code"] == -6            # SI_TKILL: what was sent, passed on
    # Our own copies still are ours: IOERR, and the program's handler never saw them.
    read = steps["read"]
    assert read["status"] == IOERR and read["calls"] == 2 and read["fallback_reads"] >= 1


def test_a_reset_on_delivery_handler_runs_once_then_the_default_applies(sigbus_helper,
                                                                        shm_image):
    proc, steps = run_program(sigbus_helper, shm_image(4 * MIB), "resethand")
    assert steps["first"]["calls"] == 1
    assert "second" not in steps and proc.returncode == -signal.SIGBUS, proc.stderr


def test_an_ignored_sigbus_stays_ignored_and_the_guard_stays(sigbus_helper, shm_image):
    proc, steps = run_program(sigbus_helper, shm_image(4 * MIB), "ignore")
    assert "ignored" in steps, proc.stderr
    assert steps["read"]["status"] == IOERR and steps["read"]["fallback_reads"] >= 1
    # A fault can't be ignored: the kernel's default action, as without us.
    assert "survived a fault" not in steps and proc.returncode == -signal.SIGBUS, proc.stderr


def test_a_sent_sigbus_with_the_default_action_ends_the_process(sigbus_helper, shm_image):
    proc, steps = run_program(sigbus_helper, shm_image(4 * MIB), "default")
    assert "survived a sent SIGBUS" not in steps and proc.returncode == -signal.SIGBUS, \
        proc.stderr


def test_a_handler_the_program_installs_after_ours_keeps_its_signals_and_reads_go_on(
        sigbus_helper, shm_image):
    proc, steps = run_program(sigbus_helper, shm_image(4 * MIB), "after")
    assert proc.returncode == 0 and "end" in steps, proc.stderr
    assert steps["before"]["mapped_reads"] >= 1
    assert steps["sent"]["python_handled"] == 1
    # Our guard no longer gets SIGBUS, so the mapping is not used: a file
    # that shrank gives IOERR (through preadv) instead of faulting forever.
    assert steps["read"]["status"] == IOERR and steps["read"]["fallback_reads"] >= 1
