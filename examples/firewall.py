"""A small firewall between a guest and a TAP: drops frames by rule, in both
directions, and counts what it dropped.

Rules (``--backend-opt rules=...``, comma separated):
  icmp              drop ICMP (IPv4)
  tcp:PORT          drop TCP to or from PORT
  udp:PORT          drop UDP to or from PORT
  mac:AA:BB:..      drop frames from or to that MAC

    vhostuser-net --socket-path /tmp/net.sock --backend examples.firewall:Firewall \
        --backend-opt tap=vhu0 --backend-opt rules=icmp,tcp:23
"""
from __future__ import annotations

import struct
import threading

from examples.tap_bridge import TapBridge

ETH_IPV4 = 0x0800
IPPROTO = {"icmp": 1, "tcp": 6, "udp": 17}


def parse_rules(text: str) -> list[tuple]:
    rules = []
    for item in filter(None, (r.strip() for r in text.split(","))):
        kind, _, arg = item.partition(":")
        if kind == "icmp" and not arg:
            rules.append(("proto", IPPROTO["icmp"], None))
        elif kind in ("tcp", "udp") and arg.isdigit():
            rules.append(("proto", IPPROTO[kind], int(arg)))
        elif kind == "mac" and arg:
            rules.append(("mac", bytes(int(b, 16) for b in arg.split(":")), None))
        else:
            raise ValueError(f"bad firewall rule {item!r}")
    return rules


class Firewall(TapBridge):
    def __init__(self, tap: str = "vhu0", rules: str = "icmp"):
        self.rules = parse_rules(rules)
        self.dropped = 0
        self._count_lock = threading.Lock()   # the guest's workers and the TAP reader count
        super().__init__(tap)

    def matches(self, frame: bytes) -> bool:
        if len(frame) < 14:
            return True                       # not even Ethernet: drop
        dst, src = frame[0:6], frame[6:12]
        ethertype = struct.unpack("!H", frame[12:14])[0]
        proto = ports = None
        if ethertype == ETH_IPV4 and len(frame) >= 34:
            ihl = (frame[14] & 0x0F) * 4
            proto = frame[23]
            if proto in (6, 17) and len(frame) >= 14 + ihl + 4:
                ports = struct.unpack("!HH", frame[14 + ihl:14 + ihl + 4])
        for kind, value, port in self.rules:
            if kind == "mac" and value in (src, dst):
                return True
            if kind == "proto" and proto == value and (port is None or (ports and port in ports)):
                return True
        return False

    def _filter(self, frame):
        if self.matches(frame):
            with self._count_lock:
                self.dropped += 1
            return None
        return frame

    def to_network(self, frame):
        return self._filter(frame)

    def to_guest(self, frame):
        return self._filter(frame)
