/* A virtio-blk request: its wire constants, what parsing makes of a chain,
 * and the limits parsing checks it against (virtio 1.4, 5.2.6). No I/O. */
#ifndef VU_BLK_REQUEST_H
#define VU_BLK_REQUEST_H

#include "vu_queue.h"

#define VU_BLK_SECTOR 512
#define VU_BLK_ID_BYTES 20

/* Request types and status values. */
enum {
    VU_BLK_T_IN = 0, VU_BLK_T_OUT = 1, VU_BLK_T_FLUSH = 4, VU_BLK_T_GET_ID = 8,
    VU_BLK_T_GET_LIFETIME = 10, VU_BLK_T_DISCARD = 11, VU_BLK_T_WRITE_ZEROES = 13,
    VU_BLK_T_SECURE_ERASE = 14,
};
enum { VU_BLK_S_OK = 0, VU_BLK_S_IOERR = 1, VU_BLK_S_UNSUPP = 2, VU_BLK_S_PENDING = 255 };

/* Why a request got IOERR/UNSUPP, for logs and tests. */
enum vu_blk_reason {
    VU_BLK_R_NONE = 0, VU_BLK_R_SHORT_HEADER, VU_BLK_R_WRONG_DIRECTION, VU_BLK_R_UNALIGNED_LEN,
    VU_BLK_R_OUT_OF_RANGE, VU_BLK_R_READ_ONLY, VU_BLK_R_UNKNOWN_TYPE, VU_BLK_R_NOT_NEGOTIATED,
    VU_BLK_R_BAD_SEGMENTS, VU_BLK_R_TOO_MANY_SEGMENTS, VU_BLK_R_SEGMENT_TOO_LARGE,
    VU_BLK_R_BAD_FLAGS, VU_BLK_R_IO_FAILED, VU_BLK_R_NO_ID_ROOM, VU_BLK_R_UNALIGNED_SECTOR,
};

struct vu_blk_seg {        /* virtio_blk_discard_write_zeroes */
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

struct vu_blk_dev;

struct vu_blk_req {
    struct vu_blk_dev *dev;   /* whose statistics count it (set by vu_blk_parse) */
    uint64_t start_ns;        /* when it was popped; 0: not timed */
    struct vu_elem *elem;
    uint32_t type;
    uint64_t sector;
    uint64_t data_len;        /* bytes of data (IN/OUT/GET_ID) */
    struct iovec *iov;        /* the data only: no header, no status byte */
    uint32_t niov, iov_cap;
    struct vu_blk_seg *segs;  /* DISCARD / WRITE_ZEROES / SECURE_ERASE, validated */
    uint32_t nsegs, segs_cap;
    uint8_t *status;          /* in guest memory */
    uint8_t result;           /* VU_BLK_S_*; PENDING until executed */
    uint8_t reason;           /* enum vu_blk_reason */
    uint16_t queue;
    uint8_t barrier;          /* the barrier parity it counts in (vu_blk_barrier_begin) */
    struct vu_blk_req *next;  /* in a group waiting for its write-through sync */
};

/* What the device enforces; the control plane updates it under the device lock. */
struct vu_blk_limits {
    uint64_t capacity;                 /* in 512-byte sectors */
    uint32_t max_discard_sectors, max_discard_seg;
    uint32_t max_write_zeroes_sectors, max_write_zeroes_seg;
    uint32_t max_secure_erase_sectors, max_secure_erase_seg;
    bool read_only;
    bool writeback;                    /* config space writeback (WCE) */
    bool discard, write_zeroes, secure_erase;  /* negotiated */
    bool write_zeroes_unmap;
    /* The storage's logical block in sectors (O_DIRECT on a 4096-byte-sector
     * disk: 8): reads and writes start and end on one. 0 means 1. */
    uint32_t block_sectors;
    char serial[VU_BLK_ID_BYTES];
};

/* The logical block in bytes (block_sectors 0 counts as 1). */
static inline uint64_t vu_blk_block_bytes(const struct vu_blk_limits *lim)
{
    return (uint64_t)VU_BLK_SECTOR * (lim->block_sectors > 1 ? lim->block_sectors : 1);
}

/* Parses e into r against lim; `lifetime`: GET_LIFETIME can be answered
 * (only a Python back-end knows it). Returns 0 with r->result PENDING (ready
 * to execute) or final (IOERR/UNSUPP decided), or -VU_ERR_ZERO_CHAIN when
 * the chain has no status byte: the queue must break. */
int vu_blk_request_parse(const struct vu_blk_limits *lim, bool lifetime, struct vu_elem *e,
                         struct vu_blk_req *r);
/* r->iov = the bytes [skip, skip+len) of iov[0..n) (iov may be r->iov). */
int vu_blk_request_slice(struct vu_blk_req *r, const struct iovec *iov, uint32_t n,
                         uint64_t skip, uint64_t len);
/* Frees what parsing allocated (the element's user-area destructor). */
void vu_blk_request_fini(void *req);

#endif
