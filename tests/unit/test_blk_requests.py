"""virtio-blk request handling in C (csrc/vu_blk_request.c and the engines) against hostile chains,
virtio 1.4 5.2.6: each bad request gets IOERR or UNSUPP as the spec says and
the queue goes on; only a chain with no room for the status byte breaks it."""
import struct

import pytest

from vhostuser.blk.spec import OUTHDR, BlkStatus, BlkType
from vhostuser.native import ffi, lib
from vhostuser_devkit.ringlab import Lab

S = BlkStatus
T = BlkType
CAPACITY = 2048   # sectors (1 MiB)


@pytest.fixture
def lab():
    lab = Lab(nqueues=1, size=64, prepare=lib.vu_blk_prepare_queue)
    yield lab
    lab.close()


@pytest.fixture
def blk():
    b = lib.vu_blk_new(lib.VU_BLK_BACKEND_RAM)
    assert lib.vu_blk_set_ram(b, CAPACITY * 512) == 0
    lim = b.lim
    lim.capacity = CAPACITY
    lim.max_discard_sectors = lim.max_write_zeroes_sectors = 256
    lim.max_discard_seg = lim.max_write_zeroes_seg = 4
    lim.discard = lim.write_zeroes = True
    lim.writeback = True
    ffi.memmove(lim.serial, b"serial-123".ljust(20, b"\0"), 20)
    yield b
    lib.vu_blk_free(b)


def submit(lab, blk, chain):
    """chain: list of (bytes or int length, writable). Returns (rc, req, status gpa)."""
    bufs = []
    status_gpa = None
    for part, writable in chain:
        length = part if isinstance(part, int) else len(part)
        gpa = lab.alloc(max(length, 1))
        if not isinstance(part, int):
            lab.write(gpa, part)
        bufs.append((gpa, length, writable))
        if writable:
            status_gpa = gpa + length - 1
    head = lab.add_split_chain(0, bufs)
    lab.publish_split(0, [head])
    rc, e = lab.pop(0)
    assert rc == 1
    req = ffi.new("struct vu_blk_req *")
    rc = lib.vu_blk_parse(blk, e, req)
    return rc, req, e, status_gpa, bufs


def run(lab, blk, chain):
    rc, req, e, status_gpa, bufs = submit(lab, blk, chain)
    assert rc == 0
    if req.result == lib.VU_BLK_S_PENDING:
        lib.vu_blk_execute(blk, req)
    assert lib.vu_blk_finish(lab.vq(0), req, req.result, False) == 0
    status = lab.read(status_gpa, 1)[0]
    return status, req, bufs


def hdr(t, sector=0):
    return OUTHDR.pack(t, 0, sector)


def test_write_then_read_round_trip(lab, blk):
    data = bytes(range(256)) * 4
    status, _, _ = run(lab, blk, [(hdr(T.OUT, 10), False), (data, False), (1, True)])
    assert status == S.OK
    status, _, bufs = run(lab, blk, [(hdr(T.IN, 10), False), (1024, True), (1, True)])
    assert status == S.OK
    assert lab.read(bufs[1][0], 1024) == data


def test_header_split_across_buffers_is_reassembled(lab, blk):
    h = hdr(T.OUT, 3)
    status, req, _ = run(lab, blk, [(h[:5], False), (h[5:], False), (b"z" * 512, False), (1, True)])
    assert status == S.OK and req.sector == 3 and req.data_len == 512


def test_status_shares_the_last_buffer_with_data(lab, blk):
    status, req, bufs = run(lab, blk, [(hdr(T.IN, 0), False), (513, True)])
    assert status == S.OK and req.data_len == 512


@pytest.mark.parametrize("sector,nbytes", [(CAPACITY, 512), (CAPACITY - 1, 1024),
                                            (2**64 - 1, 512), (2**63, 4096), (2**55 - 1, 1024)])
