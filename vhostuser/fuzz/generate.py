"""Case generators: messages, memory tables, raw rings, blk requests, net frames.

Each takes a :class:`~.source.Source` and returns plain data (actions, or a
whole :class:`~.case.Case`), valid or not on purpose: most choices are
close to well-formed, since inputs that die at the first check exercise
nothing behind it.
"""
from __future__ import annotations

import struct

from ..protocol import REQUEST_SPECS
from ..protocol import (CONFIG_HEADER, INFLIGHT, INFLIGHT_SIZE, LOG, MEM_REGION, MEMORY_HEADER,
                        SINGLE_MEM_REGION, U64, VRING_NOFD_MASK, VRING_STATE, Request)
from . import layout
from .case import STAGES, Case, Setup
from .source import Source

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
P_AVAIL, P_USED = 1 << 7, 1 << 15
FLAG_VERSION, FLAG_REPLY, FLAG_NEED_REPLY = 1, 1 << 2, 1 << 3
BLK_OUTHDR = struct.Struct("<IIQ")        # type, ioprio, sector
BLK_SEGMENT = struct.Struct("<QII")       # sector, num_sectors, flags
NET_HDR = struct.Struct("<BBHHHHH")       # flags, gso_type, hdr_len, gso_size, csum_start/offset, num_buffers
BLK_TYPES = (0, 1, 4, 8, 10, 11, 13, 14)  # IN OUT FLUSH GET_ID GET_LIFETIME DISCARD WRITE_ZEROES SECURE_ERASE
QUEUE_SIZES = (4, 8, 16, 64, 256)   # the probes need room for a 3-descriptor chain

U64_REQUESTS = (Request.GET_FEATURES, Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES,
                Request.SET_STATUS, Request.NET_SET_MTU, Request.GET_PROTOCOL_FEATURES,
                Request.GET_QUEUE_NUM, Request.GET_STATUS, Request.GET_MAX_MEM_SLOTS)
RING_FD_REQUESTS = (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR)
STATE_REQUESTS = (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
                  Request.SET_VRING_ENABLE, Request.VRING_KICK)
INTERESTING_NUMS = (0, 1, 2, 3, 15, 16, 255, 256, 257, 0x7fff, 0x8000, 0x8001, 0xb500, 0xffff,
                    0x10000, (1 << 31), (1 << 32) - 1)
INTERESTING_U64 = (0, 1, (1 << 32), (1 << 63), (1 << 64) - 1, 0xffffffff)
# Header flag bits the spec reserves (all but version 0-1, REPLY 2, NEED_REPLY 3).
RESERVED_FLAGS = (1 << 4, 1 << 5, 1 << 7, 1 << 16, 1 << 31, 0xfffffff0)

# Requests that belong to a protocol feature (the request table's column):
# a back-end must refuse them unless the feature was negotiated. Requests
# whose rule is not one feature (SET_VRING_ENABLE) are left out.
NEEDS_PROTOCOL_FEATURE = {
    request: spec.protocol_feature.name
    for request, spec in REQUEST_SPECS.items() if spec.protocol_feature is not None
}


def _u64(src: Source) -> int:
    return src.choice(INTERESTING_U64) if src.boolean(0.5) else src.integer(0, (1 << 64) - 1)


def _num(src: Source) -> int:
    return src.choice(INTERESTING_NUMS) if src.boolean(0.7) else src.integer(0, (1 << 32) - 1)


