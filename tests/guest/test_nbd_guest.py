"""A real guest on an NBD-backed disk: vhostuser-blk --nbd in front of
qemu-nbd serving a raw image. The guest makes and fills an ext4, reads it
back after dropping its caches, and the image is then checked from the host
(e2fsck, the file's bytes)."""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from imagecheck import debugfs_cat, sha
from vhostuser_devkit import guest
from vhostuser_devkit.guest import MIB
from vhostuser_devkit.nbd import NbdServer, missing
from vhostuser_devkit.program import BackendProgram

REPO = Path(__file__).resolve().parents[2]

WORKLOAD = """
mkfs.ext4 -F -q /dev/vda || exit 20
mount -t ext4 -o discard /dev/vda /mnt || exit 21
dd if=/dev/urandom of=/mnt/blob bs=4096 count=512 2>/dev/null
dd if=/dev/urandom of=/mnt/gone bs=4096 count=256 2>/dev/null
sync; rm /mnt/gone; sync
SUM=$(sha256sum /mnt/blob | cut -d' ' -f1)
umount /mnt
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt || exit 22
echo "RESULT written=$SUM read=$(sha256sum /mnt/blob | cut -d' ' -f1)"
umount /mnt
"""


@pytest.fixture
def nbd_export(tmp_path, sock_dir):
    absent = missing()
    if absent:
        pytest.skip(f"NBD tools missing: apt-get install {' '.join(absent)}")
    image = tmp_path / "nbd.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    server = NbdServer.qemu_nbd(str(image), unix=str(sock_dir / "nbd.sock"),
                                log_path=str(tmp_path / "qemu-nbd.log")).start()
    yield image, server
    server.kill()


def test_guest_file_system_on_an_nbd_export(guest_kit, nbd_export, sock_dir, tmp_path):
    image, server = nbd_export
    sock = sock_dir / "vu.sock"
    with BackendProgram("vhostuser.cli.blk", "--nbd", server.uri, "--queues", "2", "-v",
                        socket=sock, log=tmp_path / "vhostuser-blk.log", cwd=REPO,
                        timeout=15) as prog:
        result = guest.run_guest(guest_kit, WORKLOAD, blk_sockets=[str(sock)], num_queues=2,
                                 smp=2, timeout=180, pvh=True)
        result.check()
        got = result.results()
        assert got["written"] == got["read"]
        assert prog.terminate(15) == 0, prog.output()
    server.kill()       # the image is the server's until then
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert sha(debugfs_cat(image, "blob")) == got["written"]


HUNG_WORKLOAD = """
echo "WRITER-START"
i=0
while true; do
    dd if=/dev/urandom of=/dev/vda bs=64k count=1 seek=$((i % 64)) oflag=direct conv=notrunc \\
        2>/dev/null && echo "ACK $i"
    i=$((i + 1))
done
"""


def test_daemon_survives_a_frozen_store_and_a_killed_guest(guest_kit, nbd_export, tmp_path,
                                                           sock_dir):
    """qemu-nbd frozen under the guest's writes (requests wait forever: remote
    timeout off), then QEMU killed: the daemon gives up on the requests after
    its drain timeout, keeps serving its other disk, and nothing crashes when
    the server wakes up and answers into memory that is gone."""
    from vhostuser.frontend import BlkClient, Frontend
    from vhostuser_devkit.daemon import DaemonProcess

    image, server = nbd_export
    workdir = tmp_path / "d"
    workdir.mkdir()
    # sandboxed, libnbd reaches the server's socket only in an allowed directory
    daemon = DaemonProcess(str(workdir), env={"VHOSTUSER_DRAIN_TIMEOUT": "1"},
                           allow_dirs=(str(sock_dir),))
    try:
        daemon.call("add", type="blk", name="nbd", socket=daemon.path("n.sock"),
                    nbd=server.uri, remote_timeout=0)
        daemon.call("add", type="blk", name="local", socket=daemon.path("l.sock"),
                    ramdisk="16M")
        with guest.GuestProcess(guest_kit, HUNG_WORKLOAD, smp=1, pvh=True,
                                blk=[guest.QemuBlk(daemon.path("n.sock")),
                                     guest.QemuBlk(daemon.path("l.sock"))]) as vm:
            vm.wait_for(r"^ACK 5$", timeout=120)
            server.pause()
            deadline = time.monotonic() + 20
            while daemon.call("stats", name="nbd")["totals"]["inflight"] < 1:
                assert time.monotonic() < deadline, "no request held by the frozen store"
                time.sleep(0.05)
            acks_at_freeze = len(re.findall(r"^ACK \d+$", vm.serial, re.M))
            vm.kill()
        time.sleep(2.0)     # past the drain timeout: the requests are orphans now
        inflight = daemon.call("stats", name="nbd")["totals"]["inflight"]

        def io_on_local():
            with Frontend.connect(daemon.path("l.sock")) as fe:
                blk = BlkClient.setup(fe)
                data = os.urandom(8192)
                blk.write(64, data)
                assert blk.read(64, 8192) == data

        io_on_local()
        server.resume()
        time.sleep(1.0)
        io_on_local()
        assert daemon.proc.poll() is None, daemon.output()
        print(f"\n[frozen-store] acks before the freeze {acks_at_freeze}; requests held when "
              f"QEMU died {inflight}; the other disk served before and after SIGCONT")
    finally:
        if server.paused:
            server.resume()
        rc = daemon.terminate()
    output = daemon.output()
    assert rc == 0, output
    assert "Traceback" not in output, output
    assert "still in flight after 1s" in output, output
