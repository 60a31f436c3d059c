"""A vhost-user front-end without a VM: negotiation, memory, rings, config.

Typed methods send well-formed requests in the order QEMU would; ``send_raw``
and ``recv_raw`` send and read anything at all, for fuzzing.
"""
from __future__ import annotations

from .. import protocol
from ..protocol import (VERSION, VRING_NOFD_MASK, DeviceStatus, Feature,
                        ProtocolFeature, Request, bit, bits)
from ..message import Message
from .connection import (DEFAULT_TIMEOUT, FrontendConnection, FrontendError, ReplyError,
                         reply_u64)
from .memory import GuestMemory
from .packed import PackedRing
from .split import SplitRing
from .virtqueue import Virtqueue


class FeatureError(FrontendError):
    """A feature the caller requires was not offered, or not negotiated."""


# What negotiate() asks for unless told otherwise: modern virtio, both ring
# optimisations, and the protocol features this front-end can drive.
DEFAULT_FEATURES = bits(Feature.VERSION_1, Feature.RING_INDIRECT_DESC, Feature.RING_EVENT_IDX)
DEFAULT_PROTOCOL_FEATURES = bits(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK,
                                 ProtocolFeature.CONFIG, ProtocolFeature.RESET_DEVICE,
                                 ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.STATUS)

DEFAULT_INDIRECT_ENTRIES = 16


def _vring_u64(index: int, fd: int | None) -> bytes:
    return protocol.U64.pack(index | (VRING_NOFD_MASK if fd is None else 0))


