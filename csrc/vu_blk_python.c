/* The Python hand-off: a round's parsed requests go to the Python back-end
 * in one call (vhostuser.blk.device), described and answered in one C call
 * each rather than field by field through cffi. What Python answers at
 * once completes at the end of the round; what it leaves PENDING it
 * completes later itself with vu_blk_finish(notify). */
#include "vu_blk_engine.h"
#include "vu_dev.h"
#include "vu_memory.h"

/* Defined by cffi (extern "Python+C"): runs n parsed requests in Python;
 * returns how many writes it did in write-back mode. */
int vu_blk_py_batch(void *ctx, struct vu_vq *vq, struct vu_blk_req **reqs, int n);
/* The same batch after a switch to write-through: its write-back writes are
 * made stable (or failed, or left PENDING to complete after an async
 * flush). */
int vu_blk_py_settle(void *ctx, struct vu_vq *vq, struct vu_blk_req **reqs, int n);

/* Each call into Python costs microseconds: more requests per call than the
 * C engines' rounds (vu_blk_dev.py_batch: fewer, for A/B). */
static int python_round(const struct vu_blk_dev *b)
{
    return b->py_batch >= 1 && b->py_batch <= VU_BLK_PY_BATCH_MAX ? (int)b->py_batch
                                                                  : VU_BLK_PY_BATCH_MAX;
}

static enum vu_blk_start python_start(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *r)
{
    uint32_t q = vq->index % VU_BLK_MAX_QUEUES;
    b->round[q][b->round_len[q]++] = r;   /* the round holds at most python_round() */
    return VU_BLK_TAKEN;
}

static int python_end_round(struct vu_blk_dev *b, struct vu_vq *vq)
{
    uint32_t q = vq->index % VU_BLK_MAX_QUEUES;
    int n = b->round_len[q];
    if (!n)
        return 0;
    b->round_len[q] = 0;
    struct vu_blk_req **reqs = b->round[q];
    /* Without the device lock: a back-end method that blocks (storage that
     * stopped answering) must not block the control plane too, which takes
     * the lock to stop, disable or reset a ring, or to change the memory
     * table. Meanwhile these requests hold their elements and guest memory
     * (detached if the front-end takes it back); their completion below goes
     * through the ring's own lock, which publishes, holds or drops it as the
     * ring is by then; the handler looks at the ring's state again. */
    vu_dev_unlock(vq->dev);
    int written_back = vu_blk_py_batch(b->py_ctx, vq, reqs, n);
    vu_dev_rdlock(vq->dev);
    if (written_back > 0 && !__atomic_load_n(&b->lim.writeback, __ATOMIC_ACQUIRE)) {
        /* The driver switched to write-through while the batch ran, and its
         * reply may already be out: what the batch wrote in write-back mode
         * is made stable before it is published. From here on the lock is
         * held until it is, so a later switch waits for that. */
        vu_dev_unlock(vq->dev);
        vu_blk_py_settle(b->py_ctx, vq, reqs, n);
        vu_dev_rdlock(vq->dev);
    }
    /* r->result stays PENDING for what Python completes later: the two
     * never both complete a request. */
    int done = 0;
    uint64_t now = 0;
    for (int i = 0; i < n; i++) {
        if (reqs[i]->result == VU_BLK_S_PENDING)
            continue;
        if (!now)
            now = vu_now_ns();
        vu_blk_complete(vq, reqs[i], reqs[i]->result, false, now);
        done++;
    }
    return done;
}

const struct vu_blk_engine vu_blk_python_engine = {
    .round_size = python_round,
    .start = python_start,
    .end_round = python_end_round,
};

void vu_blk_py_describe(struct vu_blk_req *const *reqs, int n, struct vu_blk_pydesc *out)
{
    for (int i = 0; i < n; i++) {
        const struct vu_blk_req *r = reqs[i];
        struct vu_blk_pydesc *d = &out[i];
        d->type = r->type;
        d->niov = r->niov;
        d->offset = r->sector * VU_BLK_SECTOR;
        d->map_id = d->map_off = d->len = 0;
        if (r->niov == 1 && r->elem && r->elem->mem) {
            uint64_t off;
            struct vu_map *m = vu_mem_map_of(r->elem->mem, r->iov[0].iov_base,
                                             r->iov[0].iov_len, &off);
            if (m) {
                d->map_id = m->id;
                d->map_off = off;
                d->len = r->iov[0].iov_len;
            }
        }
    }
}

void vu_blk_py_set_results(struct vu_blk_req *const *reqs, int n, const uint8_t *status)
{
    for (int i = 0; i < n; i++)
        if (status[i] != VU_BLK_S_PENDING)
            reqs[i]->result = status[i];
}
