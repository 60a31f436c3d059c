"""The built-in learning switch (csrc/vu_switch.c) and its VXLAN uplink
(RFC 7348): ports are NetDevices over ring labs (one C device each, no
sockets), frames go in through the real transmit path; two switches talk
VXLAN over 127.0.0.1; and one end-to-end run over vhost-user sockets with
the library's front-end."""
import contextlib
import socket
import struct
import threading
import time

import pytest

from vhostuser.frontend import Buffer, Frontend, GuestMemory
from vhostuser.frontend.device import DEFAULT_FEATURES
from vhostuser.native import ffi, lib
from vhostuser.net import NetDevice, NetFeature, Switch, VxlanUplink
from vhostuser.net.spec import HDR
from vhostuser.net.switch import UPLINK
from vhostuser.protocol import Feature, bit, bits
from vhostuser_devkit.ringlab import Lab
from vhostuser.testing.server import BackgroundServer

BROADCAST = b"\xff" * 6
ZERO_HDR = HDR.pack(0, 0, 0, 0, 0, 0, 0)


def mac(n: int) -> bytes:
    return bytes([0x52, 0x54, 0, 0, n >> 8, n & 0xFF])


def eth(dst: bytes, src: bytes, payload: bytes = b"hello", ethertype: int = 0x88B5) -> bytes:
    return (dst + src + struct.pack("!H", ethertype) + payload).ljust(60, b"\0")


class Port:
    """A NetDevice on a switch, its rings in a lab: as if a session served it."""

    def __init__(self, switch: Switch, n: int, *, mtu: int = 1500):
        self.mac = mac(n)
        self.lab = Lab(nqueues=2, size=64)
        for q in range(2):
            self.lab.vq(q).enabled = True
        self.dev = NetDevice(switch.port(), mac=self.mac, mtu=mtu)
        self.dev.on_features(bits(Feature.VERSION_1, NetFeature.MRG_RXBUF))
        self.dev._net.rxq[0] = self.lab.vq(0)
        self.dev.backend.attach()
        self.rx_bufs = {}
        self.tx_buf = self.lab.alloc(2048)

    @property
    def index(self) -> int:
        return self.dev.backend.index

    def post(self, count: int = 8, size: int = 2048) -> None:
        heads = []
        for _ in range(count):
            gpa = self.lab.alloc(size)
            head = self.lab.add_split_chain(0, [(gpa, size, True)])
            self.rx_bufs[head] = gpa
            heads.append(head)
        self.lab.publish_split(0, heads)

    def send(self, frame: bytes) -> None:
        """Through the guest's transmit queue and vu_net_handler."""
        self.lab.write(self.tx_buf, ZERO_HDR + frame)
        head = self.lab.add_split_chain(1, [(self.tx_buf, 12 + len(frame), False)])
        self.lab.publish_split(1, [head])
        lib.vu_net_handler(self.dev._net, self.lab.vq(1))
        assert len(self.lab.used_split(1)) == 1

    def received(self) -> list[bytes]:
        """Frames delivered since the last call, header checked and stripped."""
        frames = []
        for head, length in self.lab.used_split(0):
            data = self.lab.read(self.rx_bufs[head], length)
            # no offloads: a zeroed header, one buffer per frame
            assert data[:12] == HDR.pack(0, 0, 0, 0, 0, 0, 1)
            frames.append(data[12:])
        return frames

    def wait_received(self, count: int, timeout: float = 5.0) -> list[bytes]:
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            got += self.received()
            time.sleep(0.005)
        return got

    def close(self) -> None:
        if self.lab is not None:
            self.dev.quiesce()          # what Session.close does before freeing the rings
            self.dev._net.rxq[0] = ffi.NULL
            self.lab.close()
            self.lab = None
        self.dev.close()


@pytest.fixture
def switch():
    sw = Switch()
    ports = []

    def make(n, **kw):
        p = Port(sw, n, **kw)
        ports.append(p)
        p.post()
        return p

    sw.make = make
    yield sw
    for p in ports:
        p.close()
    sw.close()


