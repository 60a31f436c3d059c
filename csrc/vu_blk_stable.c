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

#include <unistd.h>

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
        bool synced = fdatasync(b->fd) == 0;
        vu_dev_rdlock(vq->dev);
        st->stable_syncs++;
        return finish_group(b, vq, list, synced, vu_now_ns());
    }
    if (u->pending + u->queued + 1 > u->entries)
        return 0;       /* ring full: the next completion makes room and comes back here */
    struct io_uring_sqe *sqe = vu_uring_sqe(u);
    sqe->opcode = IORING_OP_FSYNC;
    sqe->fsync_flags = IORING_FSYNC_DATASYNC;
    sqe->fd = b->fd;
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
    return finish_group(b, vq, list, res >= 0, now);
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
