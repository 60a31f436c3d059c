"""vhostuser under a real libvirt (issue 16): libvirtd and virtlogd started
by the test (no systemd), a ``type='qemu'`` domain (TCG, ``<cpu
mode='maximum'/>``) booting the small test guest's kernel directly, with
a vhostuser disk (2 queues) and a vhostuser interface served by
vhostuser-blk and vhostuser-net.

QEMU runs as libvirt-qemu, as libvirt runs it in production; the
back-ends run as root and make their sockets for it with
``--socket-group kvm`` (and ``--socket-mode``). Nothing in this test
changes a socket's owner or mode afterwards: if the programs got it
wrong, QEMU could not connect (the first test shows what that looks
like).

While the guest runs:

* it pings the host over the vhostuser interface (a TAP in a network
  namespace);
* a second vhostuser disk is attached (``virsh attach-device``), written
  and read by the guest, and detached (``virsh detach-device``); its data
  is checked in its image;
* the disk's back-end is killed (``kill -9``) and started again, several
  times, while four writers in the guest write to the disk (O_DIRECT); the
  disk has ``<reconnect enabled='yes' timeout='1'/>``, so QEMU connects
  again, and the restarted back-end resubmits what was in flight. Every
  write the guest saw acknowledged must be in the image afterwards.
"""
from __future__ import annotations

import grp
import os
import re
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vhostuser_devkit import guest
from vhostuser_devkit.guest import DEFAULT_CMDLINE, MIB

from libvirtd import Libvirtd, missing
from test_reconnect import (WRITERS, Backend, acked, check_image, inflight_report, wait_acks,
                            writer_script)

REPO = Path(__file__).resolve().parents[2]
QEMU_GROUP = "kvm"          # a supplementary group of libvirt-qemu on Debian
QEMU_USER = "libvirt-qemu"
DOMAIN = "vhu-libvirt"
HOST_IP, GUEST_IP = "10.77.16.1", "10.77.16.2"
TAP = "vhu16"
RECORDS = int(os.environ.get("VHOSTUSER_LIBVIRT_RECORDS", "40"))   # per writer
KILLS = int(os.environ.get("VHOSTUSER_LIBVIRT_KILLS", "3"))
HOTPLUG_MB = 8

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="libvirtd's system instance needs root")


@pytest.fixture
def state():
    """A directory QEMU (libvirt-qemu) may traverse: the sockets, the guest's
    kernel and initramfs and the serial log are in it. (The directory's
    mode is set here, as docs/libvirt.md tells: 0755. The sockets' modes
    are the back-ends' business, and nothing changes them.)"""
    if missing():
        pytest.fail(f"libvirt missing: {missing()} (./dev.sh setup installs it)")
    path = Path(tempfile.mkdtemp(prefix="vhu-lv-", dir="/tmp"))
    os.chmod(path, 0o755)
    top = path / "t"
    top.mkdir()
    os.chmod(top, 0o755)
    yield top
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def libvirtd():
    """One libvirtd for the module's tests (it takes a while to start)."""
    if missing():
        pytest.fail(f"libvirt missing: {missing()} (./dev.sh setup installs it)")
    path = Path(tempfile.mkdtemp(prefix="vhu-libvirtd-", dir="/tmp"))
    try:
        with Libvirtd(path) as lv:
            yield lv
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------
# The domain
# --------------------------------------------------------------------------

def vhostuser_disk(path: Path, target: str, queues: int, *, reconnect: bool = True) -> str:
    recon = "<reconnect enabled='yes' timeout='1'/>" if reconnect else ""
    return f"""
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw' queues='{queues}'/>
      <source type='unix' path='{path}'>{recon}</source>
      <target dev='{target}' bus='virtio'/>
    </disk>"""


def vhostuser_interface(path: Path, queues: int = 1) -> str:
    return f"""
    <interface type='vhostuser'>
      <mac address='52:54:00:16:00:02'/>
      <source type='unix' path='{path}' mode='client'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <model type='virtio'/>
      <driver queues='{queues}'/>
      <rom enabled='no'/>
    </interface>"""


