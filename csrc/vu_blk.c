/* virtio-blk device: its life cycle, completion, and the queue handler that
 * pops and parses requests and dispatches them to an engine
 * (vu_blk_engine.h). The handler does no I/O itself. */
#include "vu_blk_engine.h"
#include "vu_dev.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BLK_POP_BURST 8  /* requests popped at once, at most */
#define BLK_ROUNDS 16   /* rounds per handler run before other queues get the worker */

struct vu_blk_dev *vu_blk_new(int backend)
{
    struct vu_blk_dev *b;
    /* Aligned as barrier_inflight's lines are (calloc gives 16 bytes). */
    if (posix_memalign((void **)&b, _Alignof(struct vu_blk_dev), sizeof(*b)))
        return NULL;
    memset(b, 0, sizeof(*b));
    b->backend = backend;
    b->fd = -1;
    for (uint32_t q = 0; q <= VU_BLK_MAX_QUEUES; q++)
        b->sync_fd[q] = -1;
    b->punch_hole = true;
    pthread_mutex_init(&b->async_lock, NULL);
    vu_qos_init(&b->qos);
    for (uint32_t q = 0; q < VU_BLK_MAX_QUEUES; q++)
        b->qos_timer[q] = -1;
    return b;
}

void vu_blk_quiesce(struct vu_blk_dev *b)
{
    vu_blk_uring_quiesce(b);
    /* Written but never synced: not stable, so not answered (the front-end
     * resubmits them if it tracks inflight requests). */
    for (uint32_t q = 0; q < VU_BLK_MAX_QUEUES; q++)
        vu_blk_stable_drop(b, &b->group[q], false);
}

/* r, parsed, counts in the current barrier parity until it ends. */
static void barrier_enter(struct vu_blk_dev *b, struct vu_blk_req *r)
{
    uint32_t q = r->queue % VU_BLK_MAX_QUEUES;
    r->barrier = (uint8_t)(VU_READ_ONCE(b->barrier_epoch) & 1);
    __atomic_add_fetch(&b->barrier_inflight[q][r->barrier], 1, __ATOMIC_RELAXED);
}

/* r ended (its I/O done): a barrier waiting for it may pass. */
static void barrier_leave(struct vu_blk_dev *b, struct vu_blk_req *r)
{
    __atomic_sub_fetch(&b->barrier_inflight[r->queue % VU_BLK_MAX_QUEUES][r->barrier & 1], 1,
                       __ATOMIC_RELEASE);
}

static uint64_t barrier_count(struct vu_blk_dev *b, unsigned parity)
{
    uint64_t n = 0;
    for (uint32_t q = 0; q < VU_BLK_MAX_QUEUES; q++)
        n += __atomic_load_n(&b->barrier_inflight[q][parity], __ATOMIC_ACQUIRE);
    return n;
}

uint64_t vu_blk_barrier_begin(struct vu_blk_dev *b)
{
    uint64_t epoch = VU_READ_ONCE(b->barrier_epoch);
    /* The parity new requests go to from now on still counts those of the
     * barrier before this one (epoch - 1 and epoch + 1 share it). */
    if (barrier_count(b, (unsigned)(epoch + 1) & 1))
        return 0;
    __atomic_store_n(&b->barrier_epoch, epoch + 1, __ATOMIC_SEQ_CST);
    return epoch + 1;
}

uint64_t vu_blk_barrier_pending(struct vu_blk_dev *b, uint64_t epoch)
{
    /* A later barrier began only once this one's parity was empty. */
    if (epoch == 0 || __atomic_load_n(&b->barrier_epoch, __ATOMIC_ACQUIRE) != epoch)
        return 0;
    return barrier_count(b, (unsigned)(epoch - 1) & 1);
}

void vu_blk_drop(struct vu_blk_dev *b, struct vu_blk_req *r)
{
    /* The queue's worker, the only writer of started[], is stopped. */
    b->started[r->queue % VU_BLK_MAX_QUEUES]--;
    barrier_leave(b, r);
    vu_vq_discard(r->elem->vq, r->elem);
}

void vu_blk_free(struct vu_blk_dev *b)
{
    if (!b)
        return;
    vu_blk_quiesce(b);
    vu_blk_uring_close(b);
    vu_blk_qos_close(b);
    vu_blk_ram_close(b);
    vu_filemap_close(&b->map);
    vu_qos_destroy(&b->qos);
    pthread_mutex_destroy(&b->async_lock);
    free(b);
}

int vu_blk_prepare_queue(struct vu_vq *vq)
{
    return vu_vq_set_user(vq, sizeof(struct vu_blk_req), vu_blk_request_fini);
}

int vu_blk_parse(struct vu_blk_dev *b, struct vu_elem *e, struct vu_blk_req *r)
{
    r->dev = b;
    int rc = vu_blk_request_parse(&b->lim, b->backend == VU_BLK_BACKEND_PYTHON, e, r);
    /* Checked against the limits (read-only, capacity) as they are now:
     * counted until it ends, for a barrier begun after a change to them
     * (both under the device lock). */
    if (rc == 0)
        barrier_enter(b, r);
    return rc;
}

