/* The io_uring engine: the file back-end with a ring per queue for what
 * would block the worker (page-cache misses, O_DIRECT, FLUSH and the
 * write-through group's sync). What can be done at once is done in the
 * worker by the file engine's code.
 *
 * Choosing the I/O path ---------------------------------------------------------
 *
 * Where the image lives decides what is fastest (bench/RESULTS.md has the
 * measurements behind each choice):
 *  - tmpfs/ramfs: the data is in memory and io_uring can't try it without
 *    blocking (no RWF_NOWAIT there), so it would hand every request to an
 *    io-wq thread: two context switches for a copy the worker does faster
 *    itself. Reads memcpy from a mapping of the page cache (vu_filemap.c),
 *    writes memcpy into it (pwritev in the worker where the mapping can't
 *    take them): INLINE.
 *  - a local disk file system (ext4, XFS, btrfs): a read whose pages are in
 *    the page cache is copied from a mapping of it, like on tmpfs (no
 *    system call; vu_filemap.c forgets what it saw resident now and then,
 *    since the kernel may drop pages), and a write to such pages is stored
 *    through the mapping (2.2-2.4x the write IOPS of pwritev; fdatasync
 *    covers it alike). Other reads are tried with preadv2(RWF_NOWAIT) in the
 *    worker, which answers page-cache hits at the cost of one system call;
 *    only misses go to io_uring. Other writes likewise with
 *    pwritev2(RWF_NOWAIT) where the file system can (XFS, btrfs); ext4
 *    refuses buffered RWF_NOWAIT writes (EOPNOTSUPP), and there the worker
 *    writes into the page cache itself (nowait_fallback; at the round's
 *    end without the device lock, vu_blk_file.c): io_uring would
 *    punt every such write to an io-wq thread, which on a quiet machine
 *    halved write IOPS (bench/RESULTS.md, fs rows, -winline against the
 *    default of before) without a better tail, although a buffered ext4
 *    write now and then waits milliseconds. The queue's group sync
 *    (vu_blk_stable.c), which FLUSHes and write-through writes share, goes
 *    through io_uring: it waits for the disk, and the worker serves the
 *    rest meanwhile.
 *  - O_DIRECT: every read and write waits for the device; io_uring keeps
 *    them in flight together (URING).
 * A file system that refuses RWF_NOWAIT for one direction only loses it for
 * that direction. */
#include "vu_blk_engine.h"
#include "vu_dev.h"
#include "vu_worker.h"

#include <errno.h>
#include <unistd.h>

int vu_blk_set_uring(struct vu_blk_dev *b, bool on)
{
    b->nowait_fallback[0] = VU_BLK_IO_URING;
    b->nowait_fallback[1] = VU_BLK_IO_INLINE;
    if (on && b->fd >= 0 && vu_filemap_memory_backed(b->fd)) {
        b->use_uring = false;
        b->read_io = b->write_io = VU_BLK_IO_INLINE;
        return 1;
    }
    if (on) {
        /* Probe once so the caller can fall back at start-up, not mid-I/O. */
        if (vu_uring_sealed()) {
            /* Sandboxed: only rings made before the filter exist. */
            if (vu_uring_pool_size() == 0)
                return -EPERM;
        } else {
            struct vu_uring probe;
            int rc = vu_uring_init(&probe, 4);
            if (rc)
                return rc;
            vu_uring_exit(&probe);
        }
    }
    b->use_uring = on;
    if (!on)
        b->read_io = b->write_io = VU_BLK_IO_INLINE;
    else if (b->direct)
        b->read_io = b->write_io = VU_BLK_IO_URING;
    else
        b->read_io = b->write_io = VU_BLK_IO_NOWAIT;
    return 0;
}

int vu_blk_set_io_path(struct vu_blk_dev *b, int read_io, int write_io)
{
    if (read_io < VU_BLK_IO_INLINE || read_io > VU_BLK_IO_URING ||
        write_io < VU_BLK_IO_INLINE || write_io > VU_BLK_IO_URING)
        return -EINVAL;
    /* RWF_NOWAIT on O_DIRECT still waits for the device. */
    if (b->direct && (read_io == VU_BLK_IO_NOWAIT || write_io == VU_BLK_IO_NOWAIT))
        return -EINVAL;
    if (!b->use_uring && (read_io != VU_BLK_IO_INLINE || write_io != VU_BLK_IO_INLINE)) {
        /* e.g. io_uring on tmpfs, to measure it against the default */
        struct vu_uring probe;
        if (b->backend != VU_BLK_BACKEND_FILE || b->fd < 0)
            return -EINVAL;
        int rc = vu_uring_init(&probe, 4);
        if (rc)
            return rc;
        vu_uring_exit(&probe);
        b->use_uring = true;
    }
    b->read_io = (uint8_t)read_io;
    b->write_io = (uint8_t)write_io;
    return 0;
}