def domain_xml(name: str, kernel: Path, initrd: Path, serial: Path, devices: str, *,
               net: bool) -> str:
    """A type='qemu' domain (TCG) with shared memfd memory, booting the
    kernel directly. Under TCG QEMU 7.2 crashes with a vhost-user NIC that
    has MSI-X, so the interface gets vectors=0 through <qemu:override>."""
    override = """
  <qemu:override>
    <qemu:device alias='net0'>
      <qemu:frontend>
        <qemu:property name='vectors' type='unsigned' value='0'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>""" if net else ""
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{DEFAULT_CMDLINE}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {devices}
    <controller type='usb' model='none'/>
    <controller type='pci' index='0' model='pcie-root'/>
    <!-- two for the disk and the interface, two free for hot-plugging -->
    <controller type='pci' model='pcie-root-port'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='pci' model='pcie-root-port'/>
    <serial type='file'>
      <source path='{serial}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>{override}
</domain>
"""


class Domain:
    """A defined domain and its serial console log."""

    def __init__(self, lv: Libvirtd, name: str, serial: Path):
        self.lv, self.name, self.serial_path = lv, name, serial
        self._state = (0.0, True)       # (when asked, running): virsh at most once a second

    @property
    def serial(self) -> str:
        try:
            return self.serial_path.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        asked, running = self._state
        if time.monotonic() - asked > 1.0:
            r = self.lv.virsh("domstate", self.name, check=False)
            running = r.returncode == 0 and r.stdout.strip() in ("running", "paused")
            self._state = (time.monotonic(), running)
        return running

    def wait_for(self, pattern: str, timeout: float = 90.0) -> re.Match:
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.serial)
            if m:
                return m
            if not self.running():
                raise AssertionError(f"the domain ended before {pattern!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen within {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.1)

    def wait_shutoff(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                raise AssertionError(f"the domain did not power off:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, lines: int = 40) -> str:
        return ("\n".join(self.serial.splitlines()[-lines:])
                + "\n--- qemu log ---\n" + "\n".join(self.lv.qemu_log(self.name)
                                                      .splitlines()[-20:]))

    # the guest's writers' helpers (test_reconnect) want a .serial and .running()
    qemu_log = property(lambda self: self.lv.qemu_log(self.name))


# --------------------------------------------------------------------------
# The back-ends, as an administrator runs them
# --------------------------------------------------------------------------

def socket_options() -> list[str]:
    return ["--socket-group", QEMU_GROUP, "--socket-mode", "0660"]


def assert_socket_for_qemu(path: Path) -> None:
    st = os.stat(path)
    assert (st.st_gid, st.st_mode & 0o777) == (grp.getgrnam(QEMU_GROUP).gr_gid, 0o660), \
        (path, st.st_gid, oct(st.st_mode))


def tap_up(ns: str) -> None:
    deadline = time.monotonic() + 15
    while subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", TAP],
                         capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise AssertionError(f"{TAP} did not appear")
        time.sleep(0.05)
    for cmd in (["ip", "addr", "replace", f"{HOST_IP}/24", "dev", TAP],
                ["ip", "link", "set", TAP, "up"]):
        subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)


# --------------------------------------------------------------------------
# The guest's work
# --------------------------------------------------------------------------

def workload(tag: str) -> str:
    """Ping the host; wait for vdb (hot-plugged), write and read it, wait
    for it to go; then the writers on vda (test_reconnect's)."""
    return f"""
ip link set eth0 up || exit 10
ip addr add {GUEST_IP}/24 dev eth0 || exit 11
n=0; i=0
while [ $i -lt 20 ] && [ $n -lt 5 ]; do
    if ping -c 1 -W 2 {HOST_IP} > /dev/null 2>&1; then n=$((n + 1)); fi
    i=$((i + 1))
done
echo "RESULT pings=$n of=$i"
[ $n -eq 5 ] || exit 12
echo "WAIT-VDB"
i=0; while [ ! -b /dev/vdb ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vdb ] || exit 13
echo "RESULT vdb_size=$(cat /sys/block/vdb/size)"
printf '%-4095s\\n' "{tag} hotplugged" > /tmp/rec
dd if=/tmp/rec of=/dev/vdb bs=4096 seek=7 count=1 oflag=direct conv=notrunc 2>/dev/null || exit 14
dd if=/dev/vdb bs=4096 skip=7 count=1 iflag=direct 2>/dev/null | cmp - /tmp/rec || exit 15
echo "VDB-WRITTEN"
i=0; while [ -b /dev/vdb ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vdb ] && exit 16
echo "VDB-GONE"
""" + writer_script(tag, RECORDS)


# --------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------

def boot_files(kit: guest.GuestKit, state: Path, work: str) -> tuple[Path, Path]:
    """Copies of the kernel and initramfs in the state directory: libvirt
    gives the files it boots to libvirt-qemu while the domain runs, and the
    kit's cache is not its to change."""
    kernel = state / "vmlinux"
    shutil.copy(kit.vmlinux or kit.kernel, kernel)
    initrd = kit.initramfs_with(work, state / "initramfs.cpio")
    return kernel, initrd


@pytest.mark.parametrize("example", ["vhostuser-domain.xml", "vhostuser-domain-tcg.xml"])
def test_example_domains_are_accepted_by_libvirt(libvirtd, example):
    """docs/libvirt.md's examples: libvirtd defines them, the TCG one with
    its <qemu:override> and -global kept."""
    libvirtd.virsh("define", str(REPO / "examples" / "libvirt" / example))
    try:
        xml = ET.fromstring(libvirtd.virsh("dumpxml", "vm1", "--inactive").stdout)
        assert [d.get("type") for d in xml.findall("devices/disk")] == ["vhostuser"]
        assert [i.get("type") for i in xml.findall("devices/interface")] == ["vhostuser"]
        qemu = "{http://libvirt.org/schemas/domain/qemu/1.0}"
        if example.endswith("-tcg.xml"):
            assert xml.get("type") == "qemu" and xml.find("cpu").get("mode") == "maximum"
            assert xml.find(f"{qemu}override/{qemu}device").get("alias") == "net0"
            assert [a.get("value") for a in xml.findall(f"{qemu}commandline/{qemu}arg")] == \
                ["-global", "virtio-net-pci.vectors=0"]
            # a root port nothing sits on: room to attach a device
            ports = {int(c.get("index")) for c in
                     xml.findall("devices/controller[@model='pcie-root-port']")}
            used = {int(a.get("bus"), 16) for a in xml.iter("address")
                    if a.get("type") == "pci"}
            assert ports - used, (ports, used)
    finally:
        libvirtd.virsh("undefine", "vm1")


def test_private_socket_is_refused_to_libvirt_qemu(guest_kit, state, libvirtd, tmp_path):
    """Without the socket options the socket is 0600 root: QEMU, run by
    libvirt as libvirt-qemu, is refused (this is what --socket-group fixes;
    without <reconnect> virsh fails instead of hanging)."""
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(MIB))
    sock = state / "private.sock"
    # QEMU may reach the directory: only the socket itself can refuse it
    assert all(os.stat(d).st_mode & 0o005 == 0o005 for d in (state, state.parent))
    backend = Backend(sock, ["--blk-file", str(image)])
    backend.start()
    try:
        kernel, initrd = boot_files(guest_kit, state, "true\n")
        xml = state / "d.xml"
        xml.write_text(domain_xml("vhu-private", kernel, initrd, state / "p.log",
                                  vhostuser_disk(sock, "vda", 1, reconnect=False), net=False))
        r = libvirtd.virsh("create", str(xml), check=False)
        assert r.returncode != 0, "QEMU connected to a 0600 root socket"
        why = f"Failed to connect to '{sock}': Permission denied"
        assert why in r.stderr + libvirtd.qemu_log("vhu-private"), r.stderr
    finally:
        assert backend.terminate() == 0, backend.log_text()