/* GET_ID is no I/O: the serial number the control plane set goes into the
 * request's buffers (a Python back-end answers it itself). True when
 * answered. */
static bool answer_id(const struct vu_blk_dev *b, struct vu_blk_req *r)
{
    if (r->type != VU_BLK_T_GET_ID || b->backend == VU_BLK_BACKEND_PYTHON)
        return false;
    /* One copy: the control plane may set a new serial meanwhile. */
    char id[VU_BLK_ID_BYTES];
    memcpy(id, b->lim.serial, sizeof(id));
    uint64_t left = r->data_len;
    for (uint32_t i = 0; i < r->niov && left; i++) {
        size_t n = r->iov[i].iov_len < left ? r->iov[i].iov_len : (size_t)left;
        memcpy(r->iov[i].iov_base, id + (r->data_len - left), n);
        left -= n;
    }
    r->result = VU_BLK_S_OK;
    return true;
}

void vu_blk_execute(struct vu_blk_dev *b, struct vu_blk_req *r)
{
    if (answer_id(b, r))
        return;
    switch (b->backend) {
    case VU_BLK_BACKEND_RAM:
        vu_blk_ram_io(b, r);
        return;
    case VU_BLK_BACKEND_FILE:
        vu_blk_file_io(b, r, true);
        if (r->result == VU_BLK_S_OK && vu_blk_needs_stable(b, r) && vu_blk_sync(b, r->queue)) {
            r->result = VU_BLK_S_IOERR;
            r->reason = VU_BLK_R_IO_FAILED;
        }
        return;
    default:
        /* A Python back-end's requests run in Python. */
        r->result = VU_BLK_S_IOERR;
        r->reason = VU_BLK_R_IO_FAILED;
    }
}

int vu_blk_complete(struct vu_vq *vq, struct vu_blk_req *r, uint8_t status, bool notify,
                    uint64_t now)
{
    if (status == VU_BLK_S_PENDING)
        status = VU_BLK_S_IOERR;
    struct vu_blk_dev *b = r->dev;
    if (b) {
        uint32_t q = r->queue % VU_BLK_MAX_QUEUES;
        barrier_leave(b, r);
        if (notify) {   /* not q's worker: the other set, under its lock */
            pthread_mutex_lock(&b->async_lock);
            vu_blk_stats_count(&b->async_stats[q], r, status, now);
            pthread_mutex_unlock(&b->async_lock);
        } else {
            vu_blk_stats_count(&b->stats[q], r, status, now);
        }
    }
    VU_WRITE_ONCE(*r->status, status);
    /* Like QEMU we report the whole writable length as used: the driver
     * ignores it and dirty logging then covers the status byte too. */
    uint32_t len = (uint32_t)r->elem->in_len;
    return notify ? vu_vq_complete(vq, r->elem, len) : vu_vq_push(vq, r->elem, len);
}

int vu_blk_finish(struct vu_vq *vq, struct vu_blk_req *r, uint8_t status, bool notify)
{
    return vu_blk_complete(vq, r, status, notify, r->start_ns ? vu_now_ns() : 0);
}

static const struct vu_blk_engine *engine_of(const struct vu_blk_dev *b)
{
    switch (b->backend) {
    case VU_BLK_BACKEND_RAM: return &vu_blk_ram_engine;
    case VU_BLK_BACKEND_PYTHON: return &vu_blk_python_engine;
    default: return b->use_uring ? &vu_blk_uring_engine : &vu_blk_file_engine;
    }
}

/* Does r's I/O, or hands it to the engine; 1 if it completed here. */
static int start_one(struct vu_blk_dev *b, struct vu_vq *vq, const struct vu_blk_engine *eng,
                     struct vu_blk_req *r)
{
    if (r->result == VU_BLK_S_PENDING) {
        if (!answer_id(b, r) && eng->start(b, vq, r) == VU_BLK_TAKEN)
            return 0;
        if (vu_blk_stable_hold(b, r->queue, r))
            return 0;   /* completes after its group's sync */
    }
    vu_blk_complete(vq, r, r->result, false, 0);
    return 1;
}

/* Starts the held requests in order; returns how many completed here. */
static int start_held(struct vu_blk_dev *b, struct vu_vq *vq, const struct vu_blk_engine *eng,
                      struct vu_blk_req **held, int *nheld)
{
    int completed = 0;
    for (int i = 0; i < *nheld; i++)
        completed += start_one(b, vq, eng, held[i]);
    *nheld = 0;
    return completed;
}