/* The queue's ring, made on first use and watched by the queue's worker.
 * NULL: none can be had, the queue does its I/O synchronously. */
static struct vu_uring *queue_ring(struct vu_blk_dev *b, struct vu_vq *vq)
{
    uint32_t q = vq->index;
    if (q >= VU_BLK_MAX_QUEUES)
        return NULL;
    if (!b->rings[q]) {
        struct vu_uring *u = vu_uring_get(vq->size);
        if (!u)
            return NULL;
        b->rings[q] = u;
    }
    if (vq->worker && b->ring_worker[q] != vq->worker->id) {
        if (vu_worker_add_event_fd(vq->worker, vq, b->rings[q]->efd, false) == 0)
            b->ring_worker[q] = vq->worker->id;
    }
    return b->rings[q];
}

/* The ring queue_ring made for vq (the handler's reap called it first),
 * for new I/O: NULL when io_uring_enter failed on it for good, and the
 * queue's I/O is done synchronously from then on. */
static struct vu_uring *ring_of(struct vu_blk_dev *b, struct vu_vq *vq)
{
    struct vu_uring *u = vq->index < VU_BLK_MAX_QUEUES ? b->rings[vq->index] : NULL;
    return u && !u->failed ? u : NULL;
}

static bool async_type(uint32_t type)
{
    return type == VU_BLK_T_IN || type == VU_BLK_T_OUT;
}

/* How a read or write is done: VU_BLK_IO_*. */
static int io_mode(const struct vu_blk_dev *b, const struct vu_blk_req *r)
{
    /* O_DIRECT with buffers it can't take: bounced, in the worker. */
    if (b->direct && !vu_blk_iov_aligned(r))
        return VU_BLK_IO_INLINE;
    /* Another queue's worker may have just turned NOWAIT off: any value
     * read is a valid mode. */
    return __atomic_load_n(r->type == VU_BLK_T_IN ? &b->read_io : &b->write_io,
                           __ATOMIC_RELAXED);
}

/* A read or write that can finish at once (page cache hit, no block) is
 * done here, through the mapping if it can: true with r->result set.
 * Anything else, including a short transfer, goes on untouched (RWF_NOWAIT
 * transfers nothing or what it could; a partial one is simply redone). */
static bool try_nowait(struct vu_blk_dev *b, struct vu_blk_req *r)
{
    if (r->niov == 0)
        return false;
    bool wr = r->type == VU_BLK_T_OUT;
    uint64_t off = r->sector * VU_BLK_SECTOR;
    if (wr ? vu_filemap_write(&b->map, r->iov, r->niov, off, r->data_len) == 0
           : vu_filemap_read(&b->map, r->iov, r->niov, off, r->data_len) == 0) {
        r->result = VU_BLK_S_OK;   /* copied through the mapping of the page cache */
        return true;
    }
    ssize_t n = wr ? pwritev2(b->fd, r->iov, (int)r->niov, (off_t)off, RWF_NOWAIT)
                   : preadv2(b->fd, r->iov, (int)r->niov, (off_t)off, RWF_NOWAIT);
    if (n < 0 && errno == EOPNOTSUPP) {
        /* The file system can't try this direction: stop asking (ext4
         * refuses buffered writes, and reads still work). */
        __atomic_store_n(wr ? &b->write_io : &b->read_io, b->nowait_fallback[wr],
                         __ATOMIC_RELAXED);
    }
    if (n < 0 || (uint64_t)n != r->data_len)
        return false;
    if (wr)
        vu_filemap_written(&b->map, off, r->data_len);
    r->result = VU_BLK_S_OK;
    return true;
}

/* Queues r on u; false when the ring is full (the caller runs it itself). */
static bool submit_async(struct vu_blk_dev *b, struct vu_uring *u, struct vu_blk_req *r)
{
    if (u->pending + u->queued + 1 > u->entries)
        return false;
    struct io_uring_sqe *sqe = vu_uring_sqe(u);
    r->reason = VU_BLK_R_NONE;
    sqe->fd = b->fd;
    sqe->user_data = (uint64_t)(uintptr_t)r;
    sqe->opcode = r->type == VU_BLK_T_IN ? IORING_OP_READV : IORING_OP_WRITEV;
    sqe->addr = (uint64_t)(uintptr_t)r->iov;
    sqe->len = r->niov;
    sqe->off = r->sector * VU_BLK_SECTOR;
    return true;
}

