"""A network back-end in Python that bridges the guest to a TAP interface:
the base the pcap and firewall examples build on. Frames the guest sends go
through ``to_network``; frames from the TAP through ``to_guest``; override
either to look at, change or drop frames (return None to drop).

    vhostuser-net --socket-path /tmp/net.sock --backend examples.tap_bridge:TapBridge \
        --backend-opt tap=vhu0
"""
from __future__ import annotations

import fcntl
import os
import select
import struct
import threading

from vhostuser.net import NetBackend

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


class TapBridge(NetBackend):
    def __init__(self, tap: str = "vhu0"):
        super().__init__()
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", tap.encode(), IFF_TAP | IFF_NO_PI))
        self._stop_r, self._stop_w = os.pipe()
        self._reader = threading.Thread(target=self._read_loop, name=f"tap-{tap}", daemon=True)
        self._reader.start()

    # -- hooks ---------------------------------------------------------------
    def to_network(self, frame: bytes) -> bytes | None:
        """A frame from the guest on its way out; None drops it."""
        return frame

    def to_guest(self, frame: bytes) -> bytes | None:
        """A frame from the network on its way to the guest; None drops it."""
        return frame

    # -- plumbing ------------------------------------------------------------
    def transmit(self, queue_pair, frames):
        for f in frames:
            out = self.to_network(f.tobytes())
            if out is not None:
                os.write(self.fd, out)

    def _read_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            frame = os.read(self.fd, 65536)
            out = self.to_guest(frame)
            if out is not None:
                self.inject(out)   # dropped (and counted) if the guest has no buffers

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._reader.join(5)
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)
