"""vhostuser-blk serving a real Linux guest (TCG), side by side with
qemu-storage-daemon on the same workload in the same run; every test once on
Debian's QEMU 7.2 and once on QEMU 10 (``[qemu-7.2]``, ``[qemu-10.0]``).

The workload (vhostuser_devkit.guest.blk_workload_basic): ext4 made,
written, synced, remounted and re-read; O_DIRECT write/read with checksums;
discard and write-zeroes read back as zeroes; write-through then write-back
cache (so FLUSH reaches the back-end); 2 queues with 2 vCPUs. Then the image
is checked from the host and by a second boot.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagecheck import debugfs_cat, read_image, sha
from vhostuser_devkit import guest
from vhostuser_devkit.guest import MIB

DIRECT_OFFSET_MB, DISCARD_OFFSET_MB, ZERO_OFFSET_MB, REGION_MB = 40, 48, 56, 4
FILE_SECTORS = 4096
# What may differ between the two back-ends without being a bug.
# (we start in write-back, qsd's export in write-through; discard limits differ)
ALLOWED_DIFFERENCES = {"cache_initial", "discard_max"}
REPO = Path(__file__).resolve().parents[2]








class VhostUserBlk:
    """vhostuser-blk as a user runs it: a separate process on a socket."""

    def __init__(self, sock: Path, *args: str):
        self.sock = sock
        self.log = sock.with_suffix(".log")
        self.command = [sys.executable, "-m", "vhostuser.cli.blk", "--socket-path", str(sock),
                        "-v", *args]
        self.process: subprocess.Popen | None = None

    def start(self) -> "VhostUserBlk":
        with open(self.log, "wb") as log:
            # From the checkout, so `--backend examples.x:Y` imports as for a user there.
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + 15
        while not self._listening():
            if self.process.poll() is not None:
                pytest.fail(f"vhostuser-blk exited with {self.process.returncode}:\n"
                            f"{self.log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail("vhostuser-blk did not listen within 15 s")
            time.sleep(0.05)
        return self

    def _listening(self) -> bool:
        return self.sock.exists()

    def stop(self) -> int:
        """SIGTERM: finish what is in flight, exit 0."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9


