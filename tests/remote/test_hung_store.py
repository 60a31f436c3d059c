"""A store that stops answering can't take the daemon down (issue 14, point 1).

qemu-nbd is frozen (SIGSTOP) under requests of one export whose remote
timeout is off (requests wait forever); `vhostuser-ctl remove` of that
export gives up waiting after the drain timeout, the requests become
orphans whose guest memory is detached, and the daemon's other export goes
on serving. When the server wakes up (SIGCONT) nothing crashes either.
"""
import os
import shutil
import subprocess
import threading
import time

import pytest

from vhostuser.frontend import BackendClosed, BlkClient, Frontend, FrontendTimeout
from vhostuser.frontend.blk import BlkError, BlkRequest
from vhostuser.manage.client import ControlClient
from vhostuser_devkit.daemon import DaemonProcess
from vhostuser_devkit.nbd import NbdServer, require_tools

MIB = 1 << 20


@pytest.fixture
def nbd_image(workdir):
    require_tools()
    path = os.path.join(workdir, "nbd.raw")
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
    return path


def io_works(path: str) -> None:
    with Frontend.connect(path) as fe:
        blk = BlkClient.setup(fe)
        data = os.urandom(4096)
        blk.write(8, data)
        assert blk.read(8, 4096) == data


def wait_in_flight(daemon: DaemonProcess, name: str, count: int) -> None:
    """Returns once export `name` counts `count` requests in flight."""
    deadline = time.monotonic() + 10
    while daemon.call("stats", name=name)["totals"]["inflight"] < count:
        assert time.monotonic() < deadline, daemon.output()
        time.sleep(0.05)


def write_held_by_the_freeze(daemon: DaemonProcess, freezable_fs, fe: Frontend) -> BlkClient:
    """Export "frozen"'s front-end: one write, then the file system
    freezes under a 64 KiB write, in flight when this returns."""
    blk = BlkClient.setup(fe)
    blk.write(0, b"w" * 4096)
    freezable_fs.freeze()
    blk.submit([BlkRequest.write(64, b"x" * 65536)])
    wait_in_flight(daemon, "frozen", 1)
    return blk


def exited_cleanly(daemon: DaemonProcess, rc: int) -> str:
    """Asserts the daemon exited 0 without a traceback; returns its output."""
    output = daemon.output()
    assert rc == 0, output
    assert "Traceback" not in output, output
    return output


def test_remove_of_an_export_whose_store_hangs(workdir, nbd_image):
    daemon = DaemonProcess(workdir, env={"VHOSTUSER_DRAIN_TIMEOUT": "0.5"})
    server = NbdServer.qemu_nbd(nbd_image, unix=os.path.join(workdir, "nbd.sock"),
                                log_path=os.path.join(workdir, "qemu-nbd.log")).start()
    try:
        daemon.call("add", type="blk", name="hung", socket=daemon.path("h.sock"),
                    nbd=server.uri, remote_timeout=0)
        daemon.call("add", type="blk", name="ok", socket=daemon.path("o.sock"), ramdisk="4M")
        fe = Frontend.connect(daemon.path("h.sock"))
        blk = BlkClient.setup(fe)
        blk.write(0, b"w" * 4096)           # the store answers ...
        server.pause()                      # ... until now
        blk.submit([BlkRequest.write(16, b"x" * 65536), BlkRequest.read(0, 4096)])
        wait_in_flight(daemon, "hung", 2)

        started = time.monotonic()
        daemon.ctl("remove", "hung")
        removal = time.monotonic() - started
        assert removal < 10, f"remove took {removal:.1f}s"
        assert [e["name"] for e in daemon.call("list")] == ["ok"]
        io_works(daemon.path("o.sock"))

        server.resume()                     # the late answers find nothing to crash
        time.sleep(1.0)
        io_works(daemon.path("o.sock"))
        assert daemon.proc.poll() is None, daemon.output()
        fe.close()
    finally:
        if server.paused:
            server.resume()
        server.kill()
        rc = daemon.terminate()
    output = exited_cleanly(daemon, rc)
    assert "still in flight after 0.5s" in output
    # The close-time flush waits for the hung store as long as requests
    # may, and says so (a cancelled NBD command once failed as a timeout
    # that formatted the remote timeout, None here, and hid why).
    assert "flush before close not done after 0.5s" in output, output


