"""Writes the seed corpus of the libFuzzer targets (fuzz/corpus/<target>/).

Seeds are well-formed inputs, so the fuzzer starts from paths that reach
deep (a parsed blk request, a multi-region translation) instead of having
to discover ring layouts byte by byte. Run from anywhere:
    python fuzz/make_corpus.py
"""
from __future__ import annotations

import hashlib
import pathlib
import struct

HERE = pathlib.Path(__file__).resolve().parent
DESC = struct.Struct("<QIHH")      # split: addr, len, flags, next
PDESC = struct.Struct("<QIHH")     # packed: addr, len, id, flags
OUTHDR = struct.Struct("<IIQ")     # type, ioprio, sector
SEG = struct.Struct("<QII")        # discard / write-zeroes segment
NEXT, WRITE, INDIRECT = 1, 2, 4
P_AVAIL, P_USED = 1 << 7, 1 << 15

# ring_blk layout (see targets/ring_blk.c and targets/guest.h)
DESC_OFF, DRIVER_OFF, DATA_OFF = 0x000, 0x800, 0x1000
PACKED, IND, EVENT_IDX, READ_ONLY, SEGMENTS = 1, 2, 4, 8, 16
IMAGE = 0x4000 + 0x1000            # region 0 and the start of region 1


def blk_requests():
    """(name, [(bytes or length, writable)]) chains of typical requests."""
    return [
        ("read", [(OUTHDR.pack(0, 0, 3), False), (1024, True), (1, True)]),
        ("write", [(OUTHDR.pack(1, 0, 5), False), (b"w" * 512, False), (1, True)]),
        ("flush", [(OUTHDR.pack(4, 0, 0), False), (1, True)]),
        ("get_id", [(OUTHDR.pack(8, 0, 0), False), (20, True), (1, True)]),
        ("discard", [(OUTHDR.pack(11, 0, 0), False), (SEG.pack(8, 4, 0), False), (1, True)]),
        ("write_zeroes", [(OUTHDR.pack(13, 0, 0), False), (SEG.pack(2, 2, 1), False), (1, True)]),
    ]


def place(image: bytearray, chain, cursor: int):
    """Writes the chain's buffers at cursor; returns [(gpa, len, writable)], cursor."""
    bufs = []
    for content, writable in chain:
        data = bytes(content) if isinstance(content, bytes) else bytes(content)
        length = len(content) if isinstance(content, bytes) else content
        if isinstance(content, bytes):
            image[cursor:cursor + length] = data
        bufs.append((cursor, length, writable))
        cursor += (length + 15) & ~15
    return bufs, cursor


def split_seed(chains, *, indirect: bool, cfg: int) -> bytes:
    image = bytearray(IMAGE)
    cursor, slot = DATA_OFF, 0
    heads = []
    for chain in chains:
        bufs, cursor = place(image, chain, cursor)
        heads.append(slot)
        if indirect:
            table = cursor
            for i, (gpa, length, w) in enumerate(bufs):
                last = i + 1 == len(bufs)
                image[table + 16 * i:table + 16 * i + 16] = DESC.pack(
                    gpa, length, (WRITE if w else 0) | (0 if last else NEXT), 0 if last else i + 1)
            cursor += 16 * len(bufs)
            image[16 * slot:16 * slot + 16] = DESC.pack(table, 16 * len(bufs), INDIRECT, 0)
            slot += 1
        else:
            for i, (gpa, length, w) in enumerate(bufs):
                last = i + 1 == len(bufs)
                image[16 * slot:16 * slot + 16] = DESC.pack(
                    gpa, length, (WRITE if w else 0) | (0 if last else NEXT), 0 if last else slot + 1)
                slot += 1
    struct.pack_into("<HH", image, DRIVER_OFF, 0, len(heads))
    for i, head in enumerate(heads):
        struct.pack_into("<H", image, DRIVER_OFF + 4 + 2 * i, head)
    return bytes([cfg, 5, 0, 0]) + bytes(image).rstrip(b"\0")