def test_libvirt_domain_with_vhostuser_disk_and_interface(guest_kit, state, libvirtd, netns,
                                                           tmp_path, capsys):
    tag = "libvirt"
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    hot_image = tmp_path / "hot.raw"
    with open(hot_image, "wb") as f:
        f.truncate(HOTPLUG_MB * MIB)

    disk = Backend(state / "disk.sock", ["--blk-file", str(image), "--queues", "2",
                                         *socket_options()])
    hot = Backend(state / "hot.sock", ["--blk-file", str(hot_image), *socket_options()])
    nic = Backend(state / "net.sock", ["--tap", TAP, *socket_options()], kind="net",
                  prefix=["ip", "netns", "exec", netns])
    backends = [disk, hot, nic]
    kills = []
    try:
        for b in backends:
            b.start()
            assert_socket_for_qemu(b.sock)
        tap_up(netns)
        kernel, initrd = boot_files(guest_kit, state, workload(tag))
        serial = state / "serial.log"
        xml = state / "domain.xml"
        xml.write_text(domain_xml(DOMAIN, kernel, initrd, serial,
                                  vhostuser_disk(disk.sock, "vda", 2)
                                  + vhostuser_interface(nic.sock), net=True))
        libvirtd.virsh("define", str(xml))
        try:
            # with <reconnect>, a socket QEMU can't use makes this hang, not fail
            libvirtd.virsh("start", DOMAIN, timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError("virsh start hung:\n" + libvirtd.qemu_log(DOMAIN)[-3000:]
                                 + "".join(b.log_text()[-1000:] for b in backends)) from None
        dom = Domain(libvirtd, DOMAIN, serial)

        # the interface carried pings; now hot-plug a second disk
        dom.wait_for(r"^WAIT-VDB", timeout=180)
        hot_xml = state / "hot.xml"
        hot_xml.write_text(vhostuser_disk(hot.sock, "vdb", 1, reconnect=False))
        libvirtd.virsh("attach-device", DOMAIN, str(hot_xml), "--live")
        dom.wait_for(r"^VDB-WRITTEN", timeout=120)
        live = libvirtd.virsh("dumpxml", DOMAIN).stdout
        assert str(hot.sock) in live
        libvirtd.virsh("detach-device", DOMAIN, str(hot_xml), "--live")
        dom.wait_for(r"^VDB-GONE", timeout=120)
        deadline = time.monotonic() + 30
        while str(hot.sock) in libvirtd.virsh("dumpxml", DOMAIN).stdout:
            assert time.monotonic() < deadline, "the hot-plugged disk stayed in the domain"
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while "front-end disconnected" not in hot.log_text():   # QEMU let go of it
            assert time.monotonic() < deadline, hot.log_text()[-2000:]
            time.sleep(0.2)
        assert hot.log_text().count("front-end connected") == 1, hot.log_text()[-2000:]

        # kill -9 the disk's back-end under the writers, start it again
        dom.wait_for(r"^WRITERS-START", timeout=60)
        total = RECORDS * len(WRITERS)
        for k in range(KILLS):
            at = wait_acks(dom, total * (k + 1) // (KILLS + 2), timeout=180)
            disk.kill()
            t0 = time.monotonic()
            time.sleep(0.3)
            disk.start()
            assert_socket_for_qemu(disk.sock)        # as made, no chmod
            seen = wait_acks(dom, at + len(WRITERS) * 2, timeout=120)
            kills.append((at, round(time.monotonic() - t0, 2), seen - at))
        dom.wait_shutoff(timeout=400)
        serial_text = dom.serial
    finally:
        libvirtd.virsh("destroy", DOMAIN, check=False)      # if it still runs: a failure
        libvirtd.virsh("undefine", DOMAIN, check=False)
        for name, b in (("disk", disk), ("hot", hot), ("net", nic)):
            b.keep_log(f"libvirt-{name}")
        rcs = [b.terminate() for b in backends]

    results = guest.GuestResult(serial_text, _exit_code(serial_text), None, 0, None, [])
    acks = acked(serial_text)
    sets, resubmitted = inflight_report(disk)
    fails = [line for line in serial_text.splitlines() if line.startswith("WFAIL")]
    with capsys.disabled():
        print(f"\n[libvirt] kill -9 of the disk back-end x{len(kills)} (acks at kill, seconds "
              f"to the next ack, acks by then): {kills}\n[libvirt] acks: "
              f"{ {k: len(v) for k, v in acks.items()} }; SET_INFLIGHT_FD per back-end run: "
              f"{sets}; resubmitted per run: {resubmitted}; {results.results()}")
    assert rcs == [0, 0, 0], [b.log_text()[-2000:] for b in backends]
    assert results.exit_code == 0, results.tail(60)
    assert not fails, fails[:10]
    assert results.results().get("io_errors") == "0", results.tail(40)
    assert results.results().get("vdb_size") == str(HOTPLUG_MB * MIB // 512)
    assert sum(map(len, acks.values())) == RECORDS * len(WRITERS)
    checked = check_image(image, tag, acks)
    # what the guest wrote to the hot-plugged disk is in its image
    with open(hot_image, "rb") as f:
        f.seek(7 * 4096)
        assert f.read(4096) == (f"{tag} hotplugged".ljust(4095) + "\n").encode()
    with capsys.disabled():
        print(f"[libvirt] writes acknowledged {sum(map(len, acks.values()))}, verified in the "
              f"image {checked} (every append-only record, the newest record of each "
              f"overwritten slot); back-end restarts {len(kills)}")
    assert len(sets) == KILLS + 1 and all(n >= 1 for n in sets[1:]), sets
    for b in backends:
        assert "Traceback" not in b.log_text(), b.log_text()[-3000:]


def _exit_code(serial: str) -> int:
    m = re.search(rf"^{re.escape(guest.EXIT_MARKER)}(-?\d+)\s*$", serial, re.M)
    return int(m.group(1)) if m else -1