class FreezableFs:
    """ext4 on a loop device, mounted at ``mnt``: freeze() makes every write
    to it block in the kernel until thaw(), as storage that stopped
    answering does (reads of cached pages still work)."""

    def __init__(self, workdir: str):
        self.image = os.path.join(workdir, "fs.img")
        self.mnt = os.path.join(workdir, "mnt")
        self.loop = None
        self.mounted = self.frozen = False

    def setup(self) -> "FreezableFs":
        tools = ("losetup", "mkfs.ext4", "mount", "umount", "fsfreeze")
        if os.geteuid() != 0 or not all(shutil.which(t) for t in tools):
            pytest.skip("needs root, losetup, mkfs.ext4, mount and fsfreeze")
        with open(self.image, "wb") as f:
            f.truncate(64 * MIB)
        made = subprocess.run(["losetup", "-f", "--show", self.image], capture_output=True,
                              text=True)
        if made.returncode != 0:
            pytest.skip(f"no loop device: {made.stderr.strip()}")
        self.loop = made.stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", "-F", self.loop], check=True, capture_output=True)
        os.mkdir(self.mnt)
        mounted = subprocess.run(["mount", self.loop, self.mnt], capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"can't mount a loop device here: {mounted.stderr.strip()}")
        self.mounted = True
        return self

    def image_file(self, size: int) -> str:
        """A sparse disk image of `size` bytes on it."""
        image = os.path.join(self.mnt, "disk.img")
        with open(image, "wb") as f:
            f.truncate(size)
        return image

    def freeze(self) -> None:
        subprocess.run(["fsfreeze", "-f", self.mnt], check=True)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            subprocess.run(["fsfreeze", "-u", self.mnt], check=True)
            self.frozen = False

    def remove(self) -> None:
        self.thaw()
        if self.mounted:
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)


def daemon_beside(workdir: str, freezable_fs: FreezableFs) -> DaemonProcess:
    """A daemon that may open images on the file system, and gives up
    waiting for requests in flight after half a second."""
    return DaemonProcess(workdir, env={"VHOSTUSER_DRAIN_TIMEOUT": "0.5"},
                         allow_dirs=(freezable_fs.mnt,))


@pytest.fixture
def freezable_fs(workdir):
    fs = FreezableFs(workdir)
    try:
        yield fs.setup()
    finally:
        fs.remove()


@pytest.mark.parametrize("aio,direct", [("io_uring", False), ("sync", False), ("io_uring", True)])
def test_disconnect_from_a_disk_whose_file_system_froze(workdir, freezable_fs, aio, direct):
    """A disk image on a file system that freezes under a write (the C file
    back-end: buffered with io_uring or without, or O_DIRECT): the front-end
    goes away, and while the write waits for the thaw the daemon's other
    export and its control socket answer; after the thaw the disk serves a
    new front-end. (The worker used to do a buffered write with the device
    lock held, so the disconnect's teardown, which takes the lock on the
    event loop, stopped the whole daemon until the thaw. An O_DIRECT write
    waits in an io_uring worker thread instead, and the queue worker's exit
    waits for it.)"""
    image = freezable_fs.image_file(16 * MIB)
    daemon = daemon_beside(workdir, freezable_fs)
    try:
        daemon.call("add", type="blk", name="frozen", socket=daemon.path("f.sock"),
                    blk_file=image, aio=aio, direct=direct)
        daemon.call("add", type="blk", name="ok", socket=daemon.path("o.sock"), ramdisk="4M")
        settings = daemon.call("describe", name="frozen")["device"]
        assert settings["aio"] == aio, settings
        with Frontend.connect(daemon.path("f.sock")) as fe:
            write_held_by_the_freeze(daemon, freezable_fs, fe)
        # The session's teardown waits for the write (its guest memory is
        # unmapped only after), first for the drain timeout, then for as long
        # as it takes: the rest of the daemon must not.
        deadline = time.monotonic() + 10
        while "f.sock#1: a queue worker is still inside the back-end" not in daemon.output():
            assert time.monotonic() < deadline, daemon.output()
            time.sleep(0.05)
        io_works(daemon.path("o.sock"))
        assert {e["name"] for e in daemon.call("list")} == {"frozen", "ok"}
        assert freezable_fs.frozen

        freezable_fs.thaw()
        deadline = time.monotonic() + 20
        while True:
            try:
                io_works(daemon.path("f.sock"))
                break
            except (BackendClosed, FrontendTimeout):
                assert time.monotonic() < deadline, daemon.output()
                time.sleep(0.2)
    finally:
        freezable_fs.thaw()
        rc = daemon.terminate()
    exited_cleanly(daemon, rc)


@pytest.mark.parametrize("aio", ["io_uring", "sync"])
def test_a_reset_while_a_write_waits_for_a_frozen_file_system(workdir, freezable_fs, aio):
    """Two writes in one round; the first waits for the thaw in the kernel,
    the front-end resets the device meanwhile (its drain gives up). After
    the thaw the first stores the guest's data (its pages were detached with
    a copy of it, not zeroed); the second, an orphan before it started, is
    not started at all; the device serves the front-end again."""
    image = os.path.join(freezable_fs.mnt, "disk.img")
    with open(image, "wb") as f:
        f.write(b"p" * MIB)
    daemon = daemon_beside(workdir, freezable_fs)
    try:
        daemon.call("add", type="blk", name="frozen", socket=daemon.path("f.sock"),
                    blk_file=image, aio=aio)
        with Frontend.connect(daemon.path("f.sock")) as fe:
            blk = BlkClient.setup(fe)
            freezable_fs.freeze()
            blk.submit([BlkRequest.write(0, b"x" * 4096), BlkRequest.write(64, b"y" * 4096)])
            wait_in_flight(daemon, "frozen", 2)
            started = time.monotonic()
            fe.reset()
            assert time.monotonic() - started < 10
            freezable_fs.thaw()
        # The orphans end by the session's end at the latest (one waiting
        # for its group's sync in io_uring is dropped by the teardown, and
        # no longer counted in flight).
        deadline = time.monotonic() + 10
        while (stats := daemon.call("stats", name="frozen"))["connected"]:
            assert time.monotonic() < deadline, daemon.output()
            time.sleep(0.05)
        assert stats["totals"]["inflight"] == 0, stats
        with open(image, "rb") as f:
            data = f.read(MIB)
        assert data[:4096] == b"x" * 4096
        assert data[32768:32768 + 4096] == b"p" * 4096
        io_works(daemon.path("f.sock"))
    finally:
        freezable_fs.thaw()
        rc = daemon.terminate()
    exited_cleanly(daemon, rc)