def test_learning_stops_flooding_once_both_ends_are_known(switch):
    a, b, c = switch.make(1), switch.make(2), switch.make(3)
    first = eth(b.mac, a.mac, b"ping")
    a.send(first)                               # B unknown: flooded
    assert b.received() == [first] and c.received() == [first]
    reply = eth(a.mac, b.mac, b"pong")
    b.send(reply)                               # A learned from the ping
    assert a.received() == [reply] and c.received() == []
    again = eth(b.mac, a.mac, b"ping again")
    a.send(again)                               # B learned from the reply
    assert b.received() == [again] and c.received() == []
    assert switch.lookup(a.mac) == a.index and switch.lookup(b.mac) == b.index
    assert switch.stats(a.index) == {"in": 2, "forwarded": 1, "flooded": 1, "dropped": 0,
                                 "out": 1, "out_dropped": 0}
    assert switch.stats(b.index)["forwarded"] == 1
    assert switch.stats(c.index)["out"] == 1
    # the guests' own counters: frames through the transmit and receive paths
    assert a.dev.stats()["tx_packets"] == 2 and b.dev.stats()["rx_packets"] == 2
    assert a.dev.stats()["switch_forwarded"] == 1


@pytest.mark.parametrize("dst", [BROADCAST, b"\x01\x00\x5e\x00\x00\x01", mac(99)],
                         ids=["broadcast", "multicast", "unknown"])
def test_flooding_reaches_every_port_but_the_source(switch, dst):
    ports = [switch.make(n) for n in range(1, 5)]
    frame = eth(dst, ports[0].mac, bytes(range(200)))
    ports[0].send(frame)
    assert ports[0].received() == []
    for p in ports[1:]:
        assert p.received() == [frame]
    assert switch.stats(ports[0].index)["flooded"] == 1


def test_a_frame_never_goes_back_to_its_source(switch):
    a, b = switch.make(1), switch.make(2)
    a.send(eth(BROADCAST, a.mac))               # A learned on A
    b.received()
    a.send(eth(a.mac, a.mac))                   # to itself
    a.send(eth(a.mac, mac(7)))                  # a second station behind A, to the first
    assert a.received() == [] and b.received() == []
    assert switch.stats(a.index)["dropped"] == 2
    assert switch.lookup(mac(7)) == a.index


def test_invalid_source_addresses_are_dropped_not_learned(switch):
    a, b = switch.make(1), switch.make(2)
    a.send(eth(BROADCAST, b"\x01\x00\x5e\x00\x00\x01"))     # a group address as source
    a.send(eth(BROADCAST, bytes(6)))                        # all zeroes
    assert b.received() == []
    assert switch.stats(a.index)["dropped"] == 2
    assert switch.mac_count() == 0


def test_an_address_moves_with_its_station(switch):
    a, b, c = switch.make(1), switch.make(2), switch.make(3)
    a.send(eth(BROADCAST, mac(50)))
    assert switch.lookup(mac(50)) == a.index
    b.send(eth(BROADCAST, mac(50)))             # migrated behind B
    assert switch.lookup(mac(50)) == b.index
    c.send(eth(mac(50), c.mac))
    assert b.received()[-1] == eth(mac(50), c.mac) and a.received() == [eth(BROADCAST, mac(50))]


def test_frames_longer_than_the_destination_mtu_are_not_delivered(switch):
    a, small = switch.make(1, mtu=1500), switch.make(2, mtu=576)
    big = eth(BROADCAST, a.mac, bytes(1000))
    a.send(big)
    assert small.received() == []
    assert switch.stats(small.index)["out_dropped"] == 1


def test_no_buffers_at_the_destination_is_a_counted_drop(switch):
    a = switch.make(1)
    b = Port(switch, 2)                         # posts no receive buffers
    try:
        a.send(eth(BROADCAST, a.mac))
        assert switch.stats(b.index)["out_dropped"] == 1
        assert b.dev.stats()["rx_dropped_no_buffers"] == 1
    finally:
        b.close()


