"""examples/libvirt/vhostuser-domain.xml: what vhost-user needs is there,
and it fits the back-ends docs/libvirt.md tells to start (same sockets,
queue counts within the back-ends', the socket direction each side
expects). With virt-xml-validate (Debian package libvirt-clients, which
runs xmllint from libxml2-utils) the file is also checked against
libvirt's own schema."""
from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from docblocks import DOCS, EXAMPLES, commands, named_block
from vhostuser.cli import blk, net

DOMAINS = [EXAMPLES / "libvirt" / "vhostuser-domain.xml",
           EXAMPLES / "libvirt" / "vhostuser-domain-tcg.xml"]
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
GUIDE = DOCS / "libvirt.md"
SOCKET_UNIT = EXAMPLES / "systemd" / "vhostuser-blk@.socket"


@pytest.fixture(scope="module", params=DOMAINS, ids=lambda p: p.name)
def domain(request):
    return ET.parse(request.param).getroot()


def backend_args(name: str, program: str):
    """The parsed options of ``program`` in the named block of libvirt.md."""
    found = [argv for argv in commands(named_block(GUIDE, name).text) if argv[0] == program]
    assert len(found) == 1, f"{GUIDE.name} block {name}: one {program} command expected"
    argv = found[0][1:]
    return blk.parser().parse_args(argv) if program == "vhostuser-blk" else net.parse_args(argv)


def test_guest_memory_is_a_shared_memfd(domain):
    backing = domain.find("memoryBacking")
    assert backing is not None
    assert backing.find("source").get("type") == "memfd"
    assert backing.find("access").get("mode") == "shared"


def test_vhostuser_disk(domain):
    [disk] = domain.findall("devices/disk[@type='vhostuser']")
    assert disk.get("device") == "disk"
    driver = disk.find("driver")
    assert (driver.get("name"), driver.get("type")) == ("qemu", "raw")
    source = disk.find("source")
    assert source.get("type") == "unix"
    assert source.get("mode") is None                 # QEMU is always the client
    reconnect = source.find("reconnect")
    assert reconnect.get("enabled") == "yes" and int(reconnect.get("timeout")) > 0
    target = disk.find("target")
    assert target.get("bus") == "virtio"

    path = source.get("path")
    name = domain.findtext("name")
    # the systemd instance named after the domain listens there ...
    listen = [line.split("=", 1)[1] for line in SOCKET_UNIT.read_text().splitlines()
              if line.startswith("ListenStream=")]
    assert [p.replace("%i", name) for p in listen] == [path]
    assert f"vhostuser-blk@{name}.socket" in named_block(GUIDE, "backends").text
    # ... and so does the by-hand command, with enough queues
    args = backend_args("blk-by-hand", "vhostuser-blk")
    assert args.socket_path == path
    assert int(driver.get("queues", "1")) <= args.queues
    # ... for QEMU, which libvirt runs in group kvm
    assert args.socket_group == "kvm"
    assert "SocketGroup=kvm" in SOCKET_UNIT.read_text().splitlines()


def test_vhostuser_interface(domain):
    [iface] = domain.findall("devices/interface[@type='vhostuser']")
    assert iface.find("model").get("type") == "virtio"
    source = iface.find("source")
    assert source.get("type") == "unix"
    args = backend_args("backends", "vhostuser-net")
    # mode is QEMU's side of the socket: client <-> the back-end listens.
    if source.get("mode") == "client":
        assert args.socket_path == source.get("path")
        assert args.socket_group == "kvm"
    else:
        assert source.get("mode") == "server"
        assert args.connect == source.get("path")
        assert source.find("reconnect") is None       # libvirt: client mode only
    queues = int(iface.find("driver").get("queues", "1"))
    assert queues <= args.queues
    mac = iface.find("mac").get("address")
    assert len(mac.split(":")) == 6


def test_without_kvm_the_domain_is_tcg_and_the_nic_has_no_msix(domain):
    """The type='qemu' variant: -cpu max, vectors=0 on the first NIC
    (net0) and on NICs attached later."""
    if domain.get("type") == "kvm":
        assert domain.find("cpu").get("mode") == "host-passthrough"
        return
    assert domain.get("type") == "qemu"
    assert domain.find("cpu").get("mode") == "maximum"
    [device] = domain.findall(f"{QEMU_NS}override/{QEMU_NS}device")
    assert device.get("alias") == "net0"
    [prop] = device.findall(f"{QEMU_NS}frontend/{QEMU_NS}property")
    assert (prop.get("name"), prop.get("type"), prop.get("value")) == ("vectors", "unsigned",
                                                                      "0")
    args = [a.get("value") for a in domain.findall(f"{QEMU_NS}commandline/{QEMU_NS}arg")]
    assert args == ["-global", "virtio-net-pci.vectors=0"]
    assert domain.findall("devices/controller[@model='pcie-root-port']")


@pytest.mark.parametrize("path", DOMAINS, ids=lambda p: p.name)
def test_libvirt_schema_accepts_the_domain(path):
    tool = shutil.which("virt-xml-validate")
    if tool is None or shutil.which("xmllint") is None:
        pytest.skip("virt-xml-validate not installed (packages libvirt-clients, libxml2-utils)")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