@pytest.mark.parametrize("new_size", [8 * MIB, 32 * MIB], ids=["shrink", "grow"])
def test_resize_of_a_disk_whose_file_system_froze(workdir, freezable_fs, new_size):
    """`vhostuser-ctl resize` of a disk whose file system froze: the image's
    ftruncate waits for the thaw, and only that resize waits. Meanwhile the
    control socket, the daemon's other export and the disk's own front-end
    (reads of cached data) are served; a shrink is in force for new requests
    at once. After the thaw the image has the new size and the disk says so.
    (The ftruncate used to run on the event loop with the device lock held:
    the whole daemon stopped until the thaw.)"""
    image = os.path.join(freezable_fs.mnt, "disk.img")
    with open(image, "wb") as f:
        f.write(b"p" * (16 * MIB))
    daemon = DaemonProcess(workdir, allow_dirs=(freezable_fs.mnt,))
    try:
        daemon.call("add", type="blk", name="frozen", socket=daemon.path("f.sock"),
                    blk_file=image)
        daemon.call("add", type="blk", name="ok", socket=daemon.path("o.sock"), ramdisk="4M")
        with Frontend.connect(daemon.path("f.sock"), timeout=10) as fe:
            blk = BlkClient.setup(fe)
            assert blk.read(0, 4096) == b"p" * 4096
            freezable_fs.freeze()
            answers = []
            resize = threading.Thread(target=lambda: answers.append(
                daemon.ctl("resize", "frozen", str(new_size), check=False)))
            resize.start()
            time.sleep(1.0)                     # it is inside ftruncate, waiting
            assert resize.is_alive() and freezable_fs.frozen, answers
            with ControlClient(daemon.control, timeout=5) as c:
                described = c.call("describe", {"name": "frozen"})["device"]
                assert {e["name"] for e in c.call("list")} == {"frozen", "ok"}
            io_works(daemon.path("o.sock"))
            assert blk.read(0, 4096) == b"p" * 4096
            if new_size < 16 * MIB:
                assert described["capacity_sectors"] == new_size // 512, described
                with pytest.raises(BlkError):
                    blk.read(new_size // 512, 4096)
            else:
                assert described["capacity_sectors"] == 16 * MIB // 512, described
            freezable_fs.thaw()
            resize.join(30)
            assert not resize.is_alive()
            assert answers[0].returncode == 0, answers[0].stderr
            assert os.path.getsize(image) == new_size
            assert daemon.call("describe", name="frozen")["device"]["capacity_sectors"] \
                == new_size // 512
            assert blk.read(0, 4096) == b"p" * 4096
    finally:
        freezable_fs.thaw()
        rc = daemon.terminate()
    exited_cleanly(daemon, rc)


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_completion_after_the_ring_stopped_does_not_spin_the_worker(workdir, freezable_fs):
    """An O_DIRECT write waits in io_uring for a frozen file system; the
    front-end stops the ring (GET_VRING_BASE gives up waiting after the
    drain timeout); the thaw then completes the write. Until the ring
    restarts, its worker must not spin (it took a whole CPU)."""
    image = freezable_fs.image_file(16 * MIB)
    daemon = daemon_beside(workdir, freezable_fs)
    try:
        daemon.call("add", type="blk", name="frozen", socket=daemon.path("f.sock"),
                    blk_file=image, aio="io_uring", direct=True)
        with Frontend.connect(daemon.path("f.sock")) as fe:
            write_held_by_the_freeze(daemon, freezable_fs, fe)
            fe.stop_queue(0)
            freezable_fs.thaw()
            time.sleep(0.5)
            before = process_cpu_seconds(daemon.proc.pid)
            time.sleep(2.0)
            used = process_cpu_seconds(daemon.proc.pid) - before
            # (spinning, it used the whole 2 s)
            assert used < 0.5, f"{used:.2f} s of CPU in 2 s with the ring stopped"
    finally:
        freezable_fs.thaw()
        rc = daemon.terminate()
    exited_cleanly(daemon, rc)
