"""Properties of the C rings (virtio 1.4 2.7 split, 2.8 packed):

- any valid chain — direct or indirect, buffers crossing region boundaries —
  pops exactly as the driver wrote it: same bytes, same direction, same id;
- any malformed ring breaks only its own queue, with the precise error; the
  other queue of the device keeps serving, and a reset restores the broken one.
"""
import os

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from vhostuser_devkit.ringlab import GPA_BASE, NREGIONS, REGION, F_INDIRECT, F_NEXT, F_WRITE, Lab
from vhostuser.native import lib

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# A chain: readable buffers then writable ones (the order the spec requires).
buffer_len = st.integers(min_value=1, max_value=5000)
chain = st.tuples(st.lists(buffer_len, max_size=4), st.lists(buffer_len, max_size=4)) \
    .filter(lambda rw: len(rw[0]) + len(rw[1]) > 0)


def place(lab: Lab, length: int, data_rng, cross: bool):
    """A buffer with random content; `cross` puts it across a region edge."""
    gpa = None
    if cross and length > 1:
        gpa = lab.alloc_across_edge(length, data_rng.randrange(1, length))
    if gpa is None:
        gpa = lab.alloc(length)
    content = os.urandom(length)
    lab.write(gpa, content)
    return gpa, content


def spans_edge(gpa: int, length: int) -> bool:
    return (gpa - GPA_BASE) // REGION != (gpa + length - 1 - GPA_BASE) // REGION


def build(lab, spec, rng, cross):
    readable, writable = spec
    bufs, contents = [], []
    for n in readable:
        gpa, data = place(lab, n, rng, cross)
        bufs.append((gpa, n, False))
        contents.append(data)
    for n in writable:
        gpa, _ = place(lab, n, rng, cross)
        bufs.append((gpa, n, True))
    return bufs, b"".join(contents)


@SETTINGS
@given(chains=st.lists(chain, min_size=1, max_size=6), indirect=st.lists(st.booleans(), min_size=6,
       max_size=6), cross=st.booleans(), packed=st.booleans(), seed=st.integers(0, 2**32))
def test_valid_chains_arrive_exactly_as_written(chains, indirect, cross, packed, seed):
    import random
    rng = random.Random(seed)
    lab = Lab(packed=packed, size=64)   # 6 chains of up to 8 descriptors always fit
    try:
        expected = []
        heads = []
        for i, spec in enumerate(chains):
            bufs, readable = build(lab, spec, rng, cross)
            if packed:
                lab.add_packed_chain(0, bufs, buf_id=100 + i, indirect=indirect[i])
                heads.append(100 + i)
            else:
                heads.append(lab.add_split_chain(0, bufs, indirect=indirect[i]))
            split = sum(spans_edge(g, n) for g, n, _ in bufs)
            expected.append((readable, sum(spec[1]), len(bufs) + split))
        if not packed:
            lab.publish_split(0, heads)
        for i, (readable, writable_len, niov) in enumerate(expected):
            rc, e = lab.pop(0)
            assert rc == 1, lib.vu_strerror(rc)
            assert e.id == heads[i]
            # one iovec per buffer, two for a buffer across a region edge
            assert e.out_num + e.in_num == niov
            assert b"".join(lab.elem_bytes(e, False)) == readable
            assert e.out_len == len(readable) and e.in_len == writable_len
            assert sum(len(b) for b in lab.elem_bytes(e, True)) == writable_len
            assert lib.vu_vq_push(lab.vq(0), e, writable_len) == 0
        assert lab.pop(0)[0] == 0
        lib.vu_vq_flush(lab.vq(0))
        if not packed:
            assert lab.used_split(0) == [(h, w) for h, (_, w, _) in zip(heads, expected)]
        assert lib.vu_vq_inflight(lab.vq(0)) == 0
    finally:
        lab.close()


# ---- malformed rings --------------------------------------------------------

def corrupt_split(lab: Lab, kind: str, data: st.DataObject):
    """Writes one malformed chain on queue 0 and returns the expected error."""
    q, size = 0, lab.size
    buf = lab.alloc(64)
    if kind == "loop":
        a, b = 0, 1
        lab.put_split_desc(q, a, buf, 8, F_NEXT, b)
        lab.put_split_desc(q, b, buf, 8, F_NEXT, a)
        lab.publish_split(q, [a])
        return lib.VU_ERR_CHAIN_LOOP
    if kind == "next_out_of_range":
        lab.put_split_desc(q, 0, buf, 8, F_NEXT, data.draw(st.integers(size, 0xFFFF)))
        lab.publish_split(q, [0])
        return lib.VU_ERR_DESC_INDEX
    if kind == "head_out_of_range":
        lab.publish_split(q, [data.draw(st.integers(size, 0xFFFF))])
        return lib.VU_ERR_BAD_HEAD
    if kind == "avail_jump":
        lab.put_split_desc(q, 0, buf, 8, 0)
        lab.publish_split(q, [0], idx_jump=data.draw(st.integers(size, 0x7FFF)))
        return lib.VU_ERR_AVAIL_IDX_JUMP
    if kind == "unmapped":
        addr = data.draw(st.sampled_from([0, GPA_BASE - 8, GPA_BASE + NREGIONS * REGION - 4,
                                          2**64 - 16]))
        lab.put_split_desc(q, 0, addr, 64, 0)
        lab.publish_split(q, [0])
        return lib.VU_ERR_ADDR_UNMAPPED
    if kind == "write_then_read":
        lab.put_split_desc(q, 0, buf, 8, F_WRITE | F_NEXT, 1)
        lab.put_split_desc(q, 1, buf + 8, 8, 0)
        lab.publish_split(q, [0])
        return lib.VU_ERR_WRITE_BEFORE_READ
    if kind == "nested_indirect":
        table = lab.alloc(32)
        lab.write(table, __import__("struct").pack("<QIHH", buf, 16, F_INDIRECT, 0))
        lab.put_split_desc(q, 0, table, 16, F_INDIRECT)
        lab.publish_split(q, [0])
        return lib.VU_ERR_NESTED_INDIRECT
    if kind == "indirect_bad_len":
        table = lab.alloc(32)
        lab.put_split_desc(q, 0, table, data.draw(st.sampled_from([0, 15, 17, 33])), F_INDIRECT)
        lab.publish_split(q, [0])
        return lib.VU_ERR_INDIRECT_SIZE
    if kind == "indirect_loop":
        table = lab.alloc(32)
        import struct
        lab.write(table, struct.pack("<QIHH", buf, 8, F_NEXT, 1) + struct.pack("<QIHH", buf, 8, F_NEXT, 0))
        lab.put_split_desc(q, 0, table, 32, F_INDIRECT)
        lab.publish_split(q, [0])
        return lib.VU_ERR_CHAIN_LOOP
    raise AssertionError(kind)


