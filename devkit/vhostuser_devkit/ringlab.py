"""A bench for the C rings without sockets or threads: guest memory made of
memfd regions (adjacent in guest-physical space, scattered in user space),
a raw ring writer for split and packed layouts, and direct calls into the
data plane's pop/push. Raw on purpose: tests write any ring state, valid or
not, byte for byte."""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from vhostuser.native import ffi, lib
from vhostuser.protocol import Feature, bit

DESC = struct.Struct("<QIHH")          # split: addr, len, flags, next
PDESC = struct.Struct("<QIHH")         # packed: addr, len, id, flags
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
P_AVAIL, P_USED = 1 << 7, 1 << 15

REGION = 64 << 10
NREGIONS = 16
GPA_BASE = 0x1000_0000
RING_AREA = 0x8000         # the start of region 0 holds the rings


@dataclass
class Buf:
    length: int
    writable: bool


class Lab:
    """One C device with ``nqueues`` queues over NREGIONS adjacent regions."""

    def __init__(self, nqueues: int = 2, *, packed: bool = False, size: int = 16,
                 indirect: bool = True, event_idx: bool = False, prepare=None):
        """``prepare(vq)`` runs on each queue before it starts (e.g.
        lib.vu_blk_prepare_queue for the virtio-blk handler)."""
        self.dev = lib.vu_dev_new(nqueues)
        self.packed = packed
        self.size = size
        self.maps = []
        self.uva = {}
        self.region_fds = []    # kept for remap_same_pages()
        for i in range(NREGIONS):
            fd = os.memfd_create(f"lab{i}")
            os.ftruncate(fd, REGION)
            m = mmap.mmap(fd, REGION)
            gpa = GPA_BASE + i * REGION
            uva = 0x7000_0000_0000 + i * 4 * REGION   # scattered user addresses
            assert lib.vu_mem_add_region(self.dev.mem, gpa, REGION, uva, 0, fd, ffi.NULL) == 0
            self.region_fds.append(fd)
            self.maps.append((gpa, m))
            self.uva[gpa] = uva
        features = bit(Feature.VERSION_1)
        if packed:
            features |= bit(Feature.RING_PACKED)
        if indirect:
            features |= bit(Feature.RING_INDIRECT_DESC)
        if event_idx:
            features |= bit(Feature.RING_EVENT_IDX)
        lib.vu_dev_set_features(self.dev, features)
        self.rings = [self._ring_layout(q) for q in range(nqueues)]
        self.next_data = GPA_BASE + RING_AREA
        for q in range(nqueues):
            if prepare is not None:
                assert prepare(self.dev.vqs[q]) == 0
            self.start(q)

    # -- memory ------------------------------------------------------------
    def remap_same_pages(self) -> None:
        """Installs a new memory table over the same guest pages, mapped
        again at new host addresses (as QEMU re-sends SET_MEM_TABLE when its
        sections split or merge), and points the rings at it."""
        new = lib.vu_mem_new()
        for i, fd in enumerate(self.region_fds):
            gpa = GPA_BASE + i * REGION
            assert lib.vu_mem_add_region(new, gpa, REGION, self.uva[gpa], 0, fd, ffi.NULL) == 0
        lib.vu_dev_wrlock(self.dev)
        lib.vu_dev_install_mem(self.dev, new)
        for q in range(len(self.rings)):
            assert lib.vu_vq_remap(self.vq(q)) == 0
        lib.vu_dev_unlock(self.dev)

    def _locate(self, gpa: int):
        for base, m in self.maps:
            if base <= gpa < base + REGION:
                return m, gpa - base
        raise ValueError(f"gpa {gpa:#x} outside the lab")

    def write(self, gpa: int, data: bytes) -> None:
        while data:
            m, off = self._locate(gpa)
            n = min(len(data), REGION - off)
            m[off:off + n] = data[:n]
            gpa += n
            data = data[n:]

    def read(self, gpa: int, length: int) -> bytes:
        out = b""
        while length:
            m, off = self._locate(gpa)
            n = min(length, REGION - off)
            out += m[off:off + n]
            gpa += n
            length -= n
        return out

    def to_uva(self, gpa: int) -> int:
        for base in self.uva:
            if base <= gpa < base + REGION:
                return self.uva[base] + gpa - base
        raise ValueError(gpa)

    def alloc(self, length: int, align: int = 16, at: int | None = None) -> int:
        """Data buffer gpa; `at` places it exactly (e.g. across a region edge)."""
        if at is not None:
            return at
        gpa = (self.next_data + align - 1) // align * align
        self.next_data = gpa + length
        if self.next_data > GPA_BASE + NREGIONS * REGION:
            raise MemoryError("lab memory exhausted")
        return gpa

    def alloc_across_edge(self, length: int, before: int) -> int | None:
        """A buffer that starts `before` bytes below the next region edge, so
        it spans two regions; None when no edge is left."""
        edge = (self.next_data - GPA_BASE) // REGION * REGION + REGION + GPA_BASE
        if edge + length > GPA_BASE + NREGIONS * REGION:
            return None
        self.next_data = edge - before + length
        return edge - before

    # -- rings ---------------------------------------------------------------
    def _ring_layout(self, q: int) -> dict:
        base = GPA_BASE + q * 0x2000
        return {"desc": base, "avail": base + 0x800, "used": base + 0x1000,
                "next_head": 0, "avail_idx": 0, "wrap": True, "pidx": 0, "used_seen": 0}

    def vq(self, q: int):
        return self.dev.vqs[q]

    def start(self, q: int) -> None:
        r = self.rings[q]
        vq = self.vq(q)
        assert lib.vu_vq_set_num(vq, self.size) == 0
        assert lib.vu_vq_set_addr(vq, 0, self.to_uva(r["desc"]), self.to_uva(r["used"]),
                                  self.to_uva(r["avail"]), 0) == 0
        assert lib.vu_vq_start(vq) == 0

    def desc_gpa(self, q: int, index: int) -> int:
        return self.rings[q]["desc"] + 16 * index

    def put_split_desc(self, q, index, addr, length, flags, nxt=0):
        self.write(self.desc_gpa(q, index), DESC.pack(addr, length, flags, nxt))

    def publish_split(self, q: int, heads: list[int], idx_jump: int | None = None) -> None:
        r = self.rings[q]
        for h in heads:
            self.write(r["avail"] + 4 + 2 * (r["avail_idx"] % self.size), struct.pack("<H", h))
            r["avail_idx"] = (r["avail_idx"] + 1) & 0xFFFF
        idx = r["avail_idx"] if idx_jump is None else (r["avail_idx"] + idx_jump) & 0xFFFF
        self.write(r["avail"] + 2, struct.pack("<H", idx))

    def publish_readable(self, q: int, blobs: list[bytes], split_at: int | None = None) -> None:
        """Each blob in guest memory as a chain the device reads (two buffers,
        cut at ``split_at``, when given), all published at once."""
        heads = []
        for data in blobs:
            cut = len(data) if split_at is None else split_at
            parts = []
            for chunk in (data[:cut], data[cut:]):
                if chunk:
                    gpa = self.alloc(len(chunk))
                    self.write(gpa, chunk)
                    parts.append((gpa, len(chunk), False))
            heads.append(self.add_split_chain(q, parts))
        self.publish_split(q, heads)

    def add_split_chain(self, q: int, bufs: list[tuple[int, int, bool]], *,
                        indirect: bool = False, table_at: int | None = None) -> int:
        """bufs: (gpa, len, writable). Returns the head index. ``table_at``
        places the indirect table."""
        r = self.rings[q]
        if indirect:
            table = self.alloc(16 * len(bufs), at=table_at)
            for i, (gpa, length, w) in enumerate(bufs):
                flags = (F_WRITE if w else 0) | (F_NEXT if i + 1 < len(bufs) else 0)
                self.write(table + 16 * i, DESC.pack(gpa, length, flags, i + 1))
            head = r["next_head"]
            self.put_split_desc(q, head, table, 16 * len(bufs), F_INDIRECT)
            r["next_head"] = (head + 1) % self.size
            return head
        head = r["next_head"]
        idxs = [(head + i) % self.size for i in range(len(bufs))]
        for i, (gpa, length, w) in enumerate(bufs):
            flags = (F_WRITE if w else 0) | (F_NEXT if i + 1 < len(bufs) else 0)
            self.put_split_desc(q, idxs[i], gpa, length, flags, idxs[(i + 1) % len(idxs)])
        r["next_head"] = (head + len(bufs)) % self.size
        return head

    def add_packed_chain(self, q: int, bufs: list[tuple[int, int, bool]], buf_id: int, *,
                         indirect: bool = False, table_at: int | None = None) -> None:
        """Writes the chain at the driver's position and makes it available
        (first descriptor's flags written last). ``table_at`` places the
        indirect table."""
        r = self.rings[q]
        entries = []
        if indirect:
            table = self.alloc(16 * len(bufs), at=table_at)
            for i, (gpa, length, w) in enumerate(bufs):
                self.write(table + 16 * i, PDESC.pack(gpa, length, 0, F_WRITE if w else 0))
            entries.append((table, 16 * len(bufs), buf_id, F_INDIRECT))
        else:
            for i, (gpa, length, w) in enumerate(bufs):
                flags = (F_WRITE if w else 0) | (F_NEXT if i + 1 < len(bufs) else 0)
                entries.append((gpa, length, buf_id, flags))
        first_pos, first_flags = None, None
        for addr, length, ident, flags in entries:
            wrap = r["wrap"]
            flags |= (P_AVAIL if wrap else 0) | (0 if wrap else P_USED)
            pos = r["pidx"]
            if first_pos is None:
                first_pos, first_flags = pos, flags
                self.write(self.desc_gpa(q, pos), PDESC.pack(addr, length, ident, 0 if wrap else P_AVAIL | P_USED))
            else:
                self.write(self.desc_gpa(q, pos), PDESC.pack(addr, length, ident, flags))
            r["pidx"] += 1
            if r["pidx"] == self.size:
                r["pidx"] = 0
                r["wrap"] = not r["wrap"]
        self.write(self.desc_gpa(q, first_pos) + 14, struct.pack("<H", first_flags))

    # -- device side ------------------------------------------------------------
    def run_handler(self, handler, ctx, q: int = 0) -> int:
        """Runs a queue handler as a worker does: with the device's read lock
        held (an engine may drop it around I/O that can block)."""
        lib.vu_dev_rdlock(self.dev)
        try:
            return handler(ctx, self.vq(q))
        finally:
            lib.vu_dev_unlock(self.dev)

    def pop(self, q: int):
        out = ffi.new("struct vu_elem **")
        rc = lib.vu_vq_pop(self.vq(q), out)
        return rc, (out[0] if rc == 1 else None)

    @staticmethod
    def elem_bytes(e, writable: bool) -> list[bytes]:
        lo, hi = (e.out_num, e.out_num + e.in_num) if writable else (0, e.out_num)
        return [bytes(ffi.buffer(e.iov[i].iov_base, e.iov[i].iov_len)) for i in range(lo, hi)]

    def used_split(self, q: int) -> list[tuple[int, int]]:
        """Used entries published since the last call."""
        r = self.rings[q]
        idx = struct.unpack("<H", self.read(r["used"] + 2, 2))[0]
        out = []
        while r["used_seen"] != idx:
            slot = r["used_seen"] % self.size
            out.append(struct.unpack("<II", self.read(r["used"] + 4 + 8 * slot, 8)))
            r["used_seen"] = (r["used_seen"] + 1) & 0xFFFF
        return out

    def close(self) -> None:
        lib.vu_dev_close(self.dev)
        self.dev = ffi.NULL
        for fd in self.region_fds:
            os.close(fd)
        self.region_fds = []
        for _, m in self.maps:
            try:
                m.close()
            except BufferError:
                pass
