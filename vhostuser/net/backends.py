"""Network back-ends for the virtio-net device.

:class:`TapBackend` runs in C in the queue workers (writev to the TAP,
receive through a staging buffer). :class:`NetBackend` is the class to
subclass for a back-end in Python: it gets transmitted frames as
memoryviews and can inject frames toward the guest from any thread.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import VhostUserError
from ..sandbox import access as sandbox_access

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100


class NetBackendError(VhostUserError):
    """The network back-end can't be set up (no TAP, no permission, ...)."""


@dataclass
class TapBackend:
    """A TAP interface (created if missing, else attached), one queue per
    queue pair (IFF_MULTI_QUEUE), with virtio-net headers (IFF_VNET_HDR) so
    checksum and segmentation offloads pass through."""
    ifname: str
    queue_pairs: int = 1
    fds: list[int] = field(default_factory=list)

    def open(self) -> None:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        if self.queue_pairs > 1:
            flags |= IFF_MULTI_QUEUE
        for _ in range(self.queue_pairs):
            try:
                # /dev/net/tun + TUNSETIFF (sandboxed: by the helper)
                fd = sandbox_access.open_tun(self.ifname, flags)
            except OSError as exc:
                self.close()
                raise NetBackendError(f"TAP {self.ifname}: {exc.strerror}") from None
            self.fds.append(fd)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class SinkBackend:
    """Frames the guest transmits are counted and dropped, in C: a
    benchmark's or a test's far end that costs nothing."""

    def close(self) -> None:
        """Nothing to release."""


class LoopbackBackend:
    """Every frame the guest transmits comes back to it on the same queue
    pair's receive queue, copied in C (dropped when it has no buffers)."""

    def close(self) -> None:
        """Nothing to release."""


class NetBackend:
    """Base class of network back-ends written in Python.

    Override :meth:`transmit`. Call :meth:`inject` (any thread) to hand a
    frame to the guest. Frames are Ethernet frames without the virtio-net
    header; ``header`` carries the guest's offload request (a 12-byte
    virtio_net_hdr as bytes) for back-ends that care.

    Calls of :meth:`transmit` for one queue pair never overlap; they come
    from its worker thread, or (a RARP announcement after a migration) from
    a thread of their own. Calls for different queue pairs do overlap.
    :meth:`transmit` is a plain method; what it returns is ignored, and an
    exception it raises is logged (rate-limited; an OSError as one line)
    and counted as ``transmit_errors``, its frames consumed.
    """

    #: largest payload (MTU) the back-end takes
    mtu = 1500

    def __init__(self):
        self.device = None

    def transmit(self, queue_pair: int, frames: list["Frame"]) -> None:
        raise NotImplementedError

    def inject(self, frame: bytes, queue_pair: int = 0) -> bool:
        """Sends a frame toward the guest; False when it was dropped (no
        buffers, ring disabled, not connected)."""
        if self.device is None:
            return False
        return self.device.inject(frame, queue_pair)

    def close(self) -> None:
        """Called once the device is done with the back-end."""


class Frame:
    """A frame the guest transmitted. ``views`` are memoryviews over guest
    memory, valid only during :meth:`NetBackend.transmit`."""

    __slots__ = ("views", "header", "length")

    def __init__(self, views: list[memoryview], header: bytes, length: int):
        self.views = views
        self.header = header
        self.length = length

    def tobytes(self) -> bytes:
        return b"".join(bytes(v) for v in self.views)
