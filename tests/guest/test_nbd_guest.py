"""A real guest on an NBD-backed disk: vhostuser-blk --nbd in front of
qemu-nbd serving a raw image. The guest makes and fills an ext4, reads it
back after dropping its caches, and the image is then checked from the host
(e2fsck, the file's bytes)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from imagecheck import debugfs_cat, sha
from vhostuser.testing import guest
from vhostuser.testing.guest import MIB
from vhostuser.testing.nbd import NbdServer, missing
from vhostuser.testing.program import BackendProgram

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
    with BackendProgram("vhostuser.cli.blk", "--nbd", server.uri, "--num-queues", "2", "-v",
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
