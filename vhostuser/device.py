"""Device model: what a virtio device served over vhost-user declares.

A :class:`Device` lives as long as its socket; each front-end connection
gets a fresh :class:`~vhostuser.dataplane.DataPlane` from the session, and
the device tells it what serves each queue.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._native import lib
from .dataplane import BatchHandler, NativeHandler
from .errors import ProtocolError
from .protocol import Feature, ProtocolFeature, Request, bits
from .queue import Element, Queue

if TYPE_CHECKING:
    from .handler import Session

log = logging.getLogger(__name__)

#: Ring features the C data plane implements for every device.
RING_FEATURES = bits(Feature.VERSION_1, Feature.RING_INDIRECT_DESC,
                     Feature.RING_EVENT_IDX, Feature.RING_PACKED)

#: Protocol features the control plane implements for every device.
BASE_PROTOCOL_FEATURES = bits(
    ProtocolFeature.MQ, ProtocolFeature.LOG_SHMFD, ProtocolFeature.REPLY_ACK,
    ProtocolFeature.BACKEND_REQ, ProtocolFeature.CONFIG, ProtocolFeature.INFLIGHT_SHMFD,
    ProtocolFeature.RESET_DEVICE, ProtocolFeature.CONFIGURE_MEM_SLOTS,
    ProtocolFeature.STATUS)


class Device:
    """Base class of served devices.

    Subclasses set ``device_id``, override :meth:`device_features`,
    :meth:`config_space`, and :meth:`queue_handler`.
    """

    #: virtio device id (2 block, 1 net); informational for the control plane
    device_id = 0
    #: queues served by one worker thread (set before a front-end connects)
    queues_per_worker = 1
    #: after serving requests, a worker keeps looking at its rings for up to
    #: this many microseconds before it sleeps, less while nothing comes in
    #: that window (0: sleep at once). Set before a front-end connects.
    adaptive_poll_us = lib.VU_ADAPTIVE_POLL_US
    #: seconds a stop, reset or disconnect waits for requests in flight
    #: before it goes on without them (None: handler.DRAIN_TIMEOUT)
    drain_timeout: float | None = None

    def __init__(self, num_queues: int = 1, *, poll_us: int = 0):
        if not 1 <= num_queues <= 256:
            raise ValueError(f"num_queues must be 1..256, not {num_queues}")
        self.num_queues = num_queues
        self.poll_us = poll_us
        self.session: Session | None = None

    # -- what the front-end negotiates ------------------------------------
    def device_features(self) -> int:
        """Device-type feature bits (without the ring features)."""
        return 0

    def features(self) -> int:
        """Everything offered in GET_FEATURES."""
        return self.device_features() | RING_FEATURES | bits(Feature.LOG_ALL)

    def protocol_features(self) -> int:
        return BASE_PROTOCOL_FEATURES

    def config_space(self) -> bytes:
        """The virtio config space as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes, flags: int) -> None:
        """SET_CONFIG from the driver. Read-only by default."""
        raise ProtocolError(Request.SET_CONFIG, f"config space is read-only (offset {offset})")

    async def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """SET_CONFIG as the session runs it, before its reply: write_config,
        plus what a device must await after it (off the event loop)."""
        self.write_config(offset, data, flags)

    # -- serving ------------------------------------------------------------
    def queue_handler(self, queue: Queue) -> BatchHandler | NativeHandler:
        """What serves ``queue``: a Python batch handler or a C handler."""
        return self.handle_batch

    def handle_batch(self, queue: Queue, elements: list[Element]) -> None:
        """Default Python handler: override, or return another handler from
        :meth:`queue_handler`. Runs in the queue's worker thread."""
        raise NotImplementedError

    # -- lifecycle hooks (control plane, event loop thread) -----------------
    def on_connect(self, session: Session) -> None:
        self.session = session

    def on_disconnect(self, session: Session) -> None:
        if self.session is session:
            self.session = None

    def on_features(self, features: int) -> None:
        """Called after SET_FEATURES with what the driver accepted."""

    def on_reset(self) -> None:
        """RESET_DEVICE / RESET_OWNER / status 0."""

    def quiesce(self) -> None:
        """The workers are stopped and guest memory is about to go away:
        wait for any I/O still in flight that points into it."""

    def send_rarp(self, mac: bytes) -> None:
        raise ProtocolError(Request.SEND_RARP, "not a network device")

    def set_mtu(self, mtu: int) -> None:
        raise ProtocolError(Request.NET_SET_MTU, "not a network device")

    def notify_config_change(self) -> bool:
        """Tells the driver the config space changed (back-end channel).
        Returns False when no front-end channel is there to tell."""
        if self.session is None:
            return False
        return self.session.notify_config_change()


class EchoDevice(Device):
    """A minimal device for tests: each chain's readable bytes are copied
    into its writable buffers (as far as they fit)."""

    def handle_batch(self, queue: Queue, elements: list[Element]) -> None:
        for element in elements:
            element.complete(element.write(element.read_all()))
