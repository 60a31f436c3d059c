"""A virtio-blk driver on top of Frontend: requests as descriptor chains.

Each request is ``virtio_blk_outhdr`` (device-readable), then its data
(readable for writes/discards, writable for reads/GET_ID), then one status
byte the device writes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol import Feature, bit, bits
from .connection import DEFAULT_TIMEOUT, FrontendError
from .device import DEFAULT_PROTOCOL_FEATURES, FeatureError, Frontend
from .memory import GuestMemory
from .virtqueue import Buffer, Virtqueue


from ..blk import spec as _spec  # constants only: no C data plane

BlkConfig = _spec.BlkConfig
BlkFeature = _spec.BlkFeature
BlkStatus = _spec.BlkStatus
BlkType = _spec.BlkType
SECTOR = _spec.SECTOR
ID_BYTES = _spec.ID_BYTES
OUTHDR = _spec.OUTHDR
DISCARD_SEGMENT = _spec.DISCARD_SEGMENT
WRITE_ZEROES_FLAG_UNMAP = _spec.WRITE_ZEROES_FLAG_UNMAP
# The config space up to the secure-erase fields (virtio 1.1's layout, what
# back-ends built on older headers, QEMU 7.2's among them, can return).
CONFIG_SIZE_BASIC = _spec.CONFIG.size - 3 * 4

# Device features this driver knows how to use.
BLK_FEATURES = bits(BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE,
                    BlkFeature.FLUSH, BlkFeature.TOPOLOGY, BlkFeature.CONFIG_WCE,
                    BlkFeature.MQ, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES, BlkFeature.RO)


class BlkError(FrontendError):
    """A request completed with a status other than OK."""

    def __init__(self, request: "BlkRequest"):
        self.request = request
        self.status = request.status
        super().__init__(f"{_enum_name(BlkType, request.type)} at sector {request.sector}: "
                         f"{_enum_name(BlkStatus, request.status)}")


def _enum_name(enum_type, value) -> str:
    try:
        return enum_type(value).name
    except ValueError:
        return str(value)


@dataclass
class BlkRequest:
    """One virtio-blk request; ``status``, ``data`` and ``written`` are filled
    in when it completes.

    ``data_gpa`` places the data buffer (default: allocated per batch);
    ``segment`` splits it into descriptors of at most that many bytes.
    """
    type: int
    sector: int = 0
    out: bytes = b""            # device-readable payload (write data, segments)
    in_len: int = 0             # device-writable payload size (read, GET_ID)
    data_gpa: int | None = None
    segment: int | None = None
    status: int | None = None
    data: bytes | None = None   # what the device wrote into the in buffer
    written: int | None = None  # the used length the device reported
    gpas: dict = field(default_factory=dict, repr=False)   # where "data", "status" went

    @classmethod
    def read(cls, sector: int, nbytes: int, **kw) -> "BlkRequest":
        return cls(BlkType.IN, sector, in_len=nbytes, **kw)

    @classmethod
    def write(cls, sector: int, data: bytes, **kw) -> "BlkRequest":
        return cls(BlkType.OUT, sector, out=bytes(data), **kw)

    @classmethod
    def flush(cls) -> "BlkRequest":
        return cls(BlkType.FLUSH)

    @classmethod
    def get_id(cls) -> "BlkRequest":
        return cls(BlkType.GET_ID, in_len=ID_BYTES)

    @classmethod
    def discard(cls, segments) -> "BlkRequest":
        """``segments``: (sector, num_sectors) pairs."""
        return cls(BlkType.DISCARD, out=pack_segments(segments, 0))

    @classmethod
    def write_zeroes(cls, segments, *, unmap: bool = False) -> "BlkRequest":
        return cls(BlkType.WRITE_ZEROES,
                   out=pack_segments(segments, WRITE_ZEROES_FLAG_UNMAP if unmap else 0))

    @property
    def ok(self) -> bool:
        return self.status == BlkStatus.OK


def pack_segments(segments, flags: int) -> bytes:
    return b"".join(DISCARD_SEGMENT.pack(sector, count, flags) for sector, count in segments)


def _split(gpa: int, length: int, segment: int | None, writable: bool) -> list[Buffer]:
    if not segment:
        return [Buffer(gpa, length, writable)]
    return [Buffer(gpa + off, min(segment, length - off), writable)
            for off in range(0, length, segment)]


class BlkClient:
    """virtio-blk requests over one or more queues of a Frontend.

    ``BlkClient.setup(fe)`` does the whole bring-up; ``execute`` runs many
    requests with a queue depth; ``read``/``write``/... are the one-request
    conveniences and raise BlkError unless the status is OK.

    Like a guest's driver, it addresses the disk in 512-byte sectors (the
    ``sector`` parameters, ``capacity``, discard segments); lengths and
    data are in bytes. A back-end sees byte offsets: ``sector * 512``.
    """

    def __init__(self, fe: Frontend, queues: list[Virtqueue], *, mem: GuestMemory,
                 indirect: bool = False, timeout: float = DEFAULT_TIMEOUT):
        self.fe = fe
        self.queues = queues
        self.mem = mem
        self.indirect = indirect
        self.timeout = timeout
        self.config = self.read_config()

    @classmethod
    def setup(cls, fe: Frontend, *, queues: int = 1, packed: bool = False,
              queue_size: int = 128, indirect: bool | None = None,
              event_idx: bool | None = None, memory: GuestMemory | None = None,
              features: int | None = None,
              protocol_features: int = DEFAULT_PROTOCOL_FEATURES) -> "BlkClient":
        """Negotiates, shares memory, and sets up ``queues`` queues.

        ``packed``, ``indirect`` and ``event_idx``: True requires the ring
        feature, False leaves it out, None (indirect, event_idx) takes it if
        offered; indirect tables are used for every request when negotiated.
        ``features`` adds virtio bits to ask for (default: every blk feature
        this driver knows). Without ``memory`` an 8 MiB region is made.
        """
        wanted = bit(Feature.VERSION_1) | (BLK_FEATURES if features is None else features)
        required = bit(Feature.VERSION_1)
        for feature, choice in ((Feature.RING_PACKED, packed),
                                (Feature.RING_INDIRECT_DESC, indirect),
                                (Feature.RING_EVENT_IDX, event_idx)):
            if choice is not False:
                wanted |= bit(feature)
            if choice:
                required |= bit(feature)
        fe.negotiate(wanted, protocol_features, required=required)
        mem = memory or fe.own(GuestMemory([(0, 8 << 20)], name="blk"))
        fe.set_mem_table(mem)
        vqs = [fe.setup_queue(i, queue_size, packed=packed, mem=mem) for i in range(queues)]
        return cls(fe, vqs, mem=mem, indirect=fe.has(Feature.RING_INDIRECT_DESC))

    def read_config(self) -> BlkConfig:
        """GET_CONFIG of the blk config space (secure-erase fields only when
        that feature was negotiated)."""
        size = (_spec.CONFIG.size if self.fe.has(BlkFeature.SECURE_ERASE)
                else CONFIG_SIZE_BASIC)
        self.config = BlkConfig.unpack(self.fe.get_config(0, size))
        return self.config

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors, as the config space says."""
        return self.config.capacity

    def set_writeback(self, writeback: bool) -> None:
        """Switches the device's write cache as a driver does through
        CONFIG_WCE: False is write-through (every write stable when it
        completes), True write-back (stable after a FLUSH). Returns once the
        device applied it (SET_CONFIG is acknowledged with REPLY_ACK)."""
        if not self.fe.has(BlkFeature.CONFIG_WCE):
            raise FeatureError("the write cache mode needs VIRTIO_BLK_F_CONFIG_WCE")
        self.fe.set_config(_spec.CONFIG_WRITEBACK_OFFSET, bytes([int(bool(writeback))]))
        self.read_config()

    # -- requests -------------------------------------------------------------------
    def build_chain(self, req: BlkRequest) -> list[Buffer]:
        """Writes the request's header (and out data) into guest memory and
        returns its chain; buffers come from the allocator."""
        header = self.mem.alloc(OUTHDR.size, 16)
        self.mem.write(header, OUTHDR.pack(req.type, 0, req.sector))
        chain = [Buffer(header, OUTHDR.size, False)]
        length = len(req.out) or req.in_len
        if length:
            data = req.data_gpa if req.data_gpa is not None else self.mem.alloc(length, 512)
            # Zero what the device should fill, so stale bytes never pass for data.
            self.mem.write(data, req.out or bytes(length))
            chain += _split(data, length, req.segment, writable=not req.out)
            req.gpas["data"] = data
        status = self.mem.alloc(1, 1)
        self.mem.write(status, b"\xff")      # a value no device writes
        chain.append(Buffer(status, 1, True))
        req.gpas["status"] = status
        return chain

    def _finish(self, req: BlkRequest, written: int) -> BlkRequest:
        req.written = written
        req.status = self.mem.read(req.gpas["status"], 1)[0]
        if req.in_len:
            req.data = self.mem.read(req.gpas["data"], req.in_len)
        return req

    def submit(self, requests, *, queue: int = 0) -> None:
        """Puts requests on a queue and notifies once, without waiting.

        Their buffers stay allocated: wrap submit..reap in
        ``GuestMemory.scratch()`` to reuse the memory afterwards.
        """
        vq = self.queues[queue]
        for req in requests:
            vq.add(self.build_chain(req), req, indirect=self.indirect)
        vq.notify()

    def reap(self, count: int = 1, *, queue: int = 0,
             timeout: float | None = None) -> list[BlkRequest]:
        """Waits for at least ``count`` completions on a queue; returns the
        requests that completed, status and data filled in."""
        used = self.queues[queue].wait(count, self.timeout if timeout is None else timeout)
        return [self._finish(u.token, u.length) for u in used]

    def execute(self, requests, *, queue: int = 0, depth: int | None = None,
                timeout: float | None = None) -> list[BlkRequest]:
        """Runs ``requests`` with up to ``depth`` in flight (default: as many as
        fit in the ring); returns them with status/data filled in, whatever
        the status. Buffers are freed afterwards unless something failed."""
        vq = self.queues[queue]
        requests = list(requests)
        depth = depth or vq.ring.size
        with self.mem.scratch():
            pending = iter(requests)
            nxt, chain, in_flight = next(pending, None), None, 0
            while nxt is not None or in_flight:
                # Fill up to the depth, then publish the whole batch at once.
                while nxt is not None and in_flight < depth:
                    chain = chain or self.build_chain(nxt)
                    need = 1 if self.indirect else len(chain)
                    if in_flight and vq.ring.num_free < need:
                        break           # RingFull from add() if it can never fit
                    vq.add(chain, nxt, indirect=self.indirect)
                    in_flight += 1
                    nxt, chain = next(pending, None), None
                vq.notify()
                in_flight -= len(self.reap(queue=queue, timeout=timeout))
        return requests

    def _one(self, req: BlkRequest, queue: int) -> BlkRequest:
        self.execute([req], queue=queue)
        if not req.ok:
            raise BlkError(req)
        return req

    def read(self, sector: int, nbytes: int, *, queue: int = 0) -> bytes:
        """``nbytes`` bytes from 512-byte sector ``sector`` on."""
        return self._one(BlkRequest.read(sector, nbytes), queue).data

    def write(self, sector: int, data: bytes, *, queue: int = 0) -> None:
        """``data`` at 512-byte sector ``sector`` on."""
        self._one(BlkRequest.write(sector, data), queue)

    def flush(self, *, queue: int = 0) -> None:
        self._one(BlkRequest.flush(), queue)

    def get_id(self, *, queue: int = 0) -> bytes:
        """The device's serial: up to 20 bytes, cut at the first NUL."""
        return self._one(BlkRequest.get_id(), queue).data.split(b"\0", 1)[0]

    def discard(self, segments, *, queue: int = 0) -> None:
        self._one(BlkRequest.discard(segments), queue)

    def write_zeroes(self, segments, *, unmap: bool = False, queue: int = 0) -> None:
        self._one(BlkRequest.write_zeroes(segments, unmap=unmap), queue)
