/* The RAM engine: the disk is an anonymous mapping of ours; every request
 * is a copy, done in the queue's worker. */
#include "vu_blk_engine.h"

#include <string.h>
#include <sys/mman.h>

int vu_blk_set_ram(struct vu_blk_dev *b, uint64_t size)
{
    if (size == 0 || size % VU_BLK_SECTOR)
        return -VU_ERR_INVAL;
    /* Anonymous and untouched: only written sectors cost memory. */
    void *p = b->ram ? mremap(b->ram, b->ram_size, size, MREMAP_MAYMOVE)
                     : mmap(NULL, size, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return -VU_ERR_NOMEM;
    b->ram = p;
    b->ram_size = size;
    return 0;
}

void vu_blk_ram_close(struct vu_blk_dev *b)
{
    if (b->ram)
        munmap(b->ram, b->ram_size);
    b->ram = NULL;
}

static void copy_iov(struct vu_blk_req *r, uint8_t *disk, bool to_guest)
{
    for (uint32_t i = 0; i < r->niov; i++) {
        if (to_guest)
            memcpy(r->iov[i].iov_base, disk, r->iov[i].iov_len);
        else
            memcpy(disk, r->iov[i].iov_base, r->iov[i].iov_len);
        disk += r->iov[i].iov_len;
    }
}

void vu_blk_ram_io(struct vu_blk_dev *b, struct vu_blk_req *r)
{
    uint64_t off = r->sector * VU_BLK_SECTOR;
    switch (r->type) {
    case VU_BLK_T_IN:
        copy_iov(r, b->ram + off, true);
        break;
    case VU_BLK_T_OUT:
        copy_iov(r, b->ram + off, false);
        break;
    case VU_BLK_T_FLUSH:
        break;   /* nothing is ever cached on the way to memory */
    case VU_BLK_T_DISCARD:
    case VU_BLK_T_WRITE_ZEROES:
    case VU_BLK_T_SECURE_ERASE:
        /* Overwriting our own memory erases it, securely too. */
        for (uint32_t i = 0; i < r->nsegs; i++)
            memset(b->ram + r->segs[i].sector * VU_BLK_SECTOR, 0,
                   (uint64_t)r->segs[i].num_sectors * VU_BLK_SECTOR);
        break;
    default:
        r->result = VU_BLK_S_UNSUPP;
        return;
    }
    r->result = VU_BLK_S_OK;
}

static enum vu_blk_start ram_start(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *r)
{
    (void)vq;
    vu_blk_ram_io(b, r);
    return VU_BLK_DONE;
}

const struct vu_blk_engine vu_blk_ram_engine = {
    .start = ram_start,
};