def packed_seed(chains, cfg: int) -> bytes:
    image = bytearray(IMAGE)
    cursor, slot = DATA_OFF, 0
    for ident, chain in enumerate(chains):
        bufs, cursor = place(image, chain, cursor)
        for i, (gpa, length, w) in enumerate(bufs):
            last = i + 1 == len(bufs)
            flags = P_AVAIL | (WRITE if w else 0) | (0 if last else NEXT)
            image[16 * slot:16 * slot + 16] = PDESC.pack(gpa, length, ident, flags)
            slot += 1
    return bytes([cfg | PACKED, 5, 0, 0x80]) + bytes(image).rstrip(b"\0")


def ring_blk_seeds():
    reqs = blk_requests()
    chains = [c for _, c in reqs]
    yield split_seed(chains, indirect=False, cfg=SEGMENTS)
    yield split_seed(chains, indirect=True, cfg=SEGMENTS | IND | EVENT_IDX)
    yield packed_seed(chains, cfg=SEGMENTS)
    for name, chain in reqs:
        yield split_seed([chain], indirect=False, cfg=SEGMENTS | READ_ONLY)
        yield packed_seed([chain], cfg=SEGMENTS | IND)


# ring_net layout (see targets/ring_net.c): a ring area per queue
RX_RING, TX_RING, NET_DATA = 0x0000, 0x1000, 0x2000
RING_DRIVER, RING_DEVICE = 0x800, 0xa00
NET_PACKED, NET_IND, NET_EVENT_IDX, NET_MRG, NET_V1, NET_IN_ORDER, NET_SINK, NET_OFFLOADS = (
    1, 2, 4, 8, 16, 32, 64, 128)
