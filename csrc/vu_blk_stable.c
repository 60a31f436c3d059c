/* Group commit (virtio 1.4 5.2.6.5: without a write cache a write is stable
 * when it completes). Writes of the file engines whose data is written wait
 * in their queue's group for one fdatasync that covers them all, and
 * complete only after it: one sync per round instead of one per write.
 * FLUSH requests of the io_uring engine wait there too: a FLUSH that
 * arrives while a sync runs gets the next one (that sync may have started
 * before writes the FLUSH must cover completed), and every FLUSH waiting
 * then shares it, so at most one sync per queue is in flight instead of one
 * per FLUSH contending for the same inode. Each group is owned by its
 * queue's worker. */
#include "vu_blk_engine.h"
#include "vu_dev.h"

#include <errno.h>
#include <unistd.h>

/* Syncs that fail ------------------------------------------------------------------
 *
 * When the kernel fails to write back a page it reports the error to the
 * next fsync of each open file once, and calls the page clean: a later
 * fdatasync returns 0 over data that never reached the storage. So the
 * first failure is kept, and every later sync of the device fails with it
 * (as QEMU's file-posix does once a flush failed), without syncing: what
 * was acknowledged before it is not known to be stable, and no sync can
 * make it so. Each queue syncs through an open file of its own (sync_fd),
 * so a failure one queue's sync takes is reported to another's running at
 * the same time too, not only to the next one. */
void vu_blk_set_sync_fd(struct vu_blk_dev *b, uint32_t slot, int fd)
{
    if (slot <= VU_BLK_MAX_QUEUES)
        b->sync_fd[slot] = fd;
}

int vu_blk_sync_fd(const struct vu_blk_dev *b, uint32_t slot)
{
    int fd = slot <= VU_BLK_MAX_QUEUES ? b->sync_fd[slot] : -1;
    return fd >= 0 ? fd : b->fd;
}

int vu_blk_sync_error(struct vu_blk_dev *b)
{
    return __atomic_load_n(&b->sync_error, __ATOMIC_ACQUIRE);
}

int vu_blk_sync_outcome(struct vu_blk_dev *b, int res)
{
    if (res < 0) {
        int none = 0;
        __atomic_compare_exchange_n(&b->sync_error, &none, -res, false, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE);
    }
    int failed = vu_blk_sync_error(b);
    return failed ? -failed : 0;
}

int vu_blk_sync(struct vu_blk_dev *b, uint32_t slot)
{
    int failed = vu_blk_sync_error(b);
    if (failed)
        return -failed;
    return vu_blk_sync_outcome(b, fdatasync(vu_blk_sync_fd(b, slot)) < 0 ? -errno : 0);
}

/* A request that changes data and, in write-through mode, must be stable
 * before it completes (discard is a hint: dropping it is allowed). The mode
 * is read when the data is written, so a CONFIG_WCE change applies to the
 * next request. */
bool vu_blk_needs_stable(const struct vu_blk_dev *b, const struct vu_blk_req *r)
{
    return !b->lim.writeback && b->backend == VU_BLK_BACKEND_FILE &&
           (r->type == VU_BLK_T_OUT || r->type == VU_BLK_T_WRITE_ZEROES);
}

bool vu_blk_stable_hold(struct vu_blk_dev *b, uint32_t q, struct vu_blk_req *r)
{
    if (r->result != VU_BLK_S_OK || !vu_blk_needs_stable(b, r))
        return false;
    struct vu_blk_group *g = &b->group[q % VU_BLK_MAX_QUEUES];
    r->next = g->waiting;
    g->waiting = r;
    return true;
}

void vu_blk_stable_join_flush(struct vu_blk_dev *b, uint32_t q, struct vu_blk_req *r)
{
    struct vu_blk_group *g = &b->group[q % VU_BLK_MAX_QUEUES];
    r->result = VU_BLK_S_OK;   /* unless the sync fails */
    r->next = g->waiting;
    g->waiting = r;
}

/* Completes every request of `list` with the outcome of the sync that
 * covered them; returns how many. */
static int finish_group(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *list,
                        bool synced, uint64_t now)
{
    int n = 0, flushes = 0;
    while (list) {
        struct vu_blk_req *r = list;
        list = r->next;
        r->next = NULL;
        if (!synced) {
            r->result = VU_BLK_S_IOERR;
            r->reason = VU_BLK_R_IO_FAILED;
        }
        flushes += r->type == VU_BLK_T_FLUSH;
        vu_blk_complete(vq, r, r->result, false, now);
        n++;
    }
    b->stats[vq->index % VU_BLK_MAX_QUEUES].stable_writes += (uint64_t)(n - flushes);
    return n;
}

/* What waits gets the next sync when one is in flight: data written after a
 * sync started may not be covered by it. */
int vu_blk_stable_commit(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_uring *u)
{
    struct vu_blk_group *g = &b->group[vq->index % VU_BLK_MAX_QUEUES];
    if (!g->waiting || g->sync_inflight)
        return 0;
    struct vu_blk_stats *st = &b->stats[vq->index % VU_BLK_MAX_QUEUES];
    if (!u) {
        struct vu_blk_req *list = g->waiting;
        g->waiting = NULL;
        /* At the round's end, without the device lock: a sync may wait for
         * storage that never answers (vu_blk_file.c). */
        vu_dev_unlock(vq->dev);
        bool synced = vu_blk_sync(b, vq->index) == 0;
        vu_dev_rdlock(vq->dev);
        st->stable_syncs++;
        return finish_group(b, vq, list, synced, vu_now_ns());
    }
    if (vu_blk_sync_error(b)) {
        /* No sync can make them stable now. */
        struct vu_blk_req *list = g->waiting;
        g->waiting = NULL;
        return finish_group(b, vq, list, false, vu_now_ns());
    }
    if (u->pending + u->queued + 1 > u->entries)
        return 0;       /* ring full: the next completion makes room and comes back here */
    struct io_uring_sqe *sqe = vu_uring_sqe(u);
    sqe->opcode = IORING_OP_FSYNC;
    sqe->fsync_flags = IORING_FSYNC_DATASYNC;
    sqe->fd = vu_blk_sync_fd(b, vq->index);
    sqe->user_data = (uint64_t)(uintptr_t)g | VU_BLK_TAG_GROUP;
    g->syncing = g->waiting;
    g->waiting = NULL;
    g->sync_inflight = true;
    st->stable_syncs++;
    vu_uring_submit(u);
    return 0;
}

int vu_blk_stable_synced(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_group *g,
                         int res, uint64_t now)
{
    struct vu_blk_req *list = g->syncing;
    g->syncing = NULL;
    g->sync_inflight = false;
    return finish_group(b, vq, list, vu_blk_sync_outcome(b, res < 0 ? res : 0) == 0, now);
}

void vu_blk_stable_drop(struct vu_blk_dev *b, struct vu_blk_group *g, bool syncing)
{
    struct vu_blk_req *list;
    if (syncing) {
        list = g->syncing;
        g->syncing = NULL;
        g->sync_inflight = false;
    } else {
        list = g->waiting;
        g->waiting = NULL;
    }
    while (list) {
        struct vu_blk_req *r = list;
        list = r->next;
        vu_blk_drop(b, r);
    }
}