SPLIT_FAULTS = ["loop", "next_out_of_range", "head_out_of_range", "avail_jump", "unmapped",
                "write_then_read", "nested_indirect", "indirect_bad_len", "indirect_loop"]


@SETTINGS
@given(kind=st.sampled_from(SPLIT_FAULTS), data=st.data())
def test_malformed_split_ring_breaks_only_its_queue(kind, data):
    lab = Lab(size=16)
    try:
        expected = corrupt_split(lab, kind, data)
        rc, _ = lab.pop(0)
        assert rc == -expected, (kind, lib.vu_strerror(rc))
        vq = lab.vq(0)
        assert vq.broken and vq.error == expected
        assert lab.pop(0)[0] == -lib.VU_ERR_QUEUE_BROKEN   # stays broken, no retry
        # the neighbour queue serves on
        buf = lab.alloc(8)
        lab.write(buf, b"neighbor")
        head = lab.add_split_chain(1, [(buf, 8, False)])
        lab.publish_split(1, [head])
        rc, e = lab.pop(1)
        assert rc == 1 and lab.elem_bytes(e, False) == [b"neighbor"]
        # a reset (what RESET_DEVICE / a restart does) restores the queue
        lib.vu_vq_reset(vq)
        lab.rings[0] = lab._ring_layout(0)
        lab.write(lab.rings[0]["avail"], bytes(4))
        lab.write(lab.rings[0]["used"], bytes(4))
        lab.start(0)
        assert not vq.broken and lab.pop(0)[0] == 0
    finally:
        lab.close()


@SETTINGS
@given(kind=st.sampled_from(["loop_too_long", "unmapped", "nested_indirect",
                             "indirect_with_next", "write_then_read"]), data=st.data())
def test_malformed_packed_ring_breaks_only_its_queue(kind, data):
    import struct
    lab = Lab(packed=True, size=8)
    try:
        buf = lab.alloc(64)
        if kind == "loop_too_long":
            # every descriptor says NEXT: the chain wraps past the ring size
            lab.add_packed_chain(0, [(buf, 8, False)] * 8, buf_id=1)
            for i in range(8):
                raw = bytearray(lab.read(lab.desc_gpa(0, i), 16))
                raw[14:16] = struct.pack("<H", struct.unpack("<H", raw[14:16])[0] | F_NEXT)
                lab.write(lab.desc_gpa(0, i), bytes(raw))
            expected = lib.VU_ERR_CHAIN_LOOP
        elif kind == "unmapped":
            lab.add_packed_chain(0, [(GPA_BASE + NREGIONS * REGION + 64, 8, False)], buf_id=1)
            expected = lib.VU_ERR_ADDR_UNMAPPED
        elif kind == "nested_indirect":
            table = lab.alloc(16)
            lab.write(table, struct.pack("<QIHH", buf, 16, 0, F_INDIRECT))
            lab.add_packed_chain(0, [], buf_id=1) if False else None
            r = lab.rings[0]
            lab.write(lab.desc_gpa(0, 0), struct.pack("<QIHH", table, 16, 1, F_INDIRECT | (1 << 7)))
            r["pidx"] = 1
            expected = lib.VU_ERR_NESTED_INDIRECT
        elif kind == "indirect_with_next":
            table = lab.alloc(16)
            lab.write(table, struct.pack("<QIHH", buf, 8, 0, 0))
            lab.write(lab.desc_gpa(0, 0), struct.pack("<QIHH", table, 16, 1,
                                                      F_INDIRECT | F_NEXT | (1 << 7)))
            expected = lib.VU_ERR_INDIRECT_NEXT
        else:
            lab.add_packed_chain(0, [(buf, 8, True), (buf + 8, 8, False)], buf_id=1)
            expected = lib.VU_ERR_WRITE_BEFORE_READ
        rc, _ = lab.pop(0)
        assert rc == -expected, (kind, lib.vu_strerror(rc))
        assert lab.vq(0).broken
        lab.write(buf, b"ok")
        lab.add_packed_chain(1, [(buf, 2, False)], buf_id=7)
        rc, e = lab.pop(1)
        assert rc == 1 and e.id == 7 and lab.elem_bytes(e, False) == [b"ok"]
    finally:
        lab.close()
