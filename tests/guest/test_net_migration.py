"""Live migration of a guest on vhostuser-net: the destination announces the
guest's MAC (issue 7: "For net, SEND_RARP / GUEST_ANNOUNCE after migration"),
on QEMU 7.2 (no MSI-X) and on QEMU 10 (MSI-X).

One network namespace holds a bridge ``br0`` (the host side, HOST_IP) with
two TAPs: ``vhu-src`` served by the source QEMU's vhostuser-net and
``vhu-dst`` served by the destination QEMU's.  The guest brings eth0 up,
pings the host (so the bridge learns its MAC on ``vhu-src``) and idles.
The test migrates it over a unix socket (QMP) while a raw AF_PACKET socket
on ``vhu-dst`` records what arrives *from the back-end* there.

After migration QEMU (7.2 and 10) calls qemu_announce_self() on the destination:

* ``guest_announce=on`` (QEMU's default; Linux acks VIRTIO_NET_F_GUEST_ANNOUNCE
  with CTRL_VQ): QEMU sets VIRTIO_NET_S_ANNOUNCE, the guest's driver calls
  netdev_notify_peers() and sends gratuitous ARPs itself, through our
  back-end onto ``vhu-dst``; QEMU sends no SEND_RARP.
* ``guest_announce=off``: QEMU sends VHOST_USER_SEND_RARP to the destination
  back-end, whose ``send_rarp()`` writes a RARP request for the guest's MAC
  onto ``vhu-dst``.

Either way the bridge relearns the guest's MAC on ``vhu-dst``; without an
announcement it would keep forwarding to the (stopped) source for the
fdb ageing time (300 s), so the host's ping of the migrated guest also checks
that the announcement did its job.

With ``guest_announce=off`` every SEND_RARP must put one well-formed frame
on the TAP. QEMU 7.2 sends its first one before SET_FEATURES: this test found
that the back-end then wrote a 12-byte virtio-net header while the TAP still
expected the kernel's default 10 (fixed: the TAP's header size is set when
the device is made).

Only traffic inside the namespace the test creates; everything is killed in
teardown.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from vhostuser_devkit import guest
from vhostuser_devkit.qmp import QMP, QMPError

from test_migration import migrate                               # noqa: E402
from test_net_guest import in_ns, start_net, stop_net, wait_for  # noqa: E402

HOST_IP, GUEST_IP = "10.77.5.1", "10.77.5.2"
GUEST_MAC = "52:54:00:5a:17:01"
MEMORY_MB = 256
ANNOUNCE_WAIT = 10.0      # seconds after the migration to wait for an announcement
ANNOUNCE_GRACE = 2.5      # then this long to count the rest (QEMU: 5 rounds in ~1.3 s)

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
PINGS = 3

pytestmark = pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 not installed")

WORKLOAD = f"""
ip link set lo up
ip link set eth0 up || exit 10
ip addr add {GUEST_IP}/24 dev eth0 || exit 11
i=0; while [ $i -lt 30 ] && ! ping -c 1 -W 1 {HOST_IP} > /dev/null 2>&1; do i=$((i+1)); done
echo "NET-READY tries=$i"
i=0; while [ $i -lt 240 ]; do echo "ALIVE $i"; i=$((i+1)); sleep 0.5; done
"""

# Runs inside the namespace: prints one line per ARP/RARP/IPv6 frame the
# back-end wrote into the TAP (not what the kernel sends out of it) whose
# Ethernet source is the guest's MAC, until stdin is closed.
CAPTURE = r"""
import select, socket, sys, time
ifname, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((ifname, 0))
print("CAPTURE-READY", flush=True)
def ip(b): return ".".join(map(str, b))
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if sys.stdin in ready and not sys.stdin.readline():
        break
    if s not in ready:
        continue
    frame, addr = s.recvfrom(65535)
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    if frame[6:12] != mac:
        at = frame.find(mac, 0, 64)
        if at >= 0:     # the guest's MAC, but not where an Ethernet source is
            print(f"MALFORMED {time.monotonic():.3f} mac_at={at} head={frame[:24].hex()}",
                  flush=True)
        continue
    if len(frame) < 42:
        continue
    etype = frame[12:14].hex()
    t = f"{time.monotonic():.3f}"
    if etype == "8035":
        print(f"RARP {t} op={int.from_bytes(frame[20:22], 'big')} sha={frame[22:28].hex()} "
              f"tha={frame[32:38].hex()} dst={frame[0:6].hex()}", flush=True)
    elif etype == "0806":
        spa, tpa = frame[28:32], frame[38:42]
        print(f"ARP {t} op={int.from_bytes(frame[20:22], 'big')} sha={frame[22:28].hex()} "
              f"spa={ip(spa)} tpa={ip(tpa)} gratuitous={int(spa == tpa)}", flush=True)
    elif etype == "86dd":
        print(f"IPV6 {t} next={frame[20]} icmp6_type={frame[54] if frame[20] == 58 else -1}",
              flush=True)