@pytest.fixture
def vhostuser_blk(sock_dir):
    started: list[VhostUserBlk] = []

    def start(*args: str, name: str | None = None) -> VhostUserBlk:
        server = VhostUserBlk(sock_dir / (name or f"vu{len(started)}.sock"), *args)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def fresh_image(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
    return path


def run_workload(kit, sock, tag, qemu):
    workload = guest.blk_workload_basic(
        tag, direct_offset_mb=DIRECT_OFFSET_MB, discard_offset_mb=DISCARD_OFFSET_MB,
        zero_offset_mb=ZERO_OFFSET_MB, region_mb=REGION_MB, file_sectors=FILE_SECTORS)
    result = guest.run_guest(kit, workload, blk_sockets=[str(sock)], num_queues=2, smp=2,
                             timeout=120, qemu=qemu)
    result.check()
    return result.results()


def check_workload(got: dict, tag: str) -> None:
    file_sha = sha(guest.sector_pattern(f"{tag}-file", FILE_SECTORS))
    direct = guest.sector_pattern(f"{tag}-direct", 2048)
    assert got["done"] == "1"
    assert int(got["size"]) == 64 * MIB
    assert got["queues"] == "2"
    assert got["fs_sha"] == file_sha
    assert got["hello"] == f"hello_from_{tag}"
    assert got["direct_sha"] == got["direct_expected"] == sha(direct)
    assert got["discard_zero"] == "1" and got["write_zeroes_zero"] == "1"
    assert got["cache_write_through"] == "write_through"
    assert got["cache_write_back"] == "write_back"


def check_image(image: Path, tag: str) -> None:
    file_sha = sha(guest.sector_pattern(f"{tag}-file", FILE_SECTORS))
    assert read_image(image, DIRECT_OFFSET_MB, 1) == guest.sector_pattern(f"{tag}-direct", 2048)
    assert read_image(image, DISCARD_OFFSET_MB, REGION_MB) == bytes(REGION_MB * MIB)
    assert read_image(image, ZERO_OFFSET_MB, REGION_MB) == bytes(REGION_MB * MIB)
    assert sha(debugfs_cat(image, "data.bin")) == file_sha
    assert debugfs_cat(image, "hello.txt") == f"hello from {tag}\n".encode()
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_same_workload_on_vhostuser_and_qemu_storage_daemon(guest_kit, vhostuser_blk, qsd,
                                                           tmp_path, capsys, qemu):
    tag = "cmp"
    ours_image, theirs_image = fresh_image(tmp_path, "ours.raw"), fresh_image(tmp_path, "qsd.raw")

    ours = vhostuser_blk("--blk-file", str(ours_image), "--queues", "2")
    ours_results = run_workload(guest_kit, ours.sock, tag, qemu)
    assert ours.stop() == 0
    daemon = qsd(theirs_image, num_queues=2)
    theirs_results = run_workload(guest_kit, daemon.sock, tag, qemu)
    daemon.stop()

    with capsys.disabled():
        print(f"\nguest results ({qemu.label})  vhostuser              qemu-storage-daemon")
        for key in sorted(set(ours_results) | set(theirs_results)):
            print(f"  {key:18} {ours_results.get(key, '-')[:24]:26} {theirs_results.get(key, '-')[:24]}")
    check_workload(ours_results, tag)
    check_workload(theirs_results, tag)
    differing = {k for k in ours_results if ours_results[k] != theirs_results.get(k)}
    assert differing <= ALLOWED_DIFFERENCES, {k: (ours_results[k], theirs_results.get(k))
                                             for k in differing}
    # The two images hold the same file system contents where it matters.
    check_image(ours_image, tag)
    check_image(theirs_image, tag)

    # A second boot on our back-end reads back what the first wrote.
    again = vhostuser_blk("--blk-file", str(ours_image), name="again.sock")
    verify = guest.run_guest(guest_kit, guest.blk_workload_verify(tag, direct_offset_mb=DIRECT_OFFSET_MB),
                             blk_sockets=[str(again.sock)], timeout=60, pvh=True, qemu=qemu)
    verify.check()
    v = verify.results()
    assert v["fsck_rc"] == "0"
    assert v["fs_sha"] == ours_results["fs_sha"]
    assert v["sha_write_back"] == ours_results["sha_write_back"]
    assert v["direct_sha"] == ours_results["direct_sha"]
    assert again.stop() == 0


READ_ONLY_WORKLOAD = """
echo "RESULT ro=$(blockdev --getro /dev/vda)"
dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; echo "RESULT write_rc=$?"
echo "RESULT read=$(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | sha256sum | cut -c1-16)"
"""


def test_read_only_disk_refuses_writes(guest_kit, vhostuser_blk, tmp_path, qemu):
    image = tmp_path / "ro.raw"
    image.write_bytes(b"\x5a" * MIB)
    server = vhostuser_blk("--blk-file", str(image), "--read-only")
    result = guest.run_guest(guest_kit, READ_ONLY_WORKLOAD, blk_sockets=[str(server.sock)],
                             timeout=60, pvh=True, qemu=qemu)
    got = result.results()
    assert got["ro"] == "1"
    assert got["write_rc"] != "0"
    assert got["read"] == sha(b"\x5a" * 4096)[:16]
    assert image.read_bytes() == b"\x5a" * MIB


PY_BACKEND_WORKLOAD = """
mkfs.ext4 -F -q /dev/vda || exit 20
mount -t ext4 /dev/vda /mnt || exit 21
dd if=/dev/urandom of=/mnt/blob bs=4096 count=256 2>/dev/null
SUM=$(sha256sum /mnt/blob | cut -d' ' -f1)
sync; umount /mnt
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt || exit 22
echo "RESULT written=$SUM read=$(sha256sum /mnt/blob | cut -d' ' -f1)"
umount /mnt
"""


def test_python_backend_example_serves_a_file_system(guest_kit, vhostuser_blk, tmp_path, qemu):
    """examples/sparse_dict.py (a disk in a Python dict) under a real ext4."""
    server = vhostuser_blk("--backend", "examples.sparse_dict:SparseDictDisk",
                           "--backend-opt", f"size={64 * MIB}")
    result = guest.run_guest(guest_kit, PY_BACKEND_WORKLOAD, blk_sockets=[str(server.sock)],
                             timeout=120, pvh=True, qemu=qemu)
    result.check()
    got = result.results()
    assert got["written"] == got["read"]
    assert server.stop() == 0


RESIZE_WORKLOAD = """
old=$(cat /sys/block/vda/size)
echo "READY size=$old"
i=0
while [ "$(cat /sys/block/vda/size)" = "$old" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "RESULT before=$old after=$(cat /sys/block/vda/size)"
dd if=/dev/zero of=/dev/vda bs=512 seek=$(( $(cat /sys/block/vda/size) - 1 )) count=1 oflag=direct 2>/dev/null
echo "RESULT last_sector_write=$?"
"""


def test_resize_of_a_running_disk_reaches_the_guest(guest_kit, vhostuser_blk, tmp_path, qemu):
    """SIGHUP after growing the image: CONFIG_CHANGE_MSG over the back-end
    channel, QEMU re-reads the config, the guest sees the new capacity."""
    image = fresh_image(tmp_path, "grow.raw")
    server = vhostuser_blk("--blk-file", str(image))
    with guest.GuestProcess(guest_kit, RESIZE_WORKLOAD, blk=[guest.QemuBlk(str(server.sock))],
                            pvh=True, qemu=qemu) as vm:
        vm.wait_for(r"^READY size=", timeout=60)
        with open(image, "r+b") as f:
            f.truncate(96 * MIB)
        server.process.send_signal(signal.SIGHUP)
        result = vm.wait(timeout=60)
    got = result.results()
    assert got["before"] == str(64 * MIB // 512)
    assert got["after"] == str(96 * MIB // 512)
    assert got["last_sector_write"] == "0"