def test_detached_port_gets_nothing_and_its_addresses_are_forgotten(switch):
    a, b, c = switch.make(1), switch.make(2), switch.make(3)
    b.send(eth(BROADCAST, b.mac))
    a.received(), c.received()
    assert switch.lookup(b.mac) == b.index
    assert switch.stats(b.index)["in"] == 1
    # the session of B ends: detach, then its rings and memory are freed
    b.dev.quiesce()
    b.lab.close()
    b.lab = None
    assert switch.lookup(b.mac) is None
    a.send(eth(BROADCAST, a.mac))
    a.send(eth(b.mac, a.mac))                   # unknown again: flooded to C only
    assert c.received() == [eth(BROADCAST, a.mac), eth(b.mac, a.mac)]
    assert switch.stats(b.index)["out"] == 0


def test_detaching_while_frames_fly(switch):
    """A port's session ends while another port floods without a pause:
    once detach returns nothing touches the freed rings (ASan build: .ci)."""
    a, c = switch.make(1), switch.make(3)
    victims = [Port(switch, 10 + i) for i in range(4)]
    for v in victims:
        v.post(32)
    stop = threading.Event()
    sent = [0]

    def flood():
        frame = eth(BROADCAST, a.mac)
        while not stop.is_set():
            a.dev.backend.send(frame)           # vu_switch_send: the GIL is released
            sent[0] += 1

    t = threading.Thread(target=flood)
    t.start()
    try:
        for v in victims:
            time.sleep(0.01)
            v.close()
    finally:
        stop.set()
        t.join()
    assert sent[0] > 0
    assert switch.stats(a.index)["flooded"] == sent[0]


def test_a_port_with_several_queue_pairs_keeps_each_flow_on_one_queue(switch):
    a = switch.make(1)
    lab = Lab(nqueues=4, size=64)
    dev = NetDevice(switch.port(), queue_pairs=2, mac=mac(2))
    try:
        dev.on_features(bits(Feature.VERSION_1, NetFeature.MRG_RXBUF))
        for qp in range(2):
            dev._net.rxq[qp] = lab.vq(2 * qp)
            lab.vq(2 * qp).enabled = True
            lab.publish_split(2 * qp, [lab.add_split_chain(2 * qp, [(lab.alloc(2048), 2048, True)])
                                       for _ in range(40)])
        dev.backend.attach()
        for n in range(16):                     # 16 flows, two frames each
            for _ in range(2):
                a.dev.backend.send(eth(mac(2), mac(100 + n)))
        per_queue = [lab.used_split(0), lab.used_split(2)]
        assert sum(map(len, per_queue)) == 32
        assert all(len(q) % 2 == 0 for q in per_queue) and all(per_queue)
        # the guest enables only the first pair: everything lands there
        lab.vq(2).enabled = False
        a.dev.backend.send(eth(mac(2), mac(100)))
        a.dev.backend.send(eth(mac(2), mac(101)))
        assert len(lab.used_split(0)) == 2
    finally:
        dev.quiesce()
        lab.close()
        dev.close()


def test_the_address_table_is_bounded(switch):
    a, b = switch.make(1), switch.make(2)
    port = a.dev.backend
    for n in range(5000):
        src = b"\x02" + struct.pack("!I", n) + b"\x01"
        assert port.send(eth(BROADCAST, src))
    sets, ways = lib.VU_SWITCH_MAC_SETS, lib.VU_SWITCH_MAC_WAYS
    assert sets * ways == 1024
    assert switch.mac_count() == 1024           # full, never more
    last = b"\x02" + struct.pack("!I", 4999) + b"\x01"
    assert switch.lookup(last) == a.index       # the newest is always kept
    assert switch.stats(a.index)["in"] == 5000