/* Applies one completion to its request. A short transfer is finished here,
 * synchronously and without the device lock (it may wait for the storage;
 * the handler looks at the ring again after reaping). */
static void apply_cqe(struct vu_blk_dev *b, struct vu_vq *vq, struct io_uring_cqe *cqe,
                      struct vu_blk_req *r)
{
    /* Refused by a failed ring (vu_uring_submit): done here, all of it. */
    int res = cqe->res == -ECANCELED ? 0 : cqe->res;
    bool short_io = res >= 0 && (uint64_t)res < r->data_len;
    /* An orphan's rest is not redone: it was given up on, and the front-end
     * may have resubmitted it (a no-op'd entry, submit_queued, is short too). */
    if (res < 0 || (short_io && vu_vq_orphaned(r->elem))) {
        r->reason = VU_BLK_R_IO_FAILED;
    } else if (short_io) {
        uint64_t done = (uint64_t)res;
        if (vu_blk_request_slice(r, r->iov, r->niov, done, r->data_len - done)) {
            r->reason = VU_BLK_R_IO_FAILED;
        } else {
            vu_dev_unlock(vq->dev);
            if (vu_blk_file_rw(b->fd, r->iov, r->niov, r->sector * VU_BLK_SECTOR + done,
                               r->type == VU_BLK_T_OUT))
                r->reason = VU_BLK_R_IO_FAILED;
            vu_dev_rdlock(vq->dev);
        }
    }
    r->result = r->reason == VU_BLK_R_IO_FAILED ? VU_BLK_S_IOERR : VU_BLK_S_OK;
    if (r->result == VU_BLK_S_OK && r->type == VU_BLK_T_OUT)
        vu_filemap_written(&b->map, r->sector * VU_BLK_SECTOR, r->data_len);
}

/* Defined by cffi (extern "Python+C"): the one log line a queue's ring
 * gets when io_uring_enter fails on it for good. */
void vu_on_uring_failed(struct vu_dev *dev, uint32_t index, int err);

/* A group's sync the failed ring refused: done here, without the device
 * lock (it may wait for the storage). */
static int sync_refused(struct vu_blk_dev *b, struct vu_vq *vq)
{
    vu_dev_unlock(vq->dev);
    int res = vu_blk_sync(b, vq->index);
    vu_dev_rdlock(vq->dev);
    return res;
}

/* Completes what io_uring finished; returns how many requests. */
static int reap_ring(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_uring *u)
{
    uint32_t q = vq->index % VU_BLK_MAX_QUEUES;
    if (u->failed && !b->ring_failure_logged[q]) {
        b->ring_failure_logged[q] = true;
        vu_on_uring_failed(vq->dev, vq->index, u->failed);
    }
    uint64_t v;
    ssize_t rd = read(u->efd, &v, sizeof(v));   /* EFD_NONBLOCK */
    (void)rd;
    int done = 0;
    uint64_t now = 0;   /* one clock read for what this call completes: it is flushed together */
    struct io_uring_cqe *cqe;
    while ((cqe = vu_uring_peek(u))) {
        uint64_t tag = cqe->user_data;
        int res = cqe->res;
        if (!now)
            now = vu_now_ns();
        if (tag & VU_BLK_TAG_GROUP) {
            vu_uring_seen(u);
            if (res == -ECANCELED)
                res = sync_refused(b, vq);
            struct vu_blk_group *g =
                (struct vu_blk_group *)(uintptr_t)(tag & ~(uint64_t)VU_BLK_TAG_GROUP);
            done += vu_blk_stable_synced(b, vq, g, res, now);
            continue;
        }
        struct vu_blk_req *r = (struct vu_blk_req *)(uintptr_t)tag;
        apply_cqe(b, vq, cqe, r);
        vu_uring_seen(u);
        if (!vu_blk_stable_hold(b, q, r)) {
            vu_blk_complete(vq, r, r->result, false, now);
            done++;
        }
    }
    return done + vu_blk_stable_commit(b, vq, u);
}

static int uring_reap(struct vu_blk_dev *b, struct vu_vq *vq)
{
    struct vu_uring *u = queue_ring(b, vq);
    return u ? reap_ring(b, vq, u) : 0;
}

