/* The file engine: an image file or block device, read and written in the
 * queue's worker (reads of cached pages copied from a mapping of the file,
 * vu_filemap.c). Also the synchronous fallback of the io_uring engine. */
#include "vu_blk_engine.h"
#include "vu_dev.h"
#include "vu_fault.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

/* A block device that takes BLKSECDISCARD: the kernel refuses an empty
 * range up front (EOPNOTSUPP) where the device can't erase securely. */
static bool probe_secure_erase(int fd)
{
    struct stat st;
    uint64_t range[2] = {0, 0};
    return fstat(fd, &st) == 0 && S_ISBLK(st.st_mode) && ioctl(fd, BLKSECDISCARD, range) == 0;
}

/* The smallest block O_DIRECT reads here, in sectors: the storage's logical
 * block (a 4096-byte-sector disk refuses 512-byte I/O with EINVAL). Asked
 * by trying, which works on block devices and files alike, in a sandbox
 * too; a read at a block-aligned offset past the end just returns 0. */
static uint32_t probe_direct_block(int fd)
{
    void *buf;
    if (posix_memalign(&buf, 4096, 4096))
        return 1;
    uint32_t bytes = VU_BLK_SECTOR;
    for (; bytes < 4096; bytes *= 2)
        if (pread(fd, buf, bytes, bytes) >= 0 || errno != EINVAL)
            break;
    free(buf);
    return bytes / VU_BLK_SECTOR;
}

int vu_blk_set_file(struct vu_blk_dev *b, int fd, bool direct)
{
    b->fd = fd;
    b->direct = direct;
    b->lim.block_sectors = direct ? probe_direct_block(fd) : 1;
    b->secure_erase = probe_secure_erase(fd);
    vu_filemap_close(&b->map);
    /* O_DIRECT asks to bypass the cache: don't read it through a mapping. */
    int rc = direct ? 0 : vu_filemap_open(&b->map, fd);
    return rc < 0 ? rc : b->map.base != NULL;
}

bool vu_blk_can_secure_erase(struct vu_blk_dev *b)
{
    return b->backend == VU_BLK_BACKEND_RAM ||
           (b->backend == VU_BLK_BACKEND_FILE && b->secure_erase);
}

