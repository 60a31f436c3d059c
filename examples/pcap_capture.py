"""Capture everything a guest sends and receives to a pcap file (readable by
tcpdump and Wireshark), while bridging it to a TAP.

    vhostuser-net --socket-path /tmp/net.sock --backend examples.pcap_capture:PcapCapture \
        --backend-opt tap=vhu0 --backend-opt pcap=/tmp/guest.pcap
"""
from __future__ import annotations

import struct
import threading
import time

from examples.tap_bridge import TapBridge

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535


class PcapCapture(TapBridge):
    def __init__(self, tap: str = "vhu0", pcap: str = "guest.pcap"):
        self.out = open(pcap, "wb")
        self.out.write(struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        self.out.flush()
        self._lock = threading.Lock()     # the guest's worker and the TAP reader both write
        super().__init__(tap)

    def _record(self, frame: bytes) -> None:
        now = time.time()
        sec, usec = int(now), int((now % 1) * 1_000_000)
        data = frame[:SNAPLEN]
        with self._lock:
            self.out.write(struct.pack("<IIII", sec, usec, len(data), len(frame)) + data)
            self.out.flush()

    def to_network(self, frame):
        self._record(frame)
        return frame

    def to_guest(self, frame):
        self._record(frame)
        return frame

    def close(self) -> None:
        super().close()
        self.out.close()