def _address(src: Source) -> int:
    if src.boolean(0.6):
        return layout.DATA + 16 * src.integer(0, layout.DATA_SIZE // 16 - 1)
    return src.choice(layout.interesting_addresses())


def _length(src: Source, typical: int = 512) -> int:
    if src.boolean(0.5):
        return typical
    return src.choice(layout.INTERESTING_LENGTHS) if src.boolean(0.7) else src.integer(0, 1 << 20)


# -- messages -------------------------------------------------------------------

def memory_table(src: Source, max_regions: int = 9) -> tuple[bytes, list[str]]:
    """A SET_MEM_TABLE payload and the fds to send with it: overlapping,
    tiny, unaligned, huge regions, holes, and fd counts that do not match."""
    regions, fds = [], []
    for _ in range(src.integer(0, max_regions)):
        size = src.choice((0, 1, 4095, 4096, 8192, 1 << 20, 1 << 40, (1 << 64) - 1,
                           src.integer(1, 1 << 16)))
        gpa = src.choice((0, 0x1000, 0x800, 1 << 20, (1 << 64) - 4096, src.integer(0, 1 << 24)))
        uva = src.choice((0x7f0000000000, (0x7f0000000000 + gpa) & ((1 << 64) - 1), (1 << 64) - 4096,
                          src.integer(0, 1 << 48)))
        offset = src.choice((0, 0, 512, 4096, 1 << 30, src.integer(0, 1 << 20)))
        regions.append(MEM_REGION.pack(gpa, size, uva, offset))
        fd_size = max(4096, min(size + offset, 1 << 21)) if src.boolean(0.7) else 4096
        fds.append(f"memfd:{fd_size}")
    count = len(regions) if src.boolean(0.8) else src.integer(0, (1 << 32) - 1)
    if src.boolean(0.2):
        fds = fds[:src.integer(0, len(fds))] + ["eventfd"] * src.integer(0, 2)
    return MEMORY_HEADER.pack(count, 0) + b"".join(regions), fds[:8]


def _payload(src: Source, request: int) -> tuple[object, list[str]]:
    """(payload as hex or a template dict, fd kinds) shaped for the request."""
    if request in U64_REQUESTS:
        return U64.pack(_u64(src)).hex(), []
    if request in RING_FD_REQUESTS:
        index = src.choice((0, 1, 2, 255, src.integer(0, 255)))
        nofd = src.boolean(0.3)
        value = index | (VRING_NOFD_MASK if nofd else 0) | (src.choice((0, 1 << 9, 1 << 63))
                                                              if src.boolean(0.1) else 0)
        fds = [] if nofd and src.boolean(0.8) else [src.choice(("eventfd", "eventfd", "memfd:4096"))]
        return U64.pack(value).hex(), fds
    if request in STATE_REQUESTS:
        return VRING_STATE.pack(src.choice((0, 0, 1, 2, 255, 256, (1 << 32) - 1)), _num(src)).hex(), []
    if request == Request.SET_VRING_ADDR:
        def off():
            return src.choice((0, 0x1000, 0x2000, 8, 2, layout.RAW_RING_SIZE - 4,
                               layout.RAW_RING_SIZE, 1 << 40))
        return {"template": "vring_addr", "index": src.choice((0, 0, 1, 255)),
                "flags": src.choice((0, 0, 1, 0xffffffff)), "desc": off(), "avail": off(),
                "used": off(), "log": _u64(src) if src.boolean(0.2) else 0}, []
    if request == Request.SET_MEM_TABLE:
        payload, fds = memory_table(src)
        return payload.hex(), fds
    if request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        size = src.choice((0, 4096, 1 << 20, (1 << 64) - 1))
        payload = SINGLE_MEM_REGION.pack(0, src.choice((0, 1 << 20, 8 << 20, (1 << 64) - 4096)),
                                         size, src.integer(0, 1 << 48), src.choice((0, 4096, 1 << 40)))
        return payload.hex(), ["memfd:8192"] if request == Request.ADD_MEM_REG else []
    if request in (Request.GET_CONFIG, Request.SET_CONFIG):
        offset = src.choice((0, 8, 60, 255, 256, (1 << 32) - 1))
        size = src.choice((0, 1, 4, 60, 256, 257, (1 << 32) - 1))
        body = bytes(min(size, 300)) if src.boolean(0.7) else src.blob(64)
        return (CONFIG_HEADER.pack(offset, size, src.choice((0, 1, 2))) + body).hex(), []
    if request == Request.SET_LOG_BASE:
        return LOG.pack(src.choice((0, 4096, 1 << 40, (1 << 64) - 1)),
                        src.choice((0, 4096, (1 << 64) - 4096))).hex(), ["memfd:4096"]
    if request in (Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD):
        payload = INFLIGHT.pack(src.choice((0, 4096, 1 << 40)), src.choice((0, 4096)),
                                src.choice((0, 1, 2, 65535)), src.choice((0, 1, 16, 1024, 65535)))
        return payload.hex(), ["memfd:4096"] if request == Request.SET_INFLIGHT_FD else []
    return src.blob(64).hex(), ["eventfd"] * src.integer(0, 1)


def message(src: Source) -> dict:
    """One vhost-user message, usually close to well-formed."""
    if src.boolean(0.9):
        request = int(src.choice(list(Request)))
    else:
        request = src.choice((0, 41, 99, 1 << 16, (1 << 32) - 1))
    payload, fds = _payload(src, request)
    flags = FLAG_VERSION | (FLAG_NEED_REPLY if src.boolean(0.5) else 0)
    if src.boolean(0.1):
        flags = src.choice((0, 2, 3, FLAG_VERSION | FLAG_REPLY, (1 << 32) - 1))
    elif src.boolean(0.05):
        flags |= src.choice(RESERVED_FLAGS)
    size = None
    if isinstance(payload, str) and src.boolean(0.15):
        n = len(payload) // 2
        size = src.choice((0, max(n - 1, 0), n + 1, 4096, 4097, (1 << 32) - 1))
    if isinstance(payload, str) and src.boolean(0.1):
        raw = bytes.fromhex(payload)
        payload = raw[:src.integer(0, len(raw))].hex() if src.boolean() else (raw + src.blob(16)).hex()
    if src.boolean(0.05):
        fds = fds + ["eventfd"] * src.integer(1, 8)     # more fds than any message takes
    return {"op": "msg", "request": request, "flags": flags, "payload": payload,
            "size": size, "fds": fds}


def messages(src: Source, max_messages: int = 6) -> list[dict]:
    return [message(src) for _ in range(src.integer(1, max_messages))]


def _well_formed(request: int) -> tuple[str, list[str]]:
    """(payload hex, fd kinds) as QEMU would send the request, so that a
    refusal can only be for the missing protocol feature."""
    inflight = INFLIGHT.pack(4096, 0, 2, 16) + bytes(INFLIGHT_SIZE - INFLIGHT.size)
    shapes = {
        Request.GET_INFLIGHT_FD: (inflight, []),
        Request.SET_INFLIGHT_FD: (inflight, ["memfd:4096"]),
        Request.SET_BACKEND_REQ_FD: (b"", ["socket"]),
        Request.GET_CONFIG: (CONFIG_HEADER.pack(0, 8, 0) + bytes(8), []),
        Request.SET_CONFIG: (CONFIG_HEADER.pack(0, 1, 0) + bytes(1), []),
        Request.ADD_MEM_REG: (SINGLE_MEM_REGION.pack(0, 16 << 20, 1 << 20, 0x7e0000000000, 0),
                              [f"memfd:{1 << 20}"]),
        Request.REM_MEM_REG: (SINGLE_MEM_REGION.pack(0, 16 << 20, 1 << 20, 0x7e0000000000, 0), []),
        Request.GET_MAX_MEM_SLOTS: (b"", []),
        Request.SET_STATUS: (U64.pack(0xf), []),          # ACK|DRIVER|FEATURES_OK|DRIVER_OK
        Request.GET_STATUS: (b"", []),
        Request.RESET_DEVICE: (b"", []),
        Request.SET_LOG_BASE: (LOG.pack(4096, 0), ["memfd:4096"]),
        Request.SET_LOG_FD: (U64.pack(0), ["eventfd"]),
        Request.SEND_RARP: (bytes.fromhex("525400123456") + bytes(2), []),
        Request.NET_SET_MTU: (U64.pack(1500), []),
        Request.SET_VRING_ENDIAN: (VRING_STATE.pack(0, 0), []),
        Request.VRING_KICK: (VRING_STATE.pack(0, 0), []),
    }
    payload, fds = shapes[request]
    return payload.hex(), fds


def unnegotiated(src: Source) -> tuple[list[str], list[dict]]:
    """(protocol features to withhold, messages): requests sent without the
    protocol feature they belong to, and otherwise well-formed requests with
    reserved header flag bits set. The executor tells an acceptance from a
    refusal (see execute._acceptance)."""
    withhold, out = set(), []
    for _ in range(src.integer(1, 2)):
        if src.boolean(0.75):
            request = src.choice(sorted(NEEDS_PROTOCOL_FEATURE))
            payload, fds = _well_formed(request) if src.boolean(0.8) else _payload(src, request)
            flags = FLAG_VERSION | (FLAG_NEED_REPLY if src.boolean(0.6) else 0)
            feature = NEEDS_PROTOCOL_FEATURE[request]
            withhold.add(feature)
            out.append({"op": "msg", "request": int(request), "flags": flags,
                        "payload": payload, "size": None, "fds": fds})
        else:
            request = src.choice((Request.GET_FEATURES, Request.SET_FEATURES, Request.SET_OWNER,
                                  Request.GET_PROTOCOL_FEATURES, Request.SET_VRING_NUM,
                                  Request.GET_VRING_BASE, Request.SET_VRING_ENABLE,
                                  Request.GET_QUEUE_NUM, Request.SET_MEM_TABLE))
            payload, fds = _payload(src, request)
            flags = FLAG_VERSION | (FLAG_NEED_REPLY if src.boolean(0.6) else 0)
            out.append({"op": "msg", "request": int(request), "flags": flags
                        | src.choice(RESERVED_FLAGS), "payload": payload, "size": None,
                        "fds": fds})
    return sorted(withhold), out


def memory_messages(src: Source) -> list[dict]:
    """Memory-table changes, possibly under running rings."""
    out = []
    for _ in range(src.integer(1, 3)):
        if src.boolean(0.6):
            payload, fds = memory_table(src)
            out.append({"op": "msg", "request": int(Request.SET_MEM_TABLE),
                        "flags": FLAG_VERSION | FLAG_NEED_REPLY, "payload": payload.hex(),
                        "size": None, "fds": fds})
        else:
            out.append(message(src))
    out.append({"op": "kick"})
    return out


# -- rings ------------------------------------------------------------------------

def blk_header(src: Source, gpa: int) -> dict:
    kind = src.choice(BLK_TYPES) if src.boolean(0.85) else src.integer(0, (1 << 32) - 1)
    sector = src.choice((0, 1, 127, 131071, 131072, 1 << 55, (1 << 64) - 1)) \
        if src.boolean(0.5) else src.integer(0, 1 << 20)
    return {"op": "poke", "gpa": gpa, "data": BLK_OUTHDR.pack(kind, 0, sector).hex()}


def _descriptor_flags(src: Source, last: bool, tail_writable: bool, packed: bool) -> int:
    flags = (0 if last else F_NEXT) | (F_WRITE if tail_writable else 0)
    if src.boolean(0.15):
        flags ^= src.choice((F_NEXT, F_WRITE, F_INDIRECT, F_INDIRECT | F_NEXT))
    if packed:
        flags |= P_AVAIL if src.boolean(0.9) else src.choice((0, P_USED, P_AVAIL | P_USED))
    return flags


def indirect_table(src: Source, gpa: int, packed: bool) -> tuple[dict, int]:
    """A poke writing an indirect table at gpa; returns it and its byte length."""
    n = src.integer(1, 5)
    entries = []
    for i in range(n):
        last = i + 1 == n
        flags = (0 if last or packed else F_NEXT) | (F_WRITE if last else 0)
        if src.boolean(0.15):
            flags ^= src.choice((F_INDIRECT, F_WRITE, F_NEXT))       # nested, direction, end
        nxt = i + 1 if not last else 0
        if src.boolean(0.1):
            nxt = src.choice((i, 0, n, 0xffff))                        # loop, out of table
        addr = _address(src)
        entries.append(struct.pack("<QIHH", addr, _length(src, 16), *(
            (0, flags) if packed else (flags, nxt))))
    table = b"".join(entries)
    length = len(table) if src.boolean(0.8) else src.choice((0, 8, len(table) + 1, 1 << 20))
    return {"op": "poke", "gpa": gpa, "data": table.hex()}, length


def ring_actions(src: Source, setup: Setup, *, blk: bool = False) -> list[dict]:
    """Raw descriptors and avail entries for the fuzzed queue: loops,
    out-of-range indices and addresses, huge or zero lengths, direction
    errors, indirect tables (nested too), avail index jumps."""
    size, packed = setup.queue_size, setup.packed
    actions: list[dict] = []
    heads, slot = [], 0
    for c in range(src.integer(1, 3)):
        ndesc = src.integer(1, 4)
        if slot + ndesc > size and src.boolean(0.8):
            break
        heads.append(slot % size)
        hdr_gpa = layout.DATA + 0x100 * c
        if blk:
            actions.append(blk_header(src, hdr_gpa))
        for i in range(ndesc):
            last = i + 1 == ndesc
            addr = hdr_gpa if i == 0 and src.boolean(0.7) else _address(src)
            length = 16 if i == 0 and src.boolean(0.6) else (1 if last and src.boolean(0.5)
                                                              else _length(src))
            flags = _descriptor_flags(src, last, last or i > 0 and src.boolean(0.5), packed)
            if flags & F_INDIRECT and setup.indirect and src.boolean(0.7):
                poke, length = indirect_table(src, layout.DATA + 0x4000 + 0x400 * c, packed)
                actions.append(poke)
                addr = layout.DATA + 0x4000 + 0x400 * c
            link = (slot + 1) % size
            if src.boolean(0.1):
                link = src.choice((slot, heads[-1], size, 0xffff, src.integer(0, size)))
            desc = {"op": "desc", "slot": slot % size, "addr": addr, "len": length & 0xffffffff,
                    "flags": flags}
            desc["id" if packed else "next"] = (c if src.boolean(0.9) else src.integer(0, 0xffff)) \
                if packed else link
            actions.append(desc)
            slot += 1
    if not packed:
        if src.boolean(0.1):
            heads.append(src.choice((size, 0xffff, src.integer(0, 0xffff))))
        advance = len(heads)
        if src.boolean(0.1):
            advance = src.choice((0, size + 1, 0x8000, 0xffff))
        actions.append({"op": "avail", "heads": heads, "advance": advance})
    actions.append({"op": "kick"})
    return actions


# -- device requests through a well-formed ring -------------------------------------

def blk_request(src: Source, n: int = 0) -> list[dict]:
    """A virtio-blk request as a well-formed chain with malformed content:
    unknown types, sectors past the end, unaligned or huge lengths, data in
    the wrong direction, missing or oversized status, split headers."""
    base = layout.DATA + 0x2000 * n
    actions = [blk_header(src, base)]
    kind = int(bytes.fromhex(actions[0]["data"])[0])
    header_len = 16 if src.boolean(0.85) else src.choice((0, 8, 15, 17, 32))
    buffers = [[base, header_len, False]] if src.boolean(0.85) else \
        [[base, 8, False], [base + 8, max(header_len - 8, 0), False]]
    if kind in (11, 13, 14) and src.boolean(0.8):
        segs = b"".join(BLK_SEGMENT.pack(src.choice((0, 8, 131071, (1 << 64) - 1)),
                                         src.choice((0, 1, 8, 1 << 20, (1 << 32) - 1)),
                                         src.choice((0, 0, 1, 2, 0xffffffff)))
                        for _ in range(src.integer(1, 3)))
        actions.append({"op": "poke", "gpa": base + 0x100, "data": segs.hex()})
        buffers.append([base + 0x100, len(segs) if src.boolean(0.8) else src.integer(0, 64), False])
    elif kind != 4 or src.boolean(0.2):
        length = _length(src, 512 if kind in (0, 1) else 20)
        writable = (kind != 1) ^ src.boolean(0.1)
        addr = src.choice((base + 0x200, base + 0x200, layout.BOUNDARY - 256, layout.HOLE,
                           layout.MEMORY_END - 8))
        length = min(length, 0xffffffff)
        for _ in range(src.integer(1, 2)):
            buffers.append([addr, length, writable])
            addr += length
    if src.boolean(0.9):
        buffers.append([base + 0x1f00, 1 if src.boolean(0.85) else src.choice((0, 2, 16)), True])
    return actions + [{"op": "chain", "buffers": buffers}]


def net_frame(src: Source, n: int = 0) -> list[dict]:
    """A transmit chain: virtio-net header (12 bytes with VERSION_1) with
    odd offload fields, then a frame of any length, over 1-3 buffers."""
    base = layout.DATA + 0x4000 * n
    flags = src.choice((0, 1, 2, 0xff))
    gso = src.choice((0, 1, 3, 4, 5, 0x80, 0xff))
    hdr = NET_HDR.pack(flags, gso, src.choice((0, 14, 54, 0xffff)),
                       src.choice((0, 1, 1448, 0xffff)), src.choice((0, 14, 34, 0xffff)),
                       src.choice((0, 6, 16, 0xffff)), src.choice((0, 1, 0xffff)))
    hdr_len = 12 if src.boolean(0.85) else src.choice((0, 10, 11, 13))
    frame_len = src.choice((0, 13, 14, 60, 1514, 1518, 1522, 9018, 65535, 65550)) \
        if src.boolean(0.7) else src.integer(0, 3000)
    frame = bytes([0xff] * 6 + [0x52, 0x54, 0, 0, 0, 1]) + b"\x08\x00"
    frame = (frame + bytes(max(frame_len - len(frame), 0)))[:frame_len]
    frame_gpa = base + 0x100
    actions = [{"op": "poke", "gpa": base, "data": hdr[:hdr_len].hex().ljust(2 * hdr_len, "0")}]
    if frame_len <= 0x3000:
        actions.append({"op": "poke", "gpa": frame_gpa, "data": frame.hex()})
    buffers = [[base, hdr_len, False]]
    pieces = src.integer(1, 3)
    step = max(frame_len // pieces, 1)
    for i in range(pieces):
        length = step if i + 1 < pieces else max(frame_len - step * (pieces - 1), 0)
        buffers.append([frame_gpa + i * step, length, False])
    if src.boolean(0.1):
        buffers.append([base + 0x3f00, 64, True])             # a device-writable tx buffer
    return actions + [{"op": "chain", "buffers": buffers}]


# -- whole cases ---------------------------------------------------------------------

def setup(src: Source, *, allow_packed: bool, stage: str = "queues") -> Setup:
    return Setup(stage=stage, packed=allow_packed and src.boolean(0.3),
                 indirect=src.boolean(0.6), event_idx=src.boolean(0.5),
                 queue_size=src.choice(QUEUE_SIZES))


def case(src: Source, profile: str, *, allow_packed: bool = True,
         kinds: tuple[str, ...] | None = None) -> Case:
    """A whole case for a profile (blk, net, echo)."""
    own = {"blk": "request", "net": "frame"}.get(profile)
    options = kinds or tuple(k for k in ("messages", "memory", "ring", own, "unnegotiated") if k)
    weights = {"messages": 2, "memory": 1, "ring": 3, "request": 4, "frame": 4,
               "unnegotiated": 1}
    pool = [k for k in options for _ in range(weights[k])]
    kind = src.choice(pool)
    if kind == "messages":
        s = setup(src, allow_packed=allow_packed, stage=src.choice(STAGES))
        return Case(profile, kind, s, messages(src))
    if kind == "unnegotiated":
        s = setup(src, allow_packed=allow_packed, stage=src.choice(STAGES[1:]))
        s.withhold, actions = unnegotiated(src)
        return Case(profile, kind, s, actions)
    s = setup(src, allow_packed=allow_packed)
    if kind == "memory":
        return Case(profile, kind, s, memory_messages(src))
    if kind == "ring":
        return Case(profile, kind, s, ring_actions(src, s, blk=profile == "blk"))
    maker = blk_request if kind == "request" else net_frame
    actions: list[dict] = []
    for n in range(src.integer(1, 3)):
        actions += maker(src, n)
    return Case(profile, kind, s, actions + [{"op": "kick"}])