static enum vu_blk_start uring_start(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *r)
{
    struct vu_uring *u = ring_of(b, vq);
    if (u && r->type == VU_BLK_T_FLUSH) {
        /* Shares the group's next sync with the other FLUSHes (and
         * write-through writes) that wait for one. */
        vu_blk_stable_join_flush(b, vq->index, r);
        return VU_BLK_TAKEN;
    }
    int mode = u && async_type(r->type) ? io_mode(b, r) : VU_BLK_IO_INLINE;
    if (r->type == VU_BLK_T_IN && mode != VU_BLK_IO_URING) {
        /* Data already in the page cache needs no trip through io_uring's
         * worker threads: read it without blocking. */
        if (mode == VU_BLK_IO_NOWAIT ? try_nowait(b, r) : vu_blk_file_copy(b, r))
            return VU_BLK_DONE;
        mode = io_mode(b, r);   /* a miss, or NOWAIT just turned out unsupported */
    }
    bool to_ring = u && (mode == VU_BLK_IO_URING ||
                         (mode == VU_BLK_IO_NOWAIT && r->type == VU_BLK_T_IN));
    if (to_ring && submit_async(b, u, r))
        return VU_BLK_TAKEN;
    /* Writes (tried without blocking there first, where the file system
     * can) and what the worker does itself may wait for the storage. */
    vu_blk_file_hold(b, vq, r);
    return VU_BLK_TAKEN;
}

/* A held request, without the device lock: a write in NOWAIT mode is tried
 * without blocking first, and a miss goes to io_uring; the rest is done
 * here. Reads tried the mapping already. */
static void uring_held_io(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *r)
{
    bool write_nowait = r->type == VU_BLK_T_OUT && io_mode(b, r) == VU_BLK_IO_NOWAIT;
    if (write_nowait) {
        if (try_nowait(b, r))
            return;
        struct vu_uring *u = ring_of(b, vq);
        if (u && io_mode(b, r) != VU_BLK_IO_INLINE && submit_async(b, u, r))
            return;   /* PENDING: io_uring completes it */
    }
    vu_blk_file_io(b, r, r->type == VU_BLK_T_OUT && !write_nowait);
}

static int uring_end_round(struct vu_blk_dev *b, struct vu_vq *vq)
{
    struct vu_uring *u = ring_of(b, vq);
    bool sent;
    int done = vu_blk_file_run_held(b, vq, uring_held_io, u, &sent);
    /* What io_uring could do at once (page-cache hits) completed inside
     * the submission: answered in this round. Their signals are drained
     * first (a completion posted after that signals again, so none is
     * lost). Only then: a group's sync that finished is reaped when the
     * worker wakes for it, by which time more writes wait for the next
     * (write-through IOPS fell 7% when every round reaped it). */
    if (sent && vu_uring_peek(u))
        done += reap_ring(b, vq, u);
    /* One sync for the write-through writes of this round (and those that
     * waited for the previous sync): group commit. */
    /* ring_of again: the ring may have failed in this round. */
    return done + vu_blk_stable_commit(b, vq, ring_of(b, vq));
}

const struct vu_blk_engine vu_blk_uring_engine = {
    .reap = uring_reap,
    .start = uring_start,
    .prefetch = vu_blk_file_prefetch,
    .end_round = uring_end_round,
};

static void drop_cqe(void *arg, struct io_uring_cqe *cqe)
{
    struct vu_blk_dev *b = arg;
    if (cqe->user_data & VU_BLK_TAG_GROUP) {
        vu_blk_stable_drop(
            b, (struct vu_blk_group *)(uintptr_t)(cqe->user_data & ~(uint64_t)VU_BLK_TAG_GROUP),
            true);
        return;
    }
    vu_blk_drop(b, (struct vu_blk_req *)(uintptr_t)cqe->user_data);
}

void vu_blk_uring_quiesce(struct vu_blk_dev *b)
{
    for (uint32_t q = 0; q < VU_BLK_MAX_QUEUES; q++) {
        if (b->rings[q]) {
            vu_uring_drain(b->rings[q], drop_cqe, b);
            b->ring_worker[q] = 0;   /* that worker and its epoll go away */
        }
    }
}

void vu_blk_uring_close(struct vu_blk_dev *b)
{
    for (uint32_t q = 0; q < VU_BLK_MAX_QUEUES; q++) {
        if (b->rings[q])
            vu_uring_put(b->rings[q]);
        b->rings[q] = NULL;
    }
}