PYTHON, LOG = 16, 32                  # config byte 6: the Python back-end, dirty logging
NET_HDR = struct.Struct("<BBHHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start/offset, num_buffers


def eth_frame(length: int, seq: int) -> bytes:
    """An IPv4 Ethernet frame of `length` bytes."""
    head = bytes.fromhex("525400123456") + bytes.fromhex("5254000000") + bytes([seq]) + b"\x08\x00"
    return (head + bytes((seq + i) & 0xff for i in range(length - len(head))))[:length]


def net_seed(cfg: int, frames, rx_bufs, *, split_hdr=False, hdr=b"", sizes=0x44, misc=0) -> bytes:
    """frames: the transmitted frames; rx_bufs: the receive buffers' sizes.
    Each frame goes behind a header (hdr, or a zero one of the negotiated
    size) in one descriptor, or header and frame in two (split_hdr)."""
    hdr_len = 12 if cfg & (NET_V1 | NET_MRG) else 10
    packed = bool(cfg & NET_PACKED)
    image = bytearray(IMAGE)
    cursor = NET_DATA
    rx_chains = [[(n, True)] for n in rx_bufs]
    tx_chains = []
    for frame in frames:
        h = (hdr or bytes(hdr_len))[:hdr_len]
        tx_chains.append([(h, False), (frame, False)] if split_hdr else [(h + frame, False)])
    for ring, chains in ((RX_RING, rx_chains), (TX_RING, tx_chains)):
        slot = 0
        heads = []
        for ident, chain in enumerate(chains):
            bufs, cursor = place(image, chain, cursor)
            heads.append(slot)
            for i, (gpa, length, w) in enumerate(bufs):
                last = i + 1 == len(bufs)
                at = ring + 16 * slot
                if packed:
                    flags = P_AVAIL | (WRITE if w else 0) | (0 if last else NEXT)
                    image[at:at + 16] = PDESC.pack(gpa, length, ident, flags)
                else:
                    image[at:at + 16] = DESC.pack(
                        gpa, length, (WRITE if w else 0) | (0 if last else NEXT), 0 if last else slot + 1)
                slot += 1
        if not packed:
            struct.pack_into("<HH", image, ring + RING_DRIVER, 0, len(heads))
            for i, head in enumerate(heads):
                struct.pack_into("<H", image, ring + RING_DRIVER + 4 + 2 * i, head)
    assert cursor <= 2 * 0x4000, "the seed's buffers overflow regions 0 and 1"
    base = 0x8000 if packed else 0       # packed: wrap counter 1, as the flags above
    cfg_bytes = bytes([cfg, sizes]) + struct.pack("<HH", base, base) + bytes([misc])
    return cfg_bytes + bytes(image).rstrip(b"\0")


def ring_net_seeds():
    frames = [eth_frame(60, 1), eth_frame(590, 2), eth_frame(1514, 3)]
    for packed in (0, NET_PACKED):
        # one receive buffer per frame, each big enough
        yield net_seed(packed | NET_V1 | NET_IN_ORDER, frames, [2048] * 4)
        # mergeable receive buffers: a frame spans several
        yield net_seed(packed | NET_V1 | NET_MRG | NET_EVENT_IDX, frames, [512] * 8)
        # legacy 10-byte header, header and frame in separate descriptors
        yield net_seed(packed, frames, [1600] * 4, split_hdr=True)
        # the sink, and a receive ring too small for the frames (drops)
        yield net_seed(packed | NET_V1 | NET_SINK, frames, [2048] * 2)
        yield net_seed(packed | NET_V1, frames, [256] * 4)
        # a checksum-offloaded frame and a TSO one (the TAP's offloads)
        csum = NET_HDR.pack(1, 0, 0, 0, 34, 16, 0)
        yield net_seed(packed | NET_V1 | NET_OFFLOADS, [eth_frame(200, 4)], [2048] * 2, hdr=csum)
        # dirty logging (migration), through the loopback and Python
        yield net_seed(packed | NET_V1 | NET_MRG, frames, [512] * 8, misc=LOG)
        yield net_seed(packed | NET_V1, frames, [2048] * 4, misc=PYTHON | LOG)
        # the Python back-end's stand-in: the batch injected back, or dropped
        yield net_seed(packed | NET_V1 | NET_MRG, frames, [512] * 8, split_hdr=True, misc=PYTHON)
        yield net_seed(packed | NET_V1 | NET_SINK, frames, [2048] * 4, misc=PYTHON)
        tso = NET_HDR.pack(1, 1, 54, 1448, 34, 16, 0)
        yield net_seed(packed | NET_V1 | NET_MRG | NET_OFFLOADS, [eth_frame(4000, 5)], [1024] * 8,
                       hdr=tso, split_hdr=True, misc=2)


def mem_translate_seeds():
    def region(gpa_quarter_pages, pages, uva_pages, off_pages, sub=0):
        return struct.pack("<HBHBB", gpa_quarter_pages, pages, uva_pages, off_pages, sub)

    def query(op, addr16, length):
        return struct.pack("<BI", op, addr16) + length.to_bytes(3, "little")

    adjacent = bytes([2]) + region(0, 4, 0, 0) + region(16, 4, 100, 4)
    yield adjacent + query(0, 0, 0x5000) + query(1, 0x100, 64) + query(2, 0, 16) + query(3, 0, 0)
    holes = bytes([3]) + region(0, 1, 0, 0) + region(8, 2, 10, 2, 1) + region(40, 1, 20, 8)
    yield holes + query(0, 0x80, 0x3000) + query(0x40, 0, 1) + query(0x80, 0, 1)
    yield bytes([1]) + region(0, 16, 0, 0) + query(0, 0xff, 0x100) + query(2, 0, 0x10000)


def write(target: str, seeds) -> int:
    out = HERE / "corpus" / target
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for seed in seeds:
        (out / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
        n += 1
    return n


if __name__ == "__main__":
    for target, seeds in (("ring_blk", ring_blk_seeds()), ("ring_net", ring_net_seeds()),
                          ("mem_translate", mem_translate_seeds())):
        print(target, write(target, seeds), "seeds")
