"""The guest harness against a real vhost-user-blk back-end: qemu-storage-daemon.

This proves the harness (kit, QEMU command line, result parsing, reconnect)
against someone else's implementation; the full block workload runs against
qsd and vhostuser side by side in test_blk_guest.py.
"""

from __future__ import annotations

import time

import pytest

from imagecheck import sha
from vhostuser_devkit import guest
from vhostuser_devkit.guest import BOOT_MARKER







def test_boot_reports_exit_status(guest_kit):
    """A device-less boot runs the workload and reports its exit code and RESULT lines."""
    result = guest.run_guest(guest_kit, "echo RESULT answer=42 kernel=$(uname -r)\nexit 3\n", timeout=60)
    assert result.exit_code == 3
    assert result.results() == {"answer": "42", "kernel": guest_kit.kernel_version}
    assert result.qemu_returncode == 0
    assert result.boot_uptime is not None and result.boot_uptime < 30
    with pytest.raises(guest.GuestWorkloadFailed, match="exited with 3"):
        result.check()


def test_pvh_boot(guest_kit):
    """The decompressed kernel boots through PVH and loads the same modules."""
    assert guest_kit.vmlinux is not None
    result = guest.run_guest(guest_kit, "echo RESULT mods=$(lsmod | grep -c virtio)\n", pvh=True, timeout=60)
    result.check()
    assert int(result.results()["mods"]) >= 5


def test_timeout_kills_qemu(guest_kit):
    with guest.GuestProcess(guest_kit, "echo READY\nsleep 600\n", pvh=True) as vm:
        vm.wait_for(r"^READY$", timeout=60)
        with pytest.raises(guest.GuestTimeout) as info:
            vm.wait(timeout=0.1)
        assert not vm.running()
    assert "READY" in info.value.serial_tail


def test_missing_backend_is_boot_failure(guest_kit, sock_dir):
    """QEMU refuses to start without its vhost-user server: a clear GuestBootFailed."""
    with pytest.raises(guest.GuestBootFailed, match="Failed to connect") as info:
        guest.run_guest(guest_kit, "true\n", blk_sockets=[sock_dir / "nobody.sock"], timeout=30)
    assert "nobody.sock" in str(info.value)


def test_qsd_started_after_qemu_with_reconnect(guest_kit, qsd, raw_image, sock_dir):
    """With reconnect=1 QEMU waits for a late back-end instead of failing."""
    sock = sock_dir / "late.sock"
    workload = "echo RESULT first=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | sha256sum | cut -c1-16)\n"
    with guest.GuestProcess(guest_kit, workload, blk=[guest.QemuBlk(str(sock), reconnect=1)], pvh=True) as vm:
        time.sleep(3)  # longer than a PVH boot: the guest would be up by now
        assert vm.running() and BOOT_MARKER not in vm.serial
        qsd(raw_image, sock=sock)
        result = vm.wait(timeout=60)
    result.check()
    assert result.results()["first"] == sha(bytes(512))[:16]


def test_qemu_command_devices(tmp_path):
    """Device options on the QEMU command line (net is not booted here: no back-end yet)."""
    kit = guest.GuestKit(
        directory=tmp_path, kernel=tmp_path / "vmlinuz", vmlinux=None, initramfs=tmp_path / "base.cpio",
        kernel_version="6.1.0-0-amd64", package="linux-image-6.1.0-0-amd64", package_version="0",
        modules=(), builtin_modules=(),
    )
    with pytest.raises(ValueError, match="PVH"):
        guest.qemu_command(kit, tmp_path / "initrd", serial_path=tmp_path / "serial", pvh=True)
    cmd = guest.qemu_command(
        kit, tmp_path / "initrd", serial_path=tmp_path / "serial", qmp_path=tmp_path / "qmp",
        blk=[guest.QemuBlk("/s/blk", num_queues=2, reconnect=1, properties={"queue-size": 256})],
        net=[guest.QemuNet("/s/net", queues=2), guest.QemuNet("/s/net1", server=True)],
        qemu=guest.Qemu("/usr/bin/qemu-system-x86_64", version=(7, 2)),
    )
    line = " ".join(cmd)
    assert cmd[0] == "/usr/bin/qemu-system-x86_64" and "-L" not in cmd
    assert "socket,id=vublkc0,path=/s/blk,reconnect=1" in line
    assert "vhost-user-blk-pci,id=vublk0,chardev=vublkc0,num-queues=2,queue-size=256" in line
    assert "vhost-user,id=vunet0,chardev=vunetc0,queues=2" in line
    assert "virtio-net-pci,id=vunetdev0,netdev=vunet0,mac=52:54:00:12:34:56,mq=on,vectors=0,romfile=" in line
    assert "socket,id=vunetc1,path=/s/net1,server=on,wait=on" in line
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in line
    assert f"unix:{tmp_path / 'qmp'},server=on,wait=off" in line


def test_qemu_command_for_a_private_qemu_10(tmp_path):
    """A QEMU in a private prefix gets its firmware directories first (-L, in
    order), and virtio-net-pci keeps MSI-X there unless a test asks otherwise."""
    kit = guest.GuestKit(
        directory=tmp_path, kernel=tmp_path / "vmlinuz", vmlinux=None, initramfs=tmp_path / "base.cpio",
        kernel_version="6.1.0-0-amd64", package="linux-image-6.1.0-0-amd64", package_version="0",
        modules=(), builtin_modules=(),
    )
    qemu = guest.Qemu("/p/usr/bin/qemu-system-x86_64", data_dirs=("/p/share/qemu", "/p/share/seabios"),
                      env=(("QEMU_MODULE_DIR", "/p/lib/qemu"),), version=(10, 0))
    cmd = guest.qemu_command(kit, tmp_path / "initrd", serial_path=tmp_path / "serial", qemu=qemu,
                             net=[guest.QemuNet("/s/net"), guest.QemuNet("/s/net1", msix=False)])
    assert cmd[:5] == ["/p/usr/bin/qemu-system-x86_64", "-L", "/p/share/qemu", "-L", "/p/share/seabios"]
    devices = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-device"]
    assert "vectors" not in devices[0] and "romfile=" in devices[0]
    assert devices[1].endswith(",vectors=0,romfile=")
    assert qemu.label == "qemu-10.0" and qemu.net_msix
    assert qemu.environment()["QEMU_MODULE_DIR"] == "/p/lib/qemu"
    assert not guest.Qemu(version=(7, 2)).net_msix and guest.Qemu(version=(7, 2)).environment() is None