def test_learned_addresses_age_out(switch):
    a, b, c = switch.make(1), switch.make(2), switch.make(3)
    b.send(eth(BROADCAST, b.mac))
    a.received(), c.received()
    switch.set_aging(50)
    time.sleep(0.1)
    assert switch.mac_count() == 0 and switch.lookup(b.mac) is None
    a.send(eth(b.mac, a.mac))                   # flooded again
    assert c.received() == [eth(b.mac, a.mac)]


def test_rarp_announcement_goes_out_of_the_port(switch):
    a, b = switch.make(1), switch.make(2)
    a.dev.send_rarp(a.mac)
    (frame,) = b.received()
    assert frame[:6] == BROADCAST and frame[6:12] == a.mac and frame[12:14] == b"\x80\x35"
    assert switch.lookup(a.mac) == a.index


def test_a_switch_port_offers_no_offloads():
    with Switch() as sw:
        dev = NetDevice(sw.port())
        try:
            offered = dev.device_features()
            for f in (NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.HOST_TSO4,
                      NetFeature.GUEST_TSO4, NetFeature.HOST_UFO):
                assert not offered & bit(f)
            assert offered & bit(NetFeature.MRG_RXBUF)
        finally:
            dev.close()


def test_a_switch_and_its_devices_close_in_either_order():
    sw = Switch()
    dev = NetDevice(sw.port())
    sw.close()                                  # ports remain: freed with the last
    assert sw._sw != ffi.NULL
    dev.close()
    assert sw._sw == ffi.NULL
    with pytest.raises(ValueError):
        sw.port()


# -- VXLAN -------------------------------------------------------------------------

def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tunnel():
    """Two switches joined by VXLAN (VNI 42) over 127.0.0.1, one port each."""
    p2 = free_udp_port()
    s1 = Switch(VxlanUplink("127.0.0.1", p2, vni=42, local=("127.0.0.1", 0)))
    p1 = s1.uplink.local_address[1]
    s2 = Switch(VxlanUplink("127.0.0.1", p1, vni=42, local=("127.0.0.1", p2)))
    a, b = Port(s1, 1), Port(s2, 2)
    a.post(16), b.post(16)
    yield s1, s2, a, b
    for p in (a, b):
        p.close()
    s1.close()
    s2.close()


def test_vxlan_joins_two_switches(tunnel):
    s1, s2, a, b = tunnel
    hello = eth(BROADCAST, a.mac, b"over the tunnel" * 20)
    a.send(hello)
    assert b.wait_received(1) == [hello]
    assert s2.lookup(a.mac) == UPLINK
    reply = eth(a.mac, b.mac, b"and back")
    b.send(reply)                               # known unicast: to the uplink only
    assert a.wait_received(1) == [reply]
    assert s1.lookup(b.mac) == UPLINK
    assert s2.stats(b.index)["forwarded"] == 1
    assert s1.stats(UPLINK)["in"] == 1 and s1.stats(UPLINK)["forwarded"] == 1
    assert s1.vxlan_stats() == s2.vxlan_stats() == {
        "rx_short": 0, "rx_bad_flags": 0, "rx_bad_vni": 0, "rx_bad_source": 0, "tx_errors": 0}


def test_vxlan_wire_format_and_bad_datagrams(tunnel):
    s1, s2, a, b = tunnel
    port2 = s2.uplink.local_address[1]
    frame = eth(BROADCAST, mac(77), b"handmade")

    def vxlan(flags, vni):
        return struct.pack("!B3xI", flags, vni << 8) + frame

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.sendto(vxlan(0x08, 43), ("127.0.0.1", port2))            # another segment
        s.sendto(vxlan(0x00, 42), ("127.0.0.1", port2))            # no I flag
        s.sendto(vxlan(0x08, 42)[:20], ("127.0.0.1", port2))       # no full Ethernet header
        s.sendto(vxlan(0x08, 42), ("127.0.0.1", port2))            # RFC 7348 layout: accepted
        assert b.wait_received(1) == [frame]
    stats = s2.vxlan_stats()
    assert stats["rx_bad_vni"] == 1 and stats["rx_bad_flags"] == 1 and stats["rx_short"] == 1
    assert b.received() == []
    assert s2.lookup(mac(77)) == UPLINK