class Frontend:
    """One vhost-user session with a back-end, driven from this process.

    ``with Frontend.connect(path) as fe: fe.negotiate(); ...``
    """

    def __init__(self, conn: FrontendConnection):
        self.conn = conn
        self.offered_features: int | None = None
        self.offered_protocol_features: int | None = None
        self.features = 0               # acked with SET_FEATURES
        self.protocol_features = 0      # acked with SET_PROTOCOL_FEATURES
        self.memory: GuestMemory | None = None
        self.queues: dict[int, Virtqueue] = {}
        self._owned_memory: list[GuestMemory] = []

    @classmethod
    def connect(cls, path, *, timeout: float = DEFAULT_TIMEOUT, wait: float = 0.0) -> "Frontend":
        """Connects to a back-end's socket; ``wait`` retries while it starts up."""
        return cls(FrontendConnection.connect(path, timeout=timeout, wait=wait))

    def close(self) -> None:
        """Closes the socket, the queues' eventfds and memory made by ``setup``."""
        self.conn.close()
        for q in self.queues.values():
            q.close()
        self.queues.clear()
        for mem in self._owned_memory:
            mem.close()
        self._owned_memory.clear()

    def __enter__(self) -> "Frontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def peer_pid(self) -> int:
        """The back-end's process id (from the socket's peer credentials)."""
        return self.conn.peer_pid

    def own(self, mem: GuestMemory) -> GuestMemory:
        """Makes ``close`` also close ``mem``; returns it."""
        self._owned_memory.append(mem)
        return mem

    def has(self, feature: int) -> bool:
        return bool(self.features & bit(feature))

    def has_protocol(self, feature: int) -> bool:
        return bool(self.protocol_features & bit(feature))

    # -- raw -----------------------------------------------------------------------
    def send_raw(self, request: int, flags: int = VERSION, payload: bytes = b"", fds=(),
                 *, size: int | None = None) -> None:
        """Sends exactly this message; ``size`` may lie about the payload length."""
        self.conn.send(request, payload, fds, flags=flags, size=size)

    def recv_raw(self, timeout: float | None = None) -> Message:
        """Reads whatever message comes next."""
        return self.conn.recv(timeout)

    def request(self, request: int, payload: bytes = b"", fds=(), *,
                ack: bool | None = None, timeout: float | None = None) -> Message | None:
        """Sends a well-formed request and reads what the protocol promises back.

        Requests with a reply return it. For the others ``ack`` sets
        NEED_REPLY (default: whenever REPLY_ACK was negotiated, so failures
        surface at the request that caused them) and checks the status.
        """
        spec = protocol.REQUEST_SPECS.get(request)
        has_reply = bool(spec and spec.reply)
        if request == Request.SET_LOG_BASE:
            has_reply = self.has_protocol(ProtocolFeature.LOG_SHMFD)
        if ack is None:
            ack = self.has_protocol(ProtocolFeature.REPLY_ACK)
        return self.conn.call(request, payload, fds, reply=has_reply, ack=ack, timeout=timeout)

    def _reply_u64(self, request: Request) -> int:
        return reply_u64(self.request(request))

    # -- features ------------------------------------------------------------------
    def get_features(self) -> int:
        self.offered_features = self._reply_u64(Request.GET_FEATURES)
        return self.offered_features

    def set_features(self, features: int) -> None:
        """Acks exactly ``features`` (no checks: fuzzers may ack anything)."""
        self.request(Request.SET_FEATURES, protocol.U64.pack(features))
        self.features = features

    def get_protocol_features(self) -> int:
        self.offered_protocol_features = self._reply_u64(Request.GET_PROTOCOL_FEATURES)
        return self.offered_protocol_features

    def set_protocol_features(self, features: int) -> None:
        # Sent before REPLY_ACK is in force, so never with NEED_REPLY.
        self.request(Request.SET_PROTOCOL_FEATURES, protocol.U64.pack(features), ack=False)
        self.protocol_features = features

    def set_owner(self) -> None:
        self.request(Request.SET_OWNER)

    def negotiate(self, features: int = DEFAULT_FEATURES,
                  protocol_features: int = DEFAULT_PROTOCOL_FEATURES, *,
                  required: int = bit(Feature.VERSION_1),
                  required_protocol: int = 0) -> tuple[int, int]:
        """SET_OWNER, then acks the offered subset of what is asked for.

        ``features`` are virtio bits (device and ring) the caller can drive;
        VHOST_USER_F_PROTOCOL_FEATURES is handled here. Raises FeatureError
        if a ``required`` bit is not offered. Returns (features, protocol
        features) as acked.
        """
        self.set_owner()
        offered = self.get_features()
        missing = required & ~offered
        if missing:
            raise FeatureError(f"back-end does not offer required features {missing:#x} "
                               f"(offers {offered:#x})")
        acked = features & offered & ~bit(Feature.PROTOCOL_FEATURES)
        acked_protocol = 0
        if offered & bit(Feature.PROTOCOL_FEATURES):
            acked |= bit(Feature.PROTOCOL_FEATURES)
            offered_protocol = self.get_protocol_features()
            missing = required_protocol & ~offered_protocol
            if missing:
                raise FeatureError(f"back-end does not offer required protocol features "
                                   f"{missing:#x} (offers {offered_protocol:#x})")
            acked_protocol = protocol_features & offered_protocol
            self.set_protocol_features(acked_protocol)
        elif required_protocol:
            raise FeatureError("back-end offers no protocol features at all")
        self.set_features(acked)
        return acked, acked_protocol

    # -- memory ----------------------------------------------------------------------
    def set_mem_table(self, mem: GuestMemory) -> None:
        """Shares every region of ``mem`` (one fd each)."""
        self.request(Request.SET_MEM_TABLE, protocol.pack_memory_table(mem.table()), mem.fds)
        self.memory = mem

    def get_max_mem_slots(self) -> int:
        return self._reply_u64(Request.GET_MAX_MEM_SLOTS)

    def add_mem_region(self, mem: GuestMemory, index: int) -> None:
        """ADD_MEM_REG for ``mem.regions[index]`` (needs CONFIGURE_MEM_SLOTS)."""
        r = mem.regions[index]
        self.request(Request.ADD_MEM_REG, protocol.pack_single_region(r.to_wire()), [r.fd])

    def remove_mem_region(self, mem: GuestMemory, index: int) -> None:
        r = mem.regions[index]
        self.request(Request.REM_MEM_REG, protocol.pack_single_region(r.to_wire()))

    # -- rings -----------------------------------------------------------------------
    def set_vring_num(self, index: int, num: int) -> None:
        self.request(Request.SET_VRING_NUM, protocol.VRING_STATE.pack(index, num))

    def set_vring_base(self, index: int, num: int) -> None:
        self.request(Request.SET_VRING_BASE, protocol.VRING_STATE.pack(index, num))

    def get_vring_base(self, index: int) -> int:
        """Stops ring ``index``; returns where the back-end will resume (split:
        next avail idx; packed: protocol.pack_packed_vring_base encoding)."""
        msg = self.request(Request.GET_VRING_BASE, protocol.VRING_STATE.pack(index, 0))
        if len(msg.payload) != protocol.VRING_STATE.size:
            raise ReplyError(Request.GET_VRING_BASE, f"{len(msg.payload)}-byte payload")
        got_index, num = protocol.VRING_STATE.unpack(msg.payload)
        if got_index != index:
            raise ReplyError(Request.GET_VRING_BASE, f"answers for ring {got_index}, not {index}")
        return num

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, *,
                       flags: int = 0, log: int = 0) -> None:
        """Ring addresses are front-end user addresses (GuestMemory.uva)."""
        self.request(Request.SET_VRING_ADDR,
                     protocol.VRING_ADDR.pack(index, flags, desc, used, avail, log))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """fd None sends the NOFD flag (the back-end must poll)."""
        self.request(Request.SET_VRING_KICK, _vring_u64(index, fd), [] if fd is None else [fd])

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self.request(Request.SET_VRING_CALL, _vring_u64(index, fd), [] if fd is None else [fd])

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self.request(Request.SET_VRING_ERR, _vring_u64(index, fd), [] if fd is None else [fd])

    def set_vring_enable(self, index: int, enable: bool = True) -> None:
        self.request(Request.SET_VRING_ENABLE, protocol.VRING_STATE.pack(index, int(enable)))

    def setup_queue(self, index: int, size: int = 128, *, packed: bool | None = None,
                    mem: GuestMemory | None = None, err: bool = False,
                    enable: bool = True, base: int | None = None,
                    indirect_entries: int | None = None) -> Virtqueue:
        """Builds a ring in guest memory and hands it to the back-end.

        Sends SET_VRING_NUM, BASE, ADDR, KICK, CALL (ERR if ``err``) and,
        when protocol features were negotiated, SET_VRING_ENABLE. ``packed``
        defaults to whether RING_PACKED was negotiated; EVENT_IDX follows
        the negotiated features. ``mem`` defaults to the memory table's.
        ``base`` resumes at a SET_VRING_BASE value instead of a fresh ring.
        ``indirect_entries`` sizes the per-chain indirect tables reserved
        with the ring (default: 16 if INDIRECT_DESC was negotiated, else 0).
        """
        mem = mem or self.memory
        if mem is None:
            raise FrontendError("setup_queue before set_mem_table")
        if packed is None:
            packed = self.has(Feature.RING_PACKED)
        elif packed and not self.has(Feature.RING_PACKED):
            raise FeatureError("packed ring requested but RING_PACKED was not negotiated")
        if indirect_entries is None:
            indirect = self.has(Feature.RING_INDIRECT_DESC)
            indirect_entries = DEFAULT_INDIRECT_ENTRIES if indirect else 0
        ring = (PackedRing if packed else SplitRing)(
            mem, size, event_idx=self.has(Feature.RING_EVENT_IDX), base=base,
            indirect_entries=indirect_entries)
        q = Virtqueue(index, ring, err=err)
        try:
            self._hand_over(q, mem, ring.base, enable=enable)
        except BaseException:
            q.close()
            raise
        old = self.queues.pop(index, None)
        if old:
            old.close()
        self.queues[index] = q
        return q

    def resume_queue(self, q: Virtqueue, base: int, *, mem: GuestMemory | None = None) -> None:
        """Hands a ring stopped with GET_VRING_BASE back to the back-end at
        ``base``, with the same ring memory and eventfds (as QEMU restarts a
        ring after a stop); ``mem`` defaults to the memory table's."""
        self._hand_over(q, mem or self.memory, base)

    def _hand_over(self, q: Virtqueue, mem: GuestMemory, base: int, *,
                   enable: bool = True) -> None:
        """SET_VRING_NUM, BASE, ADDR, KICK, CALL (ERR if the queue has an
        error eventfd) and, with protocol features, SET_VRING_ENABLE."""
        ring, index = q.ring, q.index
        self.set_vring_num(index, ring.size)
        self.set_vring_base(index, base)
        self.set_vring_addr(index, desc=mem.uva(ring.desc_gpa), used=mem.uva(ring.device_gpa),
                            avail=mem.uva(ring.driver_gpa))
        self.set_vring_kick(index, q.kick_fd)
        self.set_vring_call(index, q.call_fd)
        if q.err_fd is not None:
            self.set_vring_err(index, q.err_fd)
        if enable and self.features & bit(Feature.PROTOCOL_FEATURES):
            self.set_vring_enable(index, True)

    def stop_queue(self, index: int) -> int:
        """GET_VRING_BASE, then forgets the queue; returns the base."""
        base = self.get_vring_base(index)
        q = self.queues.pop(index, None)
        if q:
            q.close()
        return base

    def get_queue_num(self) -> int:
        """How many queues the back-end supports (needs protocol feature MQ)."""
        return self._reply_u64(Request.GET_QUEUE_NUM)

    # -- config, status, reset ----------------------------------------------------------
    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """Reads ``size`` bytes of device config space at ``offset``."""
        payload = protocol.CONFIG_HEADER.pack(offset, size, flags) + bytes(size)
        msg = self.request(Request.GET_CONFIG, payload, ack=False)
        if len(msg.payload) != len(payload):
            # An empty reply is how a back-end reports failure.
            raise ReplyError(Request.GET_CONFIG, f"{len(msg.payload)}-byte reply to a "
                             f"{len(payload)}-byte request (offset {offset}, size {size})")
        return msg.payload[protocol.CONFIG_HEADER.size:]

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.request(Request.SET_CONFIG, protocol.CONFIG_HEADER.pack(offset, len(data), flags)
                     + bytes(data))

    def set_status(self, status: int) -> None:
        """SET_STATUS (protocol feature STATUS)."""
        self.request(Request.SET_STATUS, protocol.U64.pack(status))

    def get_status(self) -> DeviceStatus:
        return DeviceStatus(self._reply_u64(Request.GET_STATUS) & 0xFF)

    def add_status(self, status: int) -> bool:
        """Sets ``status`` bits on top of what GET_STATUS reports, as QEMU's
        vhost-user front-end does; nothing when protocol feature STATUS was
        not negotiated. Returns whether SET_STATUS was sent."""
        if not self.has_protocol(ProtocolFeature.STATUS):
            return False
        current = self.get_status()
        if current & status == status:
            return False
        self.set_status(int(current) | status)
        return True

    def features_ok(self) -> bool:
        """FEATURES_OK after SET_FEATURES (QEMU sends it right after)."""
        return self.add_status(DeviceStatus.FEATURES_OK)

    def driver_ok(self) -> bool:
        """ACKNOWLEDGE|DRIVER|DRIVER_OK once the rings are set up: the moment
        QEMU starts the device. Back-ends that negotiated STATUS (DPDK's
        vhost) serve nothing before it."""
        return self.add_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
                               | DeviceStatus.DRIVER_OK)

    def reset(self) -> None:
        """RESET_DEVICE when negotiated, else the older RESET_OWNER; drops queues."""
        if self.has_protocol(ProtocolFeature.RESET_DEVICE):
            self.request(Request.RESET_DEVICE)
        else:
            self.request(Request.RESET_OWNER)
        for q in self.queues.values():
            q.close()
        self.queues.clear()

    # -- all of the above -------------------------------------------------------------
    @classmethod
    def setup(cls, path, *, features: int = DEFAULT_FEATURES,
              protocol_features: int = DEFAULT_PROTOCOL_FEATURES, queues: int = 1,
              queue_size: int = 128, packed: bool | None = None,
              memory: GuestMemory | None = None, timeout: float = DEFAULT_TIMEOUT,
              wait: float = 0.0) -> "Frontend":
        """connect + negotiate + set_mem_table + setup_queue for queues 0..n-1.

        Without ``memory`` a 4 MiB single region is made (and closed with us).
        ``wait`` retries connecting for that many seconds, as in :meth:`connect`.
        """
        fe = cls.connect(path, timeout=timeout, wait=wait)
        try:
            if packed:
                features |= bit(Feature.RING_PACKED)
            elif packed is False:
                features &= ~bit(Feature.RING_PACKED)
            fe.negotiate(features, protocol_features,
                         required=bit(Feature.VERSION_1)
                         | (bit(Feature.RING_PACKED) if packed else 0))
            fe.set_mem_table(memory or fe.own(GuestMemory([(0, 4 << 20)])))
            for i in range(queues):
                fe.setup_queue(i, queue_size)
        except BaseException:
            fe.close()
            raise
        return fe