def test_past_the_end_and_overflowing_sectors_get_ioerr(lab, blk, sector, nbytes):
    status, req, _ = run(lab, blk, [(hdr(T.IN, sector), False), (nbytes, True), (1, True)])
    assert status == S.IOERR and req.reason == lib.VU_BLK_R_OUT_OF_RANGE


def test_short_header_gets_ioerr(lab, blk):
    status, req, _ = run(lab, blk, [(b"\0" * 8, False), (1, True)])
    assert status == S.IOERR and req.reason == lib.VU_BLK_R_SHORT_HEADER


def test_read_with_driver_data_is_wrong_direction(lab, blk):
    status, req, _ = run(lab, blk, [(hdr(T.IN) + b"x" * 512, False), (513, True)])
    assert status == S.IOERR and req.reason == lib.VU_BLK_R_WRONG_DIRECTION


def test_write_with_writable_data_is_wrong_direction(lab, blk):
    status, req, _ = run(lab, blk, [(hdr(T.OUT), False), (513, True)])
    assert status == S.IOERR and req.reason == lib.VU_BLK_R_WRONG_DIRECTION


def test_unaligned_length_gets_ioerr(lab, blk):
    status, req, _ = run(lab, blk, [(hdr(T.OUT), False), (b"x" * 100, False), (1, True)])
    assert status == S.IOERR and req.reason == lib.VU_BLK_R_UNALIGNED_LEN


@pytest.mark.parametrize("t", [2, 3, 5, 9, 12, 15, 16, 0x80000000, 0xFFFFFFFF])
def test_unknown_types_get_unsupp(lab, blk, t):
    status, _, _ = run(lab, blk, [(hdr(t), False), (1, True)])
    assert status == S.UNSUPP


def test_get_lifetime_is_unsupported_for_c_backends(lab, blk):
    status, _, _ = run(lab, blk, [(hdr(T.GET_LIFETIME), False), (7, True)])
    assert status == S.UNSUPP


def test_get_id_writes_serial(lab, blk):
    status, _, bufs = run(lab, blk, [(hdr(T.GET_ID), False), (20, True), (1, True)])
    assert status == S.OK
    assert lab.read(bufs[1][0], 20) == b"serial-123".ljust(20, b"\0")


def seg(sector, n, flags=0):
    return struct.pack("<QII", sector, n, flags)


def test_discard_with_unmap_flag_is_unsupp(lab, blk):
    status, req, _ = run(lab, blk, [(hdr(T.DISCARD) + seg(0, 8, 1), False), (1, True)])
    assert status == S.UNSUPP and req.reason == lib.VU_BLK_R_BAD_FLAGS


def test_write_zeroes_reserved_flags_are_unsupp(lab, blk):
    status, _, _ = run(lab, blk, [(hdr(T.WRITE_ZEROES) + seg(0, 8, 2), False), (1, True)])
    assert status == S.UNSUPP


def test_write_zeroes_several_segments_zero_the_data(lab, blk):
    run(lab, blk, [(hdr(T.OUT, 0), False), (b"\xff" * 4096, False), (1, True)])
    status, _, _ = run(lab, blk, [(hdr(T.WRITE_ZEROES) + seg(0, 1) + seg(4, 2, 1), False),
                                  (1, True)])
    assert status == S.OK
    _, _, bufs = run(lab, blk, [(hdr(T.IN, 0), False), (4096, True), (1, True)])
    got = lab.read(bufs[1][0], 4096)
    assert got[:512] == bytes(512) and got[512:2048] == b"\xff" * 1536
    assert got[2048:3072] == bytes(1024) and got[3072:] == b"\xff" * 1024