def test_vxlan_only_listens_to_its_peer():
    port = free_udp_port()
    with Switch(VxlanUplink("127.0.0.2", 4789, vni=5, local=("127.0.0.1", port))) as sw:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.sendto(struct.pack("!B3xI", 8, 5 << 8) + eth(BROADCAST, mac(1)), ("127.0.0.1", port))
        deadline = time.monotonic() + 5
        while sw.vxlan_stats()["rx_bad_source"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sw.vxlan_stats()["rx_bad_source"] == 1
        assert sw.mac_count() == 0


@pytest.mark.parametrize("text,expect", [
    ("192.0.2.1:4789", ("192.0.2.1", 4789, 1, None)),
    ("192.0.2.1:8472,vni=7", ("192.0.2.1", 8472, 7, None)),
    ("[2001:db8::1]:4789,vni=0x10,local=[::]:5000", ("2001:db8::1", 4789, 16, ("::", 5000))),
    ("h:1,local=10.0.0.1:4789", ("h", 1, 1, ("10.0.0.1", 4789))),
])
def test_vxlan_option_parsing(text, expect):
    u = VxlanUplink.parse(text)
    assert (u.remote, u.port, u.vni, u.local) == expect


@pytest.mark.parametrize("text", ["192.0.2.1", "192.0.2.1:x", "a:1,vni=1<<30", "a:1,vni=z",
                                  "a:1,foo=2", "a:1,local=nope"])
def test_bad_vxlan_options(text):
    with pytest.raises(ValueError):
        VxlanUplink.parse(text)


# -- end to end over vhost-user sockets ------------------------------------------------

def frontend_port(path):
    fe = Frontend.connect(path, wait=10)       # waits for a starting server
    fe.negotiate(DEFAULT_FEATURES | bit(NetFeature.MRG_RXBUF))
    mem = fe.own(GuestMemory([(0, 4 << 20)], name="net"))
    fe.set_mem_table(mem)
    rx, tx = fe.setup_queue(0, 64), fe.setup_queue(1, 64)
    for _ in range(16):
        gpa = mem.alloc(2048)
        rx.add([Buffer(gpa, 2048, True)], gpa)
    rx.notify()
    return fe, mem, rx, tx


def fe_send(mem, tx, frame):
    gpa = mem.alloc(12 + len(frame))
    mem.write(gpa, ZERO_HDR + frame)
    tx.add([Buffer(gpa, 12 + len(frame))])
    tx.notify()
    tx.wait(1, timeout=10)


def fe_receive(mem, rx, count=1):
    out = []
    for used in rx.wait(count, timeout=10):
        data = mem.read(used.token, used.length)
        assert data[:12] == HDR.pack(0, 0, 0, 0, 0, 0, 1)
        out.append(data[12:])
    return out


def test_two_frontends_talk_through_a_switch(tmp_path):
    sw = Switch()
    devs = [NetDevice(sw.port(), mac=mac(n)) for n in (1, 2)]
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(BackgroundServer(d, str(tmp_path / f"p{i}.sock")))
                   for i, d in enumerate(devs)]
        fe1, mem1, rx1, tx1 = frontend_port(servers[0].path)
        with fe1:
            fe2, mem2, rx2, tx2 = frontend_port(servers[1].path)
            with fe2:
                hello = eth(BROADCAST, mac(1), b"from front-end 1" * 10)
                fe_send(mem1, tx1, hello)
                assert fe_receive(mem2, rx2) == [hello]
                reply = eth(mac(1), mac(2), b"from front-end 2")
                fe_send(mem2, tx2, reply)
                assert fe_receive(mem1, rx1) == [reply]
                assert sw.stats(devs[1].backend.index)["forwarded"] == 1
            # front-end 2 is gone: its port is detached, front-end 1 goes on
            deadline = time.monotonic() + 10
            while devs[1].session is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert devs[1].session is None
            assert sw.lookup(mac(2)) is None
            fe_send(mem1, tx1, eth(mac(2), mac(1), b"anyone?"))
            assert sw.stats(devs[0].backend.index)["flooded"] == 2
    for d in devs:
        d.close()
    sw.close()