int vu_blk_handler(void *ctx, struct vu_vq *vq)
{
    struct vu_blk_dev *b = ctx;
    if (vq->user_size != sizeof(struct vu_blk_req)) {
        vu_vq_break(vq, VU_ERR_INVAL, vq->index);   /* vu_blk_prepare_queue was not called */
        return VU_HANDLED_NONE;
    }
    const struct vu_blk_engine *eng = engine_of(b);
    uint32_t q = vq->index % VU_BLK_MAX_QUEUES;
    vu_blk_qos_woken(b, q);
    bool did = eng->reap && eng->reap(b, vq) > 0;
    /* A disabled, stopped or broken ring only finishes what it already
     * started (asked after the reap, which may drop the device lock). */
    if (!vu_vq_serving(vq)) {
        if (did) {
            vu_vq_flush(vq);
            vu_vq_notify(vq);
        }
        return did ? VU_HANDLED_SOME : VU_HANDLED_NONE;
    }
    int max_batch = eng->round_size ? eng->round_size(b) : VU_BLK_ROUND;
    /* Once per run, not per round: asking is a system call, 5% of a cached
     * read's cost when it was per round (perf, fs randread QD32). */
    vu_filemap_recheck_guard();
    for (int round = 0; round < BLK_ROUNDS; round++) {
        vu_vq_set_notification(vq, false);
        int n = 0, rc = 0, completed = 0;
        bool throttled = false;
        /* One clock read per round: what is popped in it arrived by then. */
        uint64_t now = vu_now_ns();
        struct vu_elem *e;
        /* Popped together, one lock round trip for the lot (the queue lock
         * was 7% of a cached read's cost popped one by one); not parsed yet. */
        struct vu_elem *popped[BLK_POP_BURST];
        int npopped = 0, next = 0;
        /* Of the current burst: parsed, their data prefetched, not started. */
        struct vu_blk_req *held[BLK_POP_BURST];
        int nheld = 0;
        while (n < max_batch) {
            bool qos = vu_qos_active(&b->qos);
            uint64_t wait = qos ? vu_qos_admit(&b->qos, now) : 0;
            if (wait && vu_blk_qos_sleep(b, vq, wait)) {
                throttled = true;
                break;
            }
            if (next == npopped) {
                /* The burst before is parsed and its data on its way to the
                 * cache: started now, before anything else is popped. */
                completed += start_held(b, vq, eng, held, &nheld);
                /* With QoS each request is admitted before it is popped. */
                int want = qos ? 1 : max_batch - n < BLK_POP_BURST ? max_batch - n
                                                                   : BLK_POP_BURST;
                if ((rc = vu_vq_pop_burst(vq, popped, want)) <= 0) {
                    if (!wait && qos)
                        vu_qos_refund(&b->qos);
                    break;
                }
                npopped = rc;
                next = 0;
                rc = 1;
            }
            e = popped[next++];
            struct vu_blk_req *r = e->user;
            r->queue = (uint16_t)vq->index;
            n++;
            b->started[q]++;
            if (vu_blk_parse(b, e, r) < 0) {
                /* Answered before the queue breaks, as one by one. */
                completed += start_held(b, vq, eng, held, &nheld);
                /* No status byte: nothing can answer this chain, and it must
                 * not stay in flight for GET_VRING_BASE to wait on. */
                vu_vq_break(vq, VU_ERR_ZERO_CHAIN, e->id);
                vu_vq_discard(vq, e);
                b->started[q]--;
                rc = -VU_ERR_ZERO_CHAIN;
                break;
            }
            r->start_ns = now;
            if (vu_qos_active(&b->qos))
                vu_qos_charge_bytes(&b->qos, r->data_len);
            /* The whole burst's data is fetched at once, while the
             * requests before it in the burst are parsed and started. */
            if (eng->prefetch && r->result == VU_BLK_S_PENDING)
                eng->prefetch(b, r);
            held[nheld++] = r;
        }
        /* Popped but not parsed (the queue broke or QoS put it to sleep):
         * back on the ring, last first, as if never popped. */
        while (npopped > next)
            vu_vq_unpop(vq, popped[--npopped]);
        completed += start_held(b, vq, eng, held, &nheld);
        /* What the engine held (io_uring submissions, the Python batch), and
         * the round's write-through sync; those record their own latency. */
        if (eng->end_round && eng->end_round(b, vq) > 0)
            did = true;
        if (n)
            did = true;
        /* Everything completed in this round started at `now` and becomes
         * visible to the driver at this flush: one latency for all. */
        if (completed)
            vu_blk_stats_latency(&b->stats[q], vu_now_ns() - now, (uint64_t)completed);
        if (completed || did) {
            vu_vq_flush(vq);
            vu_vq_notify(vq);
        }
        if (rc < 0)
            return VU_HANDLED_SOME;
        /* end_round ran what may block without the device lock (a Python
         * batch, file I/O): the ring may have been disabled, stopped or
         * broken meanwhile, and then nothing more is taken from it. */
        if (!vu_vq_serving(vq))
            return did ? VU_HANDLED_SOME : VU_HANDLED_NONE;
        /* Throttled: notifications stay off, the timer wakes the queue. */
        if (throttled)
            return did ? VU_HANDLED_SOME : VU_HANDLED_NONE;
        if (n == max_batch)
            continue;
        if (!vu_vq_set_notification(vq, true))
            return did ? VU_HANDLED_SOME : VU_HANDLED_NONE;
    }
    return VU_HANDLED_MORE;
}