"""


@pytest.fixture
def bridged_ns():
    """A namespace with br0 (HOST_IP/24); the back-ends create the TAPs."""
    name = f"vhu-mig-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        in_ns(name, "ip", "link", "set", "lo", "up")
        # Less noise on the TAPs; the namespace is ours.
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1"], check=False)
        in_ns(name, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(name, "ip", "addr", "add", f"{HOST_IP}/24", "dev", "br0")
        in_ns(name, "ip", "link", "set", "br0", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def wait_tap(ns: str, ifname: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", ifname],
                         capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the back-end's TAP {ifname} did not appear")
        time.sleep(0.05)


def attach_to_bridge(ns: str, ifname: str) -> None:
    wait_tap(ns, ifname)
    in_ns(ns, "ip", "link", "set", ifname, "master", "br0")
    in_ns(ns, "ip", "link", "set", ifname, "up")


def ping(ns: str, count: int = 3) -> tuple[int, str]:
    """Pings the guest from the namespace (busybox ping: the guest kit needs the
    host's static busybox anyway); returns (replies, output)."""
    out = subprocess.run(["ip", "netns", "exec", ns, BUSYBOX, "ping", "-c", str(count),
                          "-i", "0.3", "-W", "2", GUEST_IP],
                         capture_output=True, text=True, timeout=30)
    m = re.search(r"(\d+) packets received", out.stdout)
    return (int(m.group(1)) if m else 0), out.stdout + out.stderr


def fdb_port(ns: str) -> str | None:
    """The bridge port br0 forwards GUEST_MAC to, if the bridge knows it."""
    out = subprocess.run(["ip", "netns", "exec", ns, "bridge", "fdb", "show", "br", "br0"],
                         capture_output=True, text=True).stdout
    m = re.search(rf"^{GUEST_MAC} dev (\S+)", out, re.M | re.I)
    return m.group(1) if m else None


class Capture:
    """The CAPTURE script on one TAP, its lines collected by a thread."""

    def __init__(self, ns: str, ifname: str):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CAPTURE, ifname, GUEST_MAC],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        first = self.proc.stdout.readline()
        if first.strip() != "CAPTURE-READY":
            raise RuntimeError(f"capture did not start: {first!r}")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.strip()))

    def announcements(self, since: float = 0.0) -> dict[str, list[str]]:
        mac = GUEST_MAC.replace(":", "")
        found: dict[str, list[str]] = {"rarp": [], "garp": [], "arp_other": [], "ipv6": [],
                                             "malformed": []}
        for t, line in list(self.lines):
            if t < since:
                continue
            if line.startswith("RARP ") and f"sha={mac}" in line and f"tha={mac}" in line:
                found["rarp"].append(line)
            elif line.startswith("ARP ") and f"sha={mac}" in line:
                garp = "gratuitous=1" in line and f"spa={GUEST_IP}" in line
                found["garp" if garp else "arp_other"].append(line)
            elif line.startswith("IPV6 "):
                found["ipv6"].append(line)
            elif line.startswith("MALFORMED "):
                found["malformed"].append(line)
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._thread.join(5)