# -- the vhostuser-net command ------------------------------------------------------------

def test_switch_option_makes_socket_path_repeatable():
    from vhostuser.cli.net import parse_args
    args = parse_args(["--switch", "--socket-path", "a", "--socket-path=b", "--vxlan",
                       "127.0.0.1:4789,vni=3"])
    assert args.switch and args.socket_path == ["a", "b"] and args.vxlan == "127.0.0.1:4789,vni=3"
    args = parse_args(["--socket-path", "a", "--tap", "t0"])
    assert not args.switch and args.socket_path == "a" and args.tap == "t0"


@contextlib.contextmanager
def vhostuser_net(*argv):
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "vhostuser.cli.net", *argv],
                            stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err.decode()


def test_command_switch_with_two_sockets(tmp_path):
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    with vhostuser_net("--switch", "--socket-path", a, "--socket-path", b,
                       "--mac", "52:54:00:00:01:00"):
        fe1, mem1, rx1, tx1 = frontend_port(a)
        fe2, mem2, rx2, tx2 = frontend_port(b)
        with fe1, fe2:
            # one port per socket, MACs counting up from --mac
            assert fe1.get_config(0, 6) == bytes.fromhex("525400000100")
            assert fe2.get_config(0, 6) == bytes.fromhex("525400000101")
            frame = eth(BROADCAST, mac(1), b"via the command")
            fe_send(mem1, tx1, frame)
            assert fe_receive(mem2, rx2) == [frame]


def test_command_vxlan_between_two_processes(tmp_path):
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    pa, pb = free_udp_port(), free_udp_port()
    tunnel_a = f"127.0.0.1:{pb},vni=9,local=127.0.0.1:{pa}"
    tunnel_b = f"127.0.0.1:{pa},vni=9,local=127.0.0.1:{pb}"
    with vhostuser_net("--socket-path", a, "--vxlan", tunnel_a), \
         vhostuser_net("--socket-path", b, "--vxlan", tunnel_b):
        fe1, mem1, rx1, tx1 = frontend_port(a)
        fe2, mem2, rx2, tx2 = frontend_port(b)
        with fe1, fe2:
            frame = eth(BROADCAST, mac(1), b"host one to host two")
            fe_send(mem1, tx1, frame)
            assert fe_receive(mem2, rx2) == [frame]
            reply = eth(mac(1), mac(2), b"and back")
            fe_send(mem2, tx2, reply)
            assert fe_receive(mem1, rx1) == [reply]


def test_tap_uplink_in_a_private_network_namespace():
    """TapUplink opens, the uplink thread runs and stops on a TAP fd. In a
    namespace of its own with the interface down: nothing goes anywhere."""
    import shutil
    import subprocess
    import sys
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    script = """
import struct
from vhostuser.net import Switch, TapUplink
sw = Switch(TapUplink("vusw0"))
port = sw.port()
from vhostuser.net import NetDevice
dev = NetDevice(port)
dev.backend.attach()
frame = b"\\xff" * 6 + bytes([0x52, 0x54, 0, 0, 0, 1]) + b"\\x88\\xb5" + bytes(46)
assert port.send(frame)
up = sw.stats()
assert up["out"] + up["out_dropped"] == 1, up
dev.close()
sw.close()
print("ok")
"""
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", script], capture_output=True)
    if r.returncode != 0 and b"unshare" in r.stderr and b"Operation not permitted" in r.stderr:
        pytest.skip("no permission for a network namespace")
    assert r.returncode == 0 and r.stdout.strip() == b"ok", r.stderr.decode()
