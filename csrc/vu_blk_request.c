/* virtio-blk request parsing: from a descriptor chain to a validated
 * request, with no I/O.
 *
 * Parsing trusts nothing in the chain: the header may be split across
 * buffers, lengths may overflow, data may point the wrong way. Every such
 * request gets IOERR or UNSUPP as the virtio spec says and the queue goes on;
 * only a chain without room for the status byte breaks the queue, since
 * there is no way to answer it. */
#include "vu_blk_request.h"
#include "vu_iov.h"

#include <stdlib.h>
#include <string.h>

#define HDR_LEN 16    /* struct virtio_blk_outhdr */
#define SEG_LEN 16    /* struct virtio_blk_discard_write_zeroes */
#define MAX_SEGS 256

void vu_blk_request_fini(void *req)
{
    struct vu_blk_req *r = req;
    free(r->iov);
    free(r->segs);
}

int vu_blk_request_slice(struct vu_blk_req *r, const struct iovec *iov, uint32_t n,
                         uint64_t skip, uint64_t len)
{
    if (r->iov_cap < n) {
        /* iov may be r->iov itself: realloc keeps its contents. */
        struct iovec *p = realloc(r->iov, n * sizeof(*p));
        if (!p)
            return -VU_ERR_NOMEM;
        if (iov == r->iov)
            iov = p;
        r->iov = p;
        r->iov_cap = n;
    }
    r->niov = vu_iov_slice(r->iov, iov, n, skip, len);
    return 0;
}

static int fail(struct vu_blk_req *r, uint8_t status, uint8_t reason)
{
    r->result = status;
    r->reason = reason;
    return 0;
}

/* A read or write of `bytes` at `sector` in whole logical blocks: 0, or the
 * reason it is not. */
static int block_misfit(const struct vu_blk_limits *lim, uint64_t sector, uint64_t bytes)
{
    /* a power of two (vu_blk_file.c probes 1, 2, 4 or 8): masks, no division */
    uint64_t block = vu_blk_block_bytes(lim);
    if (bytes & (block - 1))
        return VU_BLK_R_UNALIGNED_LEN;
    return sector & (block / VU_BLK_SECTOR - 1) ? VU_BLK_R_UNALIGNED_SECTOR : 0;
}

/* sector + nsectors within capacity, without overflow. */
static bool in_range(const struct vu_blk_limits *lim, uint64_t sector, uint64_t nsectors)
{
    return sector <= lim->capacity && nsectors <= lim->capacity - sector;
}

static int parse_segments(const struct vu_blk_limits *lim, struct vu_elem *e,
                          struct vu_blk_req *r)
{
    uint32_t max_seg, max_sectors;
    uint32_t allowed_flags = 0;
    bool negotiated;
    switch (r->type) {
    case VU_BLK_T_DISCARD:
        negotiated = lim->discard;
        max_seg = lim->max_discard_seg;
        max_sectors = lim->max_discard_sectors;
        break;
    case VU_BLK_T_WRITE_ZEROES:
        negotiated = lim->write_zeroes;
        max_seg = lim->max_write_zeroes_seg;
        max_sectors = lim->max_write_zeroes_sectors;
        allowed_flags = 1;  /* VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP */
        break;
    default:
        negotiated = lim->secure_erase;
        max_seg = lim->max_secure_erase_seg;
        max_sectors = lim->max_secure_erase_sectors;
        break;
    }
    if (!negotiated)
        return fail(r, VU_BLK_S_UNSUPP, VU_BLK_R_NOT_NEGOTIATED);
    if (lim->read_only)
        return fail(r, VU_BLK_S_IOERR, VU_BLK_R_READ_ONLY);
    if (e->in_len != 1)
        return fail(r, VU_BLK_S_IOERR, VU_BLK_R_WRONG_DIRECTION);
    uint64_t data = e->out_len - HDR_LEN;
    if (data == 0 || data % SEG_LEN)
        return fail(r, VU_BLK_S_IOERR, VU_BLK_R_BAD_SEGMENTS);
    uint64_t nsegs = data / SEG_LEN;
    if (nsegs > max_seg || nsegs > MAX_SEGS)
        return fail(r, VU_BLK_S_IOERR, VU_BLK_R_TOO_MANY_SEGMENTS);
    if (r->segs_cap < nsegs) {
        struct vu_blk_seg *p = realloc(r->segs, nsegs * sizeof(*p));
        if (!p)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_IO_FAILED);
        r->segs = p;
        r->segs_cap = (uint32_t)nsegs;
    }
    r->nsegs = (uint32_t)nsegs;
    for (uint32_t i = 0; i < nsegs; i++) {
        struct vu_blk_seg *s = &r->segs[i];
        vu_iov_gather(e->iov, e->out_num, HDR_LEN + (uint64_t)i * SEG_LEN, s, SEG_LEN);
        if (s->flags & ~allowed_flags)
            return fail(r, VU_BLK_S_UNSUPP, VU_BLK_R_BAD_FLAGS);
        if (s->num_sectors > max_sectors)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_SEGMENT_TOO_LARGE);
        if (!in_range(lim, s->sector, s->num_sectors))
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_OUT_OF_RANGE);
    }
    return 0;
}