@pytest.mark.parametrize("guest_announce", [True, False], ids=["guest-announce", "send-rarp"])
def test_destination_announces_guest_mac_after_migration(guest_kit, bridged_ns, sock_dir,
                                                         tmp_path, capsys, guest_announce, qemu):
    ns = bridged_ns
    props = {"romfile": "", "guest_announce": guest_announce}
    socks = {side: str(sock_dir / f"{side}.sock") for side in ("src", "dst")}
    backends = {}
    vms: list[guest.GuestProcess] = []
    capture = None
    report: dict = {}
    try:
        for side in ("src", "dst"):
            # start_net adds -v; one more logs every message (SEND_RARP counted below)
            backends[side] = start_net(ns, sock_dir / f"{side}.log", "-v", "--socket-path",
                                       socks[side], "--tap", f"vhu-{side}", "--mac", GUEST_MAC)
        for side in ("src", "dst"):
            wait_for(socks[side])
            attach_to_bridge(ns, f"vhu-{side}")

        def vm(side: str, extra=()) -> guest.GuestProcess:
            v = guest.GuestProcess(guest_kit, WORKLOAD, memory_mb=MEMORY_MB, pvh=True, smp=1,
                                   qemu=qemu, net=[guest.QemuNet(socket=socks[side], mac=GUEST_MAC,
                                                        properties=props)],
                                   extra_args=list(extra))
            vms.append(v)
            return v.start()

        src = vm("src")
        src.wait_for(r"^NET-READY", timeout=60)
        replies, out = ping(ns, PINGS)
        assert replies == PINGS, f"the guest did not answer ping before the migration:\n{out}"
        report["fdb_before"] = fdb_port(ns)

        uri = f"unix:{tmp_path}/mig.sock"
        dst = vm("dst", ["-incoming", uri])
        with QMP.connect(dst.qmp_path):
            pass                                  # listening for the migration now
        capture = Capture(ns, "vhu-dst")
        t0 = time.monotonic()
        try:
            report["migration_s"] = round(migrate(src, uri, timeout=60), 1)
            with QMP.connect(dst.qmp_path) as qmp:
                deadline = time.monotonic() + 30
                while qmp.status() != "running":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"destination not running: {qmp.status()}")
                    time.sleep(0.1)
        except (RuntimeError, TimeoutError, QMPError, ConnectionError) as exc:
            pytest.fail(f"migration failed: {exc}\n--- source ---\n{src._diagnostics()}"
                        f"\n--- destination ---\n{dst._diagnostics()}")
        t_running = time.monotonic()
        kind = "garp" if guest_announce else "rarp"
        deadline = t_running + ANNOUNCE_WAIT
        while not capture.announcements(t0)[kind] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(ANNOUNCE_GRACE)
        capture.stop()
        found = capture.announcements(t0)
        report["announcements"] = {k: len(v) for k, v in found.items()}
        report["first"] = {k: v[0] for k, v in found.items() if v}
        report["fdb_after"] = fdb_port(ns)

        # The migrated guest still runs and answers the host on the bridge.
        replies_after, ping_after = ping(ns, PINGS)
        report["ping_replies_after"] = f"{replies_after}/{PINGS}"
        alive = len(re.findall(r"^ALIVE ", dst.serial, re.M))
        deadline = time.monotonic() + 20
        while len(re.findall(r"^ALIVE ", dst.serial, re.M)) < alive + 2:
            assert dst.running(), f"destination QEMU ended:\n{dst._diagnostics()}"
            assert time.monotonic() < deadline, f"migrated guest stalled:\n{dst._diagnostics()}"
            time.sleep(0.2)
        assert src.running() and dst.running()
    finally:
        if capture is not None:
            capture.stop()
        for v in vms:
            v.kill()
        for v in vms:
            v.close()
        statuses = {side: stop_net(*pair) for side, pair in backends.items()}
    logs = {side: (sock_dir / f"{side}.log").read_text(errors="replace") for side in backends}
    send_rarps = {side: len(re.findall(r": SEND_RARP \(", text)) for side, text in logs.items()}
    report["SEND_RARP_messages"] = send_rarps
    dst_messages = re.findall(r": ([A-Z_]+) \(\d+ bytes", logs.get("dst", ""))
    early = dst_messages.index("SET_FEATURES") if "SET_FEATURES" in dst_messages else 0
    report["SEND_RARP_before_SET_FEATURES"] = dst_messages[:early].count("SEND_RARP")
    with capsys.disabled():
        print(f"\n[net-migration {qemu.label} guest_announce={'on' if guest_announce else 'off'}] "
              f"{report}")

    assert statuses == {"src": 0, "dst": 0}, (statuses, {k: v[-2000:] for k, v in logs.items()})
    for side, text in logs.items():
        assert "Traceback" not in text and " ERROR" not in text, f"{side} back-end:\n{text[-3000:]}"
    assert replies_after == PINGS, (f"the migrated guest did not answer every ping (bridge fdb: "
                                    f"{report['fdb_after']}):\n{ping_after}")
    if guest_announce:
        # the guest announced itself; QEMU did not ask the back-end
        assert found["garp"], f"no gratuitous ARP from the guest on vhu-dst: {report}"
        assert send_rarps["dst"] == 0 and not found["rarp"], report
    else:
        # QEMU asked the destination back-end, which wrote one RARP onto its TAP
        # for every SEND_RARP (the guest did not negotiate GUEST_ANNOUNCE)
        assert send_rarps["dst"] >= 1, report
        assert found["rarp"], f"no RARP for the guest's MAC on vhu-dst: {report}"
        assert len(found["rarp"]) + len(found["malformed"]) == send_rarps["dst"], report
        assert not found["garp"], report
    assert send_rarps["src"] == 0, report
    if report["fdb_after"] is not None:
        assert report["fdb_after"] == "vhu-dst", report
    assert not found["malformed"], (
        f"{len(found['malformed'])} of {send_rarps['dst']} SEND_RARPs reached vhu-dst as a "
        f"malformed frame ({report['SEND_RARP_before_SET_FEATURES']} SEND_RARP before "
        f"SET_FEATURES): {found['malformed'][0]}")
