"""Random block requests against the C parser and RAM back-end
(virtio 1.4 5.2.6): whatever the chain holds, the answer is a valid status,
a request that was not OK leaves the disk unchanged, and only a chain with
no writable byte breaks the queue."""
import struct

import hypothesis.strategies as st
from hypothesis import given, settings

from vhostuser.blk.spec import BlkType
from vhostuser.native import ffi, lib
from vhostuser_devkit.ringlab import Lab

CAPACITY = 64   # sectors

types = st.sampled_from([t.value for t in BlkType] + [2, 3, 0x80000000, 0xFFFFFFFF])
sectors = st.one_of(st.integers(0, CAPACITY + 2), st.just(2**64 - 1), st.integers(0, 2**64 - 1))
lengths = st.one_of(st.sampled_from([0, 1, 511, 512, 1024, 4096, 16 * 512]),
                    st.integers(0, 9000))


@st.composite
def requests(draw):
    t = draw(types)
    header = struct.pack("<IIQ", t, draw(st.integers(0, 2**32 - 1)), draw(sectors))
    header = header[:draw(st.sampled_from([16, 16, 16, 8, 0]))]
    readable = [header] if header else []
    for _ in range(draw(st.integers(0, 2))):
        n = draw(lengths)
        if n:
            readable.append(draw(st.binary(min_size=n, max_size=n)) if n < 64 else bytes([7]) * n)
    if t in (BlkType.DISCARD, BlkType.WRITE_ZEROES) and draw(st.booleans()):
        nseg = draw(st.integers(1, 3))
        readable.append(b"".join(struct.pack("<QII", draw(st.integers(0, CAPACITY + 4)),
                                             draw(st.integers(0, 16)), draw(st.integers(0, 3)))
                                 for _ in range(nseg)))
    writable = [n for n in draw(st.lists(lengths, max_size=3)) if n]
    return readable, writable


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(requests(), min_size=1, max_size=8))
def test_any_request_gets_a_valid_answer_and_bad_ones_change_nothing(batch):
    lab = Lab(nqueues=1, size=64, prepare=lib.vu_blk_prepare_queue)
    blk = lib.vu_blk_new(lib.VU_BLK_BACKEND_RAM)
    try:
        assert lib.vu_blk_set_ram(blk, CAPACITY * 512) == 0
        lim = blk.lim
        lim.capacity = CAPACITY
        lim.max_discard_sectors = lim.max_write_zeroes_sectors = 8
        lim.max_discard_seg = lim.max_write_zeroes_seg = 2
        lim.discard = lim.write_zeroes = True
        vq = lab.vq(0)
        vq.enabled = True
        for readable, writable in batch:
            bufs = []
            for data in readable:
                g = lab.alloc(len(data))
                lab.write(g, data)
                bufs.append((g, len(data), False))
            for n in writable:
                g = lab.alloc(n)
                lab.write(g, b"\xee" * n)
                bufs.append((g, n, True))
            if not bufs:
                continue
            disk_before = bytes(ffi.buffer(blk_ram(blk), CAPACITY * 512))
            head = lab.add_split_chain(0, bufs)
            lab.publish_split(0, [head])
            lab.run_handler(lib.vu_blk_handler, blk)
            if not writable:
                assert vq.broken           # no status byte: only this queue stops
                return
            assert not vq.broken
            used = lab.used_split(0)
            assert [h for h, _ in used] == [head]
            status_gpa, n, _ = bufs[-1]
            status = lab.read(status_gpa + n - 1, 1)[0]
            assert status in (0, 1, 2)
            if status != 0:
                assert bytes(ffi.buffer(blk_ram(blk), CAPACITY * 512)) == disk_before
    finally:
        lib.vu_blk_free(blk)
        lab.close()


def blk_ram(blk):
    return blk.ram
