"""vhost-user wire types: request ids, flags, feature bits, payload layouts.

No I/O here. Numbers follow docs/interop/vhost-user.rst as QEMU 7.2 ships it
and the kernel's linux/virtio_*.h; tests/unit/test_protocol.py checks them
against the installed kernel headers so they are never retyped wrongly.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<III")          # request, flags, size
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 4096                      # far above the largest legal payload
MAX_FDS = 8                             # VHOST_MEMORY_BASELINE_NREGIONS

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
#: what a front-end request may set; the REPLY bit marks answers only, and
#: every bit above NEED_REPLY is reserved
REQUEST_FLAGS = FLAG_VERSION_MASK | FLAG_NEED_REPLY

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
VHOST_VRING_F_LOG = 0

LOG_PAGE = 0x1000
MAX_MEM_SLOTS = 509


class Request(enum.IntEnum):
    """Front-end to back-end requests."""
    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    # Names from before QEMU renamed "slave" to "back-end" in the spec (8.0);
    # aliases, for code and scripts that still say them.
    SET_SLAVE_REQ_FD = 21


class BackendRequest(enum.IntEnum):
    """Back-end to front-end requests (on the SET_BACKEND_REQ_FD channel)."""
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    # pre-8.0 spec names (aliases)
    SLAVE_REQ = 5
    SLAVE_SEND_FD = 10


class Feature(enum.IntEnum):
    """Device-independent virtio feature bits (and vhost's own)."""
    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    PROTOCOL_FEATURES = 30      # VHOST_USER_F_PROTOCOL_FEATURES
    LOG_ALL = 26                # VHOST_F_LOG_ALL
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    RING_RESET = 40


class DeviceStatus(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


def bit(n: int) -> int:
    return 1 << n


def bits(*ns: int) -> int:
    mask = 0
    for n in ns:
        mask |= 1 << n
    return mask


# ---- payload layouts -------------------------------------------------------

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")               # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")            # index, flags, desc, used, avail, log
MEM_REGION = struct.Struct("<QQQQ")              # gpa, size, uva, mmap_offset
MEMORY_HEADER = struct.Struct("<II")             # nregions, padding
SINGLE_MEM_REGION = struct.Struct("<QQQQQ")      # padding, gpa, size, uva, mmap_offset
LOG = struct.Struct("<QQ")                       # size, offset
CONFIG_HEADER = struct.Struct("<III")            # offset, size, flags
VRING_AREA = struct.Struct("<QQQ")               # u64 (index|flags), size, offset
INFLIGHT = struct.Struct("<QQHH")                # mmap size, mmap offset, num queues, queue size
IOTLB = struct.Struct("<QQQBB")                  # iova, size, uaddr, perm, type (+padding)
CONFIG_MAX = 256                                  # VHOST_USER_MAX_CONFIG_SIZE
INFLIGHT_SIZE = 8 + 8 + 2 + 2 + 4                 # QEMU sends it padded to 24


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    uva: int
    mmap_offset: int


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


def pack_header(request: int, flags: int, size: int) -> bytes:
    return HEADER.pack(request, flags, size)


def pack_memory_table(regions: list[MemRegion]) -> bytes:
    body = MEMORY_HEADER.pack(len(regions), 0)
    for r in regions:
        body += MEM_REGION.pack(r.gpa, r.size, r.uva, r.mmap_offset)
    return body


def unpack_memory_table(payload: bytes) -> list[MemRegion]:
    """Parses SET_MEM_TABLE; raises ValueError when the count disagrees with the size."""
    nregions, _ = MEMORY_HEADER.unpack_from(payload)
    if nregions > MAX_FDS:
        raise ValueError(f"{nregions} regions, at most {MAX_FDS}")
    need = MEMORY_HEADER.size + nregions * MEM_REGION.size
    if len(payload) < need:
        raise ValueError(f"memory table of {nregions} regions needs {need} bytes, got {len(payload)}")
    return [MemRegion(*MEM_REGION.unpack_from(payload, MEMORY_HEADER.size + i * MEM_REGION.size))
            for i in range(nregions)]


def pack_single_region(r: MemRegion) -> bytes:
    return SINGLE_MEM_REGION.pack(0, r.gpa, r.size, r.uva, r.mmap_offset)


def unpack_single_region(payload: bytes) -> MemRegion:
    _, gpa, size, uva, off = SINGLE_MEM_REGION.unpack_from(payload)
    return MemRegion(gpa, size, uva, off)


# ---- the request table ------------------------------------------------------
# What each request may carry, checked before any handler runs. payload:
# exact size, or (min, max). fds: (min, max). reply: the back-end always
# answers (REPLY_ACK then adds nothing). protocol_feature: legal only once
# the front-end acked that feature with SET_PROTOCOL_FEATURES. vhost-user.rst
# ties each of these requests to its feature (a few rows say "offered", but
# a feature the front-end did not ack is not in use); QEMU 7.2, rust-vmm and
# DPDK send none of them without acking it.

@dataclass(frozen=True)
class RequestSpec:
    payload: tuple[int, int]
    fds: tuple[int, int] = (0, 0)
    reply: bool = False
    needs_memory: bool = False      # illegal before a memory table
    vring: bool = False             # payload starts with a ring index
    protocol_feature: ProtocolFeature | None = None
    # Legal only once VHOST_USER_F_PROTOCOL_FEATURES is negotiated: acked
    # with SET_FEATURES, or protocol features set (QEMU's virtio-net enables
    # rings when the guest picks its queue count, before SET_FEATURES).
    needs_protocol_features: bool = False


def _exact(n: int) -> tuple[int, int]:
    return (n, n)


R = Request
P = ProtocolFeature
_CONFIG_PAYLOAD = (CONFIG_HEADER.size, CONFIG_HEADER.size + CONFIG_MAX)
_INFLIGHT_PAYLOAD = (INFLIGHT.size, INFLIGHT_SIZE)
# GET_/SET_PROTOCOL_FEATURES need only VHOST_USER_F_PROTOCOL_FEATURES in
# GET_FEATURES, which every device offers, and may come before SET_FEATURES.
# RESET_OWNER needs nothing: it is what QEMU 7.2 sends without RESET_DEVICE.
REQUEST_SPECS: dict[Request, RequestSpec] = {
    R.GET_FEATURES: RequestSpec(_exact(0), reply=True),
    R.SET_FEATURES: RequestSpec(_exact(8)),
    R.SET_OWNER: RequestSpec(_exact(0)),
    R.RESET_OWNER: RequestSpec((0, 8)),
    R.SET_MEM_TABLE: RequestSpec((MEMORY_HEADER.size, MEMORY_HEADER.size + MAX_FDS * MEM_REGION.size),
                                 fds=(0, MAX_FDS)),
    R.SET_LOG_BASE: RequestSpec(_exact(LOG.size), fds=(1, 1), reply=True,
                                protocol_feature=P.LOG_SHMFD),
    # The spec names no feature; the log it reports on exists only with
    # LOG_SHMFD (and QEMU never sends it). Its payload is N/A in the spec
    # (rust-vmm's front-end sends none); a u64 is taken too.
    R.SET_LOG_FD: RequestSpec((0, 8), fds=(1, 1), protocol_feature=P.LOG_SHMFD),
    R.SET_VRING_NUM: RequestSpec(_exact(8), vring=True),
    R.SET_VRING_ADDR: RequestSpec(_exact(VRING_ADDR.size), vring=True, needs_memory=True),
    R.SET_VRING_BASE: RequestSpec(_exact(8), vring=True),
    R.GET_VRING_BASE: RequestSpec(_exact(8), reply=True, vring=True),
    R.SET_VRING_KICK: RequestSpec(_exact(8), fds=(0, 1), vring=True),
    R.SET_VRING_CALL: RequestSpec(_exact(8), fds=(0, 1), vring=True),
    R.SET_VRING_ERR: RequestSpec(_exact(8), fds=(0, 1), vring=True),
    R.GET_PROTOCOL_FEATURES: RequestSpec(_exact(0), reply=True),
    R.SET_PROTOCOL_FEATURES: RequestSpec(_exact(8)),
    # The spec asks only for MQ among the *queried* protocol features, and
    # every device offers MQ: a front-end may ask without acking it.
    R.GET_QUEUE_NUM: RequestSpec(_exact(0), reply=True),
    R.SET_VRING_ENABLE: RequestSpec(_exact(8), vring=True, needs_protocol_features=True),
    R.SEND_RARP: RequestSpec(_exact(8), protocol_feature=P.RARP),
    R.NET_SET_MTU: RequestSpec(_exact(8), protocol_feature=P.MTU),
    R.SET_BACKEND_REQ_FD: RequestSpec(_exact(0), fds=(1, 1), protocol_feature=P.BACKEND_REQ),
    R.SET_VRING_ENDIAN: RequestSpec(_exact(8), vring=True, protocol_feature=P.CROSS_ENDIAN),
    R.GET_CONFIG: RequestSpec(_CONFIG_PAYLOAD, reply=True, protocol_feature=P.CONFIG),
    R.SET_CONFIG: RequestSpec(_CONFIG_PAYLOAD, protocol_feature=P.CONFIG),
    R.GET_INFLIGHT_FD: RequestSpec(_INFLIGHT_PAYLOAD, reply=True,
                                   protocol_feature=P.INFLIGHT_SHMFD),
    R.SET_INFLIGHT_FD: RequestSpec(_INFLIGHT_PAYLOAD, fds=(1, 1),
                                   protocol_feature=P.INFLIGHT_SHMFD),
    R.RESET_DEVICE: RequestSpec(_exact(0), protocol_feature=P.RESET_DEVICE),
    R.VRING_KICK: RequestSpec(_exact(8), vring=True, protocol_feature=P.INBAND_NOTIFICATIONS),
    R.GET_MAX_MEM_SLOTS: RequestSpec(_exact(0), reply=True,
                                     protocol_feature=P.CONFIGURE_MEM_SLOTS),
    R.ADD_MEM_REG: RequestSpec(_exact(SINGLE_MEM_REGION.size), fds=(1, 1),
                               protocol_feature=P.CONFIGURE_MEM_SLOTS),
    R.REM_MEM_REG: RequestSpec(_exact(SINGLE_MEM_REGION.size), fds=(0, 1),
                               protocol_feature=P.CONFIGURE_MEM_SLOTS),
    R.SET_STATUS: RequestSpec(_exact(8), protocol_feature=P.STATUS),
    R.GET_STATUS: RequestSpec(_exact(0), reply=True, protocol_feature=P.STATUS),
}


#: Requests whose own reply is a u64 status (0 success, anything else
#: failure): a refusal fits in it. Other replying requests (GET_*) have no
#: room for a failure in their reply, so they are refused by closing.
STATUS_REPLIES = frozenset({Request.SET_LOG_BASE})


# ---- virtqueue memory layouts (virtio 1.4, 2.7 split and 2.8 packed) --------
# The data plane reads these in C; vhostuser.frontend writes them as a driver.

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
PACKED_DESC_F_AVAIL = 1 << 7
PACKED_DESC_F_USED = 1 << 15
AVAIL_F_NO_INTERRUPT = 1                  # split: driver asks for no used notifications
USED_F_NO_NOTIFY = 1                      # split: device asks for no kicks
RING_EVENT_FLAGS_ENABLE = 0               # packed event suppression flags
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2                 # only with RING_EVENT_IDX
PACKED_EVENT_WRAP = 1 << 15               # wrap counter bit in an off_wrap field

SPLIT_DESC = struct.Struct("<QIHH")       # addr, len, flags, next
PACKED_DESC = struct.Struct("<QIHH")      # addr, len, id, flags
USED_ELEM = struct.Struct("<II")          # id, len
RING_U16 = struct.Struct("<H")            # avail/used flags, idx, ring entries, events
EVENT_SUPPRESS = struct.Struct("<HH")     # packed: off_wrap, flags
SPLIT_DESC_ALIGN, SPLIT_AVAIL_ALIGN, SPLIT_USED_ALIGN = 16, 2, 4
PACKED_DESC_ALIGN, PACKED_EVENT_ALIGN = 16, 4


def split_avail_size(num: int) -> int:
    """flags, idx, ring[num], used_event."""
    return 2 + 2 + 2 * num + 2


def split_used_size(num: int) -> int:
    """flags, idx, ring[num] of (id, len), avail_event."""
    return 2 + 2 + USED_ELEM.size * num + 2


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did [old, new) move past event? (u16 arithmetic)"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def pack_packed_vring_base(index: int, wrap: bool) -> int:
    """SET/GET_VRING_BASE num for a packed ring, QEMU's encoding: index | wrap << 15."""
    return (index & 0x7FFF) | (int(wrap) << 15)


def unpack_packed_vring_base(num: int) -> tuple[int, bool]:
    return num & 0x7FFF, bool(num & (1 << 15))