int vu_blk_file_rw(int fd, struct iovec *iov, uint32_t niov, uint64_t off, bool write_op)
{
    while (niov > 0) {
        ssize_t n = write_op ? pwritev(fd, iov, (int)niov, (off_t)off)
                             : preadv(fd, iov, (int)niov, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;   /* past the end of the file: it shrank under us */
        off += (uint64_t)n;
        while (niov > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            niov--;
        }
        if (niov > 0 && n > 0) {
            /* iov belongs to the request, adjusting it in place is fine:
             * it is not used again after the transfer. */
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

bool vu_blk_iov_aligned(const struct vu_blk_req *r)
{
    uintptr_t mask = (uintptr_t)vu_blk_block_bytes(&r->dev->lim) - 1;
    for (uint32_t i = 0; i < r->niov; i++)
        if (((uintptr_t)r->iov[i].iov_base | r->iov[i].iov_len) & mask)
            return false;
    return true;
}

/* O_DIRECT needs aligned buffers; guest buffers often are not. */
static int file_rw_bounce(int fd, struct vu_blk_req *r, uint64_t off, bool write_op)
{
    void *buf;
    if (posix_memalign(&buf, 4096, r->data_len ? r->data_len : 4096))
        return -ENOMEM;
    int rc = 0;
    struct iovec one = {buf, r->data_len};
    uint8_t *p = buf;
    if (write_op) {
        for (uint32_t i = 0; i < r->niov; i++) {
            memcpy(p, r->iov[i].iov_base, r->iov[i].iov_len);
            p += r->iov[i].iov_len;
        }
        rc = vu_blk_file_rw(fd, &one, 1, off, true);
    } else {
        rc = vu_blk_file_rw(fd, &one, 1, off, false);
        for (uint32_t i = 0; rc == 0 && i < r->niov; i++) {
            memcpy(r->iov[i].iov_base, p, r->iov[i].iov_len);
            p += r->iov[i].iov_len;
        }
    }
    free(buf);
    return rc;
}

static int file_write_zeroes_slow(int fd, uint64_t off, uint64_t len)
{
    static const uint8_t zeroes[65536] __attribute__((aligned(4096)));
    while (len > 0) {
        size_t chunk = len < sizeof(zeroes) ? (size_t)len : sizeof(zeroes);
        struct iovec iov = {(void *)zeroes, chunk};
        int rc = vu_blk_file_rw(fd, &iov, 1, off, true);
        if (rc)
            return rc;
        off += chunk;
        len -= chunk;
    }
    return 0;
}

static int file_zero(struct vu_blk_dev *b, uint64_t off, uint64_t len, bool unmap)
{
    vu_filemap_punching(&b->map, off, len);
    vu_filemap_written(&b->map, off, len);
    if (unmap && b->punch_hole &&
        fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    if (fallocate(b->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    /* No zero-range support here (tmpfs, some block devices): write them. */
    return file_write_zeroes_slow(b->fd, off, len);
}

static int file_discard(struct vu_blk_dev *b, uint64_t off, uint64_t len)
{
    if (!b->punch_hole)
        return 0;
    vu_filemap_punching(&b->map, off, len);
    if (fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0) {
        if (errno == EOPNOTSUPP || errno == ENOSYS) {
            b->punch_hole = false;   /* discard is a hint: dropping it is allowed */
            return 0;
        }
        return -errno;
    }
    return 0;
}

static int file_segments(struct vu_blk_dev *b, struct vu_blk_req *r)
{
    for (uint32_t i = 0; i < r->nsegs; i++) {
        uint64_t off = r->segs[i].sector * VU_BLK_SECTOR;
        uint64_t len = (uint64_t)r->segs[i].num_sectors * VU_BLK_SECTOR;
        int rc = 0;
        if (len == 0)
            continue;
        if (r->type == VU_BLK_T_DISCARD) {
            rc = file_discard(b, off, len);
        } else if (r->type == VU_BLK_T_WRITE_ZEROES) {
            rc = file_zero(b, off, len, (r->segs[i].flags & 1) && b->lim.write_zeroes_unmap);
        } else {
            /* Only offered for block devices that erase for real. */
            uint64_t range[2] = {off, len};
            vu_filemap_written(&b->map, off, len);
            rc = ioctl(b->fd, BLKSECDISCARD, range) < 0 ? -errno : 0;
        }
        if (rc)
            return rc;
    }
    return 0;
}

/* The I/O of a request, without making it stable (the group commit does);
 * through the mapping first when via_map. */
void vu_blk_file_io(struct vu_blk_dev *b, struct vu_blk_req *r, bool via_map)
{
    uint64_t off = r->sector * VU_BLK_SECTOR;
    int rc = 0;
    switch (r->type) {
    case VU_BLK_T_IN:
        if (via_map && vu_filemap_read(&b->map, r->iov, r->niov, off, r->data_len) == 0)
            ;   /* copied from the page cache through the mapping */
        else if (b->direct && !vu_blk_iov_aligned(r))
            rc = file_rw_bounce(b->fd, r, off, false);
        else
            rc = vu_blk_file_rw(b->fd, r->iov, r->niov, off, false);
        break;
    case VU_BLK_T_OUT:
        if (via_map && vu_filemap_write(&b->map, r->iov, r->niov, off, r->data_len) == 0)
            ;   /* copied into the page cache through the mapping */
        else if (b->direct && !vu_blk_iov_aligned(r))
            rc = file_rw_bounce(b->fd, r, off, true);
        else
            rc = vu_blk_file_rw(b->fd, r->iov, r->niov, off, true);
        if (rc == 0)
            vu_filemap_written(&b->map, off, r->data_len);
        break;
    case VU_BLK_T_FLUSH:
        rc = vu_blk_sync(b, r->queue);
        break;
    case VU_BLK_T_DISCARD:
    case VU_BLK_T_WRITE_ZEROES:
    case VU_BLK_T_SECURE_ERASE:
        rc = file_segments(b, r);
        break;
    default:
        r->result = VU_BLK_S_UNSUPP;
        return;
    }
    r->result = rc ? VU_BLK_S_IOERR : VU_BLK_S_OK;
    if (rc)
        r->reason = VU_BLK_R_IO_FAILED;
}

/* Storage that stops answering --------------------------------------------------
 *
 * What may wait in the kernel for the storage (a write into a frozen file
 * system, a fault on its pages, anything on a dying disk) runs without the
 * device lock, which the queue's worker holds while its handler runs: the
 * control plane takes that lock to stop or reset a ring, change the memory
 * table or end the session, and must not wait for storage that may never
 * answer. Such a request is held until the end of the handler's round and
 * done there with the lock dropped, as the Python engine runs its batch
 * (vu_blk_python.c). Meanwhile it holds its element and guest memory
 * (detached if the front-end takes it back); the file and its mapping live
 * as long as the device, which is freed only after the workers stop. Under
 * the lock again it completes through the ring as the ring is by then (a
 * stopped ring holds the answer until it starts again), and the handler
 * looks at the ring's state again. Only a copy that can't wait for storage,
 * from resident pages or into an image in memory, is done at once. */

_Static_assert(VU_BLK_ROUND <= VU_BLK_PY_BATCH_MAX, "a round's held requests fit b->round");

bool vu_blk_file_copy(struct vu_blk_dev *b, struct vu_blk_req *r)
{
    uint64_t off = r->sector * VU_BLK_SECTOR;
    if (r->type == VU_BLK_T_IN) {
        if (vu_filemap_read(&b->map, r->iov, r->niov, off, r->data_len))
            return false;
    } else if (r->type == VU_BLK_T_OUT && b->map.in_memory) {
        if (vu_filemap_write(&b->map, r->iov, r->niov, off, r->data_len))
            return false;
        vu_filemap_written(&b->map, off, r->data_len);
    } else {
        return false;
    }
    r->result = VU_BLK_S_OK;
    return true;
}

void vu_blk_file_hold(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *r)
{
    uint32_t q = vq->index % VU_BLK_MAX_QUEUES;
    b->round[q][b->round_len[q]++] = r;   /* at most VU_BLK_ROUND: the file engines' round */
}

/* Whether a queued io_uring entry may still start: a request orphaned since
 * it was queued (the device lock was dropped meanwhile) must not, for the
 * reason run_held gives. A group's sync always may. */
static bool may_start(uint64_t tag)
{
    if (tag & VU_BLK_TAG_GROUP)
        return true;
    return !vu_vq_orphaned(((struct vu_blk_req *)(uintptr_t)tag)->elem);
}

/* Submits what u has queued; an orphan's entry goes as a no-op, whose
 * completion only releases it (apply_cqe does not redo its I/O). */
static void submit_queued(struct vu_uring *u)
{
    vu_uring_void_queued(u, may_start);
    vu_uring_submit(u);
}

int vu_blk_file_run_held(struct vu_blk_dev *b, struct vu_vq *vq, vu_blk_held_io_fn io,
                         struct vu_uring *u, bool *sent)
{
    uint32_t q = vq->index % VU_BLK_MAX_QUEUES;
    int n = b->round_len[q];
    if (sent)
        *sent = false;
    if (!n && !(u && u->queued))
        return 0;
    b->round_len[q] = 0;
    /* Only this queue's worker uses the array and the ring: they stay as
     * they are unlocked. */
    struct vu_blk_req **held = b->round[q];
    vu_dev_unlock(vq->dev);
    if (__builtin_expect(vu_fault_round_unlocked != NULL, 0))
        vu_fault_round_unlocked();
    /* io_uring_enter too: a kernel may wait in it for a frozen file
     * system's write protection. The round's misses go to the storage
     * first, while the held I/O runs. */
    bool submitted = u && u->queued;
    if (submitted)
        submit_queued(u);
    for (int i = 0; i < n; i++) {
        struct vu_blk_req *r = held[i];
        if (vu_vq_orphaned(r->elem)) {
            /* A reset or disconnect gave up waiting for it (an earlier one
             * blocked), and the front-end may resubmit it: started now, it
             * could land after that, or after a newer write to the same
             * blocks. Completing it only releases it. */
            r->result = VU_BLK_S_IOERR;
            r->reason = VU_BLK_R_IO_FAILED;
            continue;
        }
        io(b, vq, r);
    }
    if (u && u->queued) {
        submit_queued(u);   /* held writes that missed */
        submitted = true;
    }
    vu_dev_rdlock(vq->dev);
    if (sent)
        *sent = submitted;
    int done = 0;
    uint64_t now = vu_now_ns();
    for (int i = 0; i < n; i++) {
        struct vu_blk_req *r = held[i];
        if (r->result == VU_BLK_S_PENDING || vu_blk_stable_hold(b, q, r))
            continue;   /* in io_uring now, or completes after its group's sync */
        vu_blk_complete(vq, r, r->result, false, now);
        done++;
    }
    return done;
}

/* The first lines of a read's source in the mapping: the copy's first load
 * otherwise waits for a TLB walk and a cache miss (38% of its samples on a
 * 1 GiB image, bench/POLLED.md). A prefetch never faults, so a page not in
 * memory costs nothing here; the bounds keep it inside the mapping anyway. */
void vu_blk_file_prefetch(const struct vu_blk_dev *b, const struct vu_blk_req *r)
{
    const struct vu_filemap *m = &b->map;
    uint64_t off = r->sector * VU_BLK_SECTOR;
    if (r->type != VU_BLK_T_IN || !m->base || off >= m->len || r->data_len == 0)
        return;
    /* Two lines: the page walk and the start of the hardware's stream. A
     * whole 4 KiB page of prefetches measured no faster (they queue behind
     * the copy running meanwhile). */
    const uint8_t *src = m->base + off;
    __builtin_prefetch(src, 0, 3);
    if (r->data_len > 64 && m->len - off > 64)
        __builtin_prefetch(src + 64, 0, 3);
}

/* A held request of the file engine: reads tried the mapping already, and
 * so did writes into an image in memory. */
static void file_held_io(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *r)
{
    (void)vq;
    vu_blk_file_io(b, r, r->type == VU_BLK_T_OUT && !b->map.in_memory);
}

static enum vu_blk_start file_start(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *r)
{
    if (vu_blk_file_copy(b, r))
        return VU_BLK_DONE;
    vu_blk_file_hold(b, vq, r);
    return VU_BLK_TAKEN;
}

/* The round's held I/O, then one fdatasync for its write-through writes. */
static int file_end_round(struct vu_blk_dev *b, struct vu_vq *vq)
{
    int done = vu_blk_file_run_held(b, vq, file_held_io, NULL, NULL);
    return done + vu_blk_stable_commit(b, vq, NULL);
}

const struct vu_blk_engine vu_blk_file_engine = {
    .start = file_start,
    .prefetch = vu_blk_file_prefetch,
    .end_round = file_end_round,
};