/* The data buffers [skip, skip+len) of iov: IOERR when they can't be held. */
static int take_data(struct vu_blk_req *r, const struct iovec *iov, uint32_t n, uint64_t skip,
                     uint64_t len)
{
    r->data_len = len;
    return vu_blk_request_slice(r, iov, n, skip, len) ? fail(r, VU_BLK_S_IOERR, VU_BLK_R_IO_FAILED)
                                                      : 0;
}

int vu_blk_request_parse(const struct vu_blk_limits *lim, bool lifetime, struct vu_elem *e,
                         struct vu_blk_req *r)
{
    r->start_ns = 0;
    r->elem = e;
    r->result = VU_BLK_S_PENDING;
    r->reason = VU_BLK_R_NONE;
    r->niov = 0;
    r->nsegs = 0;
    r->data_len = 0;
    r->type = UINT32_MAX;
    r->sector = 0;

    /* The status byte is the last byte the driver lets us write. */
    if (e->in_len == 0)
        return -VU_ERR_ZERO_CHAIN;
    struct iovec *last = &e->iov[e->out_num + e->in_num - 1];
    r->status = (uint8_t *)last->iov_base + last->iov_len - 1;

    uint8_t hdr[HDR_LEN];
    if (e->out_len < HDR_LEN || !vu_iov_gather(e->iov, e->out_num, 0, hdr, HDR_LEN))
        return fail(r, VU_BLK_S_IOERR, VU_BLK_R_SHORT_HEADER);
    memcpy(&r->type, hdr, 4);
    memcpy(&r->sector, hdr + 8, 8);

    uint64_t readable = e->out_len - HDR_LEN;   /* data the driver sent */
    uint64_t writable = e->in_len - 1;          /* room for data we return */
    struct iovec *in_iov = e->iov + e->out_num;
    int misfit;

    switch (r->type) {
    case VU_BLK_T_IN:
        if (readable)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_WRONG_DIRECTION);
        if ((misfit = block_misfit(lim, r->sector, writable)))
            return fail(r, VU_BLK_S_IOERR, misfit);
        if (!in_range(lim, r->sector, writable / VU_BLK_SECTOR))
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_OUT_OF_RANGE);
        return take_data(r, in_iov, e->in_num, 0, writable);
    case VU_BLK_T_OUT:
        if (lim->read_only)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_READ_ONLY);
        if (writable)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_WRONG_DIRECTION);
        if ((misfit = block_misfit(lim, r->sector, readable)))
            return fail(r, VU_BLK_S_IOERR, misfit);
        if (!in_range(lim, r->sector, readable / VU_BLK_SECTOR))
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_OUT_OF_RANGE);
        return take_data(r, e->iov, e->out_num, HDR_LEN, readable);
    case VU_BLK_T_FLUSH:
        return 0;
    case VU_BLK_T_GET_ID:
        if (writable == 0)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_NO_ID_ROOM);
        return take_data(r, in_iov, e->in_num, 0,
                         writable < VU_BLK_ID_BYTES ? writable : VU_BLK_ID_BYTES);
    case VU_BLK_T_DISCARD:
    case VU_BLK_T_WRITE_ZEROES:
    case VU_BLK_T_SECURE_ERASE:
        return parse_segments(lim, e, r);
    case VU_BLK_T_GET_LIFETIME:
        if (!lifetime)
            return fail(r, VU_BLK_S_UNSUPP, VU_BLK_R_NOT_NEGOTIATED);
        if (writable < 6)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_NO_ID_ROOM);
        return take_data(r, in_iov, e->in_num, 0, 6);
    default:
        return fail(r, VU_BLK_S_UNSUPP, VU_BLK_R_UNKNOWN_TYPE);
    }
}
