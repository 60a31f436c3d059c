"""A learning Ethernet switch between virtio-net devices in one process.

    switch = Switch(uplink=VxlanUplink("192.0.2.7", 4789, vni=42))
    a = NetDevice(switch.port(), mac=...)
    b = NetDevice(switch.port(), mac=...)

Each :class:`~vhostuser.net.NetDevice` built on ``switch.port()`` is one
port (its own vhost-user socket); frames move between ports in C (see
csrc/vu_switch.c). The optional uplink is a TAP interface or a VXLAN tunnel
(RFC 7348) to another host. One device with a tunnel is a switch with one
port and the tunnel as uplink.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from ..native import check, ffi, lib
from .backends import IFF_NO_PI, IFF_TAP, TUNSETIFF, NetBackendError

VXLAN_PORT = 4789
MAX_PORTS = lib.VU_SWITCH_MAX_PORTS
UPLINK = lib.VU_SWITCH_UPLINK          # what lookup() answers for the uplink


@dataclass
class TapUplink:
    """A TAP interface as the switch's uplink (created if missing): plain
    Ethernet frames, no virtio-net header, no offloads."""
    ifname: str
    fd: int = -1

    def open(self) -> None:
        ifr = struct.pack("16sH22x", self.ifname.encode(), IFF_TAP | IFF_NO_PI)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise NetBackendError(f"TAP {self.ifname}: {exc.strerror}") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            raise NetBackendError(f"TAP {self.ifname}: {exc.strerror}") from None
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _split_host_port(text: str, what: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port'."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} wants ADDR:PORT, not {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


class VxlanUplink:
    """A VXLAN tunnel to ``remote``:``port`` with network identifier ``vni``.

    Datagrams are sent from ``local`` (ADDR, PORT; default: any address,
    the same port as the remote's) and only the remote address's are taken.
    """

    def __init__(self, remote: str, port: int = VXLAN_PORT, vni: int = 1,
                 local: tuple[str, int] | None = None):
        if not 0 <= vni <= 0xFFFFFF:
            raise ValueError(f"VNI must be 0..16777215, not {vni}")
        if not 1 <= port <= 65535:
            raise ValueError(f"VXLAN port must be 1..65535, not {port}")
        self.remote = remote
        self.port = port
        self.vni = vni
        self.local = local
        self.sock: socket.socket | None = None
        self.family = socket.AF_INET
        self.remote_addr = b""          # packed, as the C side wants it

    @classmethod
    def parse(cls, text: str) -> "VxlanUplink":
        """``REMOTE:PORT[,vni=N][,local=ADDR:PORT]`` (the --vxlan option)."""
        first, *opts = text.split(",")
        remote, port = _split_host_port(first, "--vxlan")
        vni, local = 1, None
        for opt in opts:
            key, sep, value = opt.partition("=")
            if key == "vni" and sep:
                try:
                    vni = int(value, 0)
                except ValueError:
                    raise ValueError(f"--vxlan: bad VNI {value!r}") from None
            elif key == "local" and sep:
                local = _split_host_port(value, "--vxlan local")
            else:
                raise ValueError(f"--vxlan: unknown option {opt!r} (vni=N, local=ADDR:PORT)")
        return cls(remote, port, vni, local)

    def open(self) -> None:
        try:
            info = socket.getaddrinfo(self.remote, self.port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise NetBackendError(f"VXLAN remote {self.remote}: {exc.strerror}") from None
        self.family, _, _, _, sockaddr = info[0]
        self.remote_addr = socket.inet_pton(self.family, sockaddr[0])
        local = self.local or ("::" if self.family == socket.AF_INET6 else "0.0.0.0", self.port)
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.bind(local)
        except OSError as exc:
            sock.close()
            raise NetBackendError(f"VXLAN local {local[0]}:{local[1]}: {exc.strerror}") from None
        sock.setblocking(False)
        self.sock = sock

    @property
    def local_address(self) -> tuple:
        return self.sock.getsockname()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Switch:
    """Ports (NetDevices in this process) on one segment, plus an uplink."""

    def __init__(self, uplink: TapUplink | VxlanUplink | None = None):
        self._sw = lib.vu_switch_new()
        if self._sw == ffi.NULL:
            raise MemoryError("vu_switch_new")
        self.uplink = uplink
        self._ports: set[SwitchPort] = set()
        self._closed = False
        if uplink is None:
            return
        try:
            uplink.open()
            if isinstance(uplink, TapUplink):
                check(lib.vu_switch_set_tap(self._sw, uplink.fd), "TAP uplink")
            elif isinstance(uplink, VxlanUplink):
                check(lib.vu_switch_set_vxlan(self._sw, uplink.sock.fileno(), uplink.vni,
                                              uplink.family, uplink.remote_addr, uplink.port),
                      "VXLAN uplink")
            else:
                raise TypeError(f"not an uplink: {uplink!r}")
            check(lib.vu_switch_start(self._sw), "uplink thread")
        except BaseException:
            self.close()
            raise

    def port(self) -> "SwitchPort":
        """A new port: pass it to NetDevice(...) as the back-end."""
        if self._closed:
            raise ValueError("the switch is closed")
        return SwitchPort(self)

    # -- introspection -------------------------------------------------------------
    def lookup(self, mac: bytes) -> int | None:
        """The port number ``mac`` was learned on (UPLINK for the uplink)."""
        port = lib.vu_switch_lookup(self._sw, bytes(mac[:6]))
        return None if port < 0 else port

    def mac_count(self) -> int:
        return lib.vu_switch_mac_count(self._sw)

    def set_aging(self, ms: int) -> None:
        """How long a learned address is trusted (default 300 s)."""
        lib.vu_switch_set_aging(self._sw, ms)

    def stats(self, port: int = UPLINK) -> dict[str, int]:
        """Counters of a port (default: the uplink's)."""
        out = ffi.new("struct vu_switch_stats *")
        check(lib.vu_switch_get_stats(self._sw, port, out), f"switch port {port}")
        return {name: getattr(out, name) for name in
                ("in", "forwarded", "flooded", "dropped", "out", "out_dropped")}

    def vxlan_stats(self) -> dict[str, int]:
        out = ffi.new("struct vu_vxlan_stats *")
        lib.vu_switch_get_vxlan_stats(self._sw, out)
        return {name: getattr(out, name) for name in
                ("rx_short", "rx_bad_flags", "rx_bad_vni", "rx_bad_source", "tx_errors")}

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Stops the uplink. The C switch goes when its last port is closed too."""
        if self._sw != ffi.NULL:
            lib.vu_switch_stop(self._sw)      # the uplink thread is joined
        if self.uplink is not None:
            self.uplink.close()
        self._closed = True
        self._free_if_unused()

    def _free_if_unused(self) -> None:
        if self._closed and not self._ports and self._sw != ffi.NULL:
            lib.vu_switch_free(self._sw)
            self._sw = ffi.NULL

    def __enter__(self) -> "Switch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SwitchPort:
    """The back-end of a NetDevice that is a port of a :class:`Switch`.

    NetDevice binds it when it creates its C state, attaches it when a
    session starts, detaches it before the session's queues are freed
    (``quiesce``) and closes it before freeing its C state.
    """

    def __init__(self, switch: Switch):
        self.switch = switch
        self.index: int | None = None

    def bind(self, net, queue_pairs: int) -> None:
        if self.index is not None:
            raise ValueError("this switch port already belongs to a device")
        if self.switch._closed:
            raise ValueError("the switch is closed")
        self.index = check(lib.vu_switch_add_port(self.switch._sw, net, queue_pairs),
                           f"switch port ({MAX_PORTS} at most)")
        self.switch._ports.add(self)

    def attach(self) -> None:
        if self.index is not None:
            check(lib.vu_switch_attach(self.switch._sw, self.index), "switch port")

    def detach(self) -> None:
        if self.index is not None:
            lib.vu_switch_detach(self.switch._sw, self.index)

    def send(self, frame: bytes) -> bool:
        """Sends a frame into the switch as if this port's guest had (RARP)."""
        if self.index is None:
            return False
        return lib.vu_switch_send(self.switch._sw, self.index, frame, len(frame)) == 0

    def stats(self) -> dict[str, int]:
        if self.index is None:
            raise ValueError("the switch port is closed")
        return self.switch.stats(self.index)

    def close(self) -> None:
        if self.index is not None:
            lib.vu_switch_remove_port(self.switch._sw, self.index)
            self.index = None
            self.switch._ports.discard(self)
            self.switch._free_if_unused()