def test_discard_limits(lab, blk):
    too_many = b"".join(seg(i, 1) for i in range(5))
    status, req, _ = run(lab, blk, [(hdr(T.DISCARD) + too_many, False), (1, True)])
    assert status == S.IOERR and req.reason == lib.VU_BLK_R_TOO_MANY_SEGMENTS
    status, req, _ = run(lab, blk, [(hdr(T.DISCARD) + seg(0, 257), False), (1, True)])
    assert status == S.IOERR and req.reason == lib.VU_BLK_R_SEGMENT_TOO_LARGE
    status, req, _ = run(lab, blk, [(hdr(T.DISCARD) + seg(CAPACITY - 1, 2), False), (1, True)])
    assert status == S.IOERR and req.reason == lib.VU_BLK_R_OUT_OF_RANGE
    status, req, _ = run(lab, blk, [(hdr(T.DISCARD) + b"\0" * 15, False), (1, True)])
    assert status == S.IOERR and req.reason == lib.VU_BLK_R_BAD_SEGMENTS


def test_discard_not_negotiated_is_unsupp(lab, blk):
    blk.lim.discard = False
    status, _, _ = run(lab, blk, [(hdr(T.DISCARD) + seg(0, 8), False), (1, True)])
    assert status == S.UNSUPP


def test_read_only_refuses_every_write(lab, blk):
    blk.lim.read_only = True
    for chain in ([(hdr(T.OUT), False), (b"x" * 512, False), (1, True)],
                  [(hdr(T.WRITE_ZEROES) + seg(0, 1), False), (1, True)],
                  [(hdr(T.DISCARD) + seg(0, 1), False), (1, True)]):
        status, req, _ = run(lab, blk, chain)
        assert status == S.IOERR and req.reason == lib.VU_BLK_R_READ_ONLY
    status, _, _ = run(lab, blk, [(hdr(T.IN), False), (512, True), (1, True)])
    assert status == S.OK


def test_chain_without_status_byte_cannot_be_answered(lab, blk):
    rc, req, _, _, _ = submit(lab, blk, [(hdr(T.IN), False)])
    assert rc == -lib.VU_ERR_ZERO_CHAIN


def test_handler_breaks_only_on_missing_status_and_serves_after_reset(lab, blk):
    # The queue handler run over a batch: good, bad-but-answerable,
    # unanswerable, then a good one that was popped in the same burst as the
    # unanswerable one and must go back on the ring, not stay in flight.
    vq = lab.vq(0)
    vq.enabled = True
    chains = [[(hdr(T.IN), False), (513, True)],
              [(hdr(77), False), (1, True)],
              [(hdr(T.OUT), False)],
              [(hdr(T.IN), False), (513, True)]]
    heads = []
    status_gpas = []
    for chain in chains:
        bufs = []
        for part, writable in chain:
            length = part if isinstance(part, int) else len(part)
            gpa = lab.alloc(length)
            if not isinstance(part, int):
                lab.write(gpa, part)
            bufs.append((gpa, length, writable))
        status_gpas.append(bufs[-1][0] + bufs[-1][1] - 1 if bufs[-1][2] else None)
        heads.append(lab.add_split_chain(0, bufs))
    lab.write(status_gpas[3], b"\xee")
    lab.publish_split(0, heads)
    lab.run_handler(lib.vu_blk_handler, blk)
    assert lab.read(status_gpas[0], 1)[0] == S.OK
    assert lab.read(status_gpas[1], 1)[0] == S.UNSUPP
    assert vq.broken and vq.error == lib.VU_ERR_ZERO_CHAIN
    assert [h for h, _ in lab.used_split(0)] == heads[:2]
    assert lab.read(status_gpas[3], 1)[0] == 0xEE       # never touched
    assert lib.vu_vq_inflight(vq) == 0
    assert vq.last_avail_idx == 3                         # the good one is still to pop


@pytest.mark.parametrize("writeback", [True, False])
def test_file_backend_through_io_uring_keeps_many_requests_in_flight(lab, tmp_path, writeback):
    import os
    import time
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * CAPACITY * 512)
    fd = os.open(image, os.O_RDWR)
    b = lib.vu_blk_new(lib.VU_BLK_BACKEND_FILE)
    try:
        lib.vu_blk_set_file(b, fd, False)
        if lib.vu_blk_set_uring(b, True) < 0:
            pytest.skip("io_uring not available on this kernel")
        # this test is about the io_uring path itself
        assert lib.vu_blk_set_io_path(b, lib.VU_BLK_IO_URING, lib.VU_BLK_IO_URING) == 0
        b.lim.capacity = CAPACITY
        b.lim.writeback = writeback
        vq = lab.vq(0)
        vq.enabled = True
        heads, status_gpas = [], []
        for i in range(16):   # 16 writes of distinct sectors in one batch
            h = lab.alloc(16)
            lab.write(h, hdr(T.OUT, i * 8))
            d = lab.alloc(4096)
            lab.write(d, bytes([i + 1]) * 4096)
            s = lab.alloc(1)
            heads.append(lab.add_split_chain(0, [(h, 16, False), (d, 4096, False), (s, 1, True)]))
            status_gpas.append(s)
        lab.publish_split(0, heads)
        lab.run_handler(lib.vu_blk_handler, b)
        # All submitted in one go and none waited for: what is not in flight
        # any more io_uring finished before the round ended (the handler
        # answers those at once; under ASan's slower worker that is often
        # most of them).
        completed = lab.used_split(0)
        assert lib.vu_vq_inflight(vq) + len(completed) == 16
        assert b.stats[0].writes == len(completed)
        deadline = time.monotonic() + 10
        while len(completed) < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
            lab.run_handler(lib.vu_blk_handler, b)
            completed += lab.used_split(0)
        assert sorted(h for h, _ in completed) == sorted(heads)
        assert all(lab.read(s, 1)[0] == S.OK for s in status_gpas)
        data = image.read_bytes()
        for i in range(16):
            assert data[i * 4096:(i + 1) * 4096] == bytes([i + 1]) * 4096
        assert b.stats[0].writes == 16
    finally:
        lib.vu_blk_free(b)
        os.close(fd)


def test_unanswerable_chain_does_not_stay_in_flight(lab, blk):
    # Found by vhostuser-fuzz: GET_VRING_BASE used to wait 30 s for it.
    vq = lab.vq(0)
    vq.enabled = True
    h = lab.alloc(16)
    lab.write(h, hdr(T.IN))
    lab.publish_split(0, [lab.add_split_chain(0, [(h, 16, False)])])
    lab.run_handler(lib.vu_blk_handler, blk)
    assert vq.broken and lib.vu_vq_inflight(vq) == 0


def test_page_cache_hits_complete_inline_without_io_uring(lab, tmp_path):
    import os
    image = tmp_path / "cached.img"
    image.write_bytes(bytes(range(256)) * (CAPACITY * 2))   # in the page cache now
    fd = os.open(image, os.O_RDWR)
    b = lib.vu_blk_new(lib.VU_BLK_BACKEND_FILE)
    try:
        lib.vu_blk_set_file(b, fd, False)
        if lib.vu_blk_set_uring(b, True) < 0:
            pytest.skip("io_uring not available on this kernel")
        b.lim.capacity = CAPACITY
        status, _, bufs = run_handler_read(lab, b, sector=3)
        assert status == S.OK
        assert lab.read(bufs[1][0], 512) == (bytes(range(256)) * 2)
        assert lib.vu_vq_inflight(lab.vq(0)) == 0     # answered in the same call
    finally:
        lib.vu_blk_free(b)
        os.close(fd)


def run_handler_read(lab, b, sector):
    vq = lab.vq(0)
    vq.enabled = True
    bufs = [(lab.alloc(16), 16, False), (lab.alloc(512), 512, True), (lab.alloc(1), 1, True)]
    lab.write(bufs[0][0], hdr(T.IN, sector))
    lab.publish_split(0, [lab.add_split_chain(0, bufs)])
    lab.run_handler(lib.vu_blk_handler, b)
    return lab.read(bufs[2][0], 1)[0], None, bufs
