/* Virtqueue state shared by both layouts, element pool, notifications,
 * and dispatch to the split or packed implementation. */
#include "vu_queue.h"
#include "vu_dev.h"
#include "vu_ring_impl.h"
#include "vu_fault.h"
#include "vu_worker.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/virtio_config.h>

#define VU_ELEM_INLINE_IOV 16

struct vu_vq *vu_vq_new(struct vu_dev *dev, uint32_t index)
{
    struct vu_vq *vq = calloc(1, sizeof(*vq));
    if (!vq)
        return NULL;
    vq->dev = dev;
    vq->index = index;
    pthread_mutex_init(&vq->lock, NULL);
    vq->kick_fd = vq->call_fd = vq->err_fd = -1;
    vq->avail_wrap = vq->used_wrap = true;  /* packed rings start in lap 1 */
    return vq;
}

static void free_pool(struct vu_vq *vq)
{
    if (vq->elems) {
        for (uint32_t i = 0; i < vq->pool_size; i++) {
            free(vq->elems[i].iov);
            if (vq->user_fini && vq->elems[i].user)
                vq->user_fini(vq->elems[i].user);
        }
    }
    free(vq->elems);
    free(vq->free_slots);
    free(vq->user_area);
    vq->elems = NULL;
    vq->free_slots = NULL;
    vq->user_area = NULL;
    vq->nfree = 0;
    vq->pool_size = 0;
    vq->inflight = 0;
    vq->nheld = 0;
    vq->norphans = 0;
}

static void free_ring_state(struct vu_vq *vq)
{
    free(vq->resubmit);
    free(vq->resubmit_blockers);
    free(vq->batch_heads);
    vq->batch_heads = NULL;
    vq->batch_heads_num = 0;
    vq->resubmit = NULL;
    vq->resubmit_blockers = NULL;
    vq->resubmit_num = vq->resubmit_pos = 0;
}

void vu_vq_free(struct vu_vq *vq)
{
    if (!vq)
        return;
    free(vq->indirect_copy);
    free_pool(vq);
    free_ring_state(vq);
    pthread_mutex_destroy(&vq->lock);
    free(vq);
}

/* Ring pointers point into the table they were translated with: with the
 * ring unmapped, nothing may follow them. */
static void forget_rings(struct vu_vq *vq)
{
    vq->desc = NULL;
    vq->avail = NULL;
    vq->used = NULL;
    vq->pdesc = NULL;
    vq->driver_event = NULL;
    vq->device_event = NULL;
}

static bool rings_mapped(const struct vu_vq *vq)
{
    return vq->packed ? vq->pdesc != NULL : vq->used != NULL;
}

static int translate(struct vu_vq *vq)
{
    int rc = vq->packed ? vu_packed_translate(vq) : vu_split_translate(vq);
    if (rc)
        forget_rings(vq);
    return rc;
}

static bool elem_release(struct vu_vq *vq, struct vu_elem *e);

void vu_vq_reset(struct vu_vq *vq)
{
    /* The owner of the fds (the Python control plane) closes them. The pool
     * and the handler's per-element state stay while orphans are in it.
     * Completions may come from other threads at any time: all of it under
     * the queue lock, which itself is kept (it sits before `size`). */
    pthread_mutex_lock(&vq->lock);
    for (uint32_t i = 0; i < vq->pool_size && vq->elems; i++) {
        struct vu_elem *e = &vq->elems[i];
        if (!e->in_flight)
            continue;
        if (e->held)
            elem_release(vq, e);     /* done already: there is nothing to wait for */
        else
            vu_vq_orphan(vq, e);
    }
    if (!vq->inflight)
        free_pool(vq);
    free_ring_state(vq);
    struct vu_vq keep = *vq;
    memset((char *)vq + offsetof(struct vu_vq, size), 0,
           sizeof(*vq) - offsetof(struct vu_vq, size));
    vq->handler = keep.handler;
    vq->handler_ctx = keep.handler_ctx;
    vq->worker = keep.worker;
    vq->ignore_write = keep.ignore_write;
    vq->user_size = keep.user_size;
    vq->user_fini = keep.user_fini;
    vq->elems = keep.elems;
    vq->free_slots = keep.free_slots;
    vq->nfree = keep.nfree;
    vq->pool_waited = keep.pool_waited;
    vq->pool_size = keep.pool_size;
    vq->inflight = keep.inflight;
    vq->norphans = keep.norphans;
    vq->user_area = keep.user_area;
    vq->indirect_copy = keep.indirect_copy;      /* scratch: reused */
    vq->indirect_copy_cap = keep.indirect_copy_cap;
    vq->kick_fd = vq->call_fd = vq->err_fd = -1;
    vq->avail_wrap = vq->used_wrap = true;
    pthread_mutex_unlock(&vq->lock);
}

int vu_vq_set_user(struct vu_vq *vq, uint32_t size, void (*fini)(void *user))
{
    if (vq->elems)
        return -VU_ERR_INVAL;
    vq->user_size = size;
    vq->user_fini = fini;
    return 0;
}

int vu_vq_set_num(struct vu_vq *vq, uint32_t num)
{
    if (vq->started)
        return -VU_ERR_INVAL;
    /* Split rings index with `% size`, so sizes must be powers of two;
     * packed rings only need a non-zero size. We ask powers of two of both,
     * as every driver in practice uses them. */
    if (num == 0 || num > VU_MAX_QUEUE_SIZE || (num & (num - 1)))
        return -VU_ERR_BAD_QUEUE_SIZE;
    if (vq->elems && num != vq->pool_size) {
        /* Orphans keep their slots (and their handler state) until they
         * finish; a pool of another size can't take them over. */
        if (vq->inflight)
            return -VU_ERR_INFLIGHT_BUSY;
        free_pool(vq);
    }
    if (num != vq->size) {
        /* The resubmit list, its blockers and the packed batch list are
         * sized with the ring when it starts and kept over a restart at
         * the same size: at another size they are made afresh (the
         * inflight region reads as fresh then anyway, desc_num). Under
         * the queue lock, as in vu_vq_reset: an orphan's completion on
         * another thread reads the blockers under it (release_resubmit). */
        pthread_mutex_lock(&vq->lock);
        free_ring_state(vq);
        pthread_mutex_unlock(&vq->lock);
    }
    vq->size = (uint16_t)num;
    return 0;
}

int vu_vq_set_addr(struct vu_vq *vq, uint32_t flags, uint64_t desc, uint64_t used,
                   uint64_t avail, uint64_t log)
{
    /* Allowed on a running ring: QEMU toggles VHOST_VRING_F_LOG this way
     * when migration starts and ends. */
    vq->desc_addr = desc;
    vq->used_addr = used;
    vq->avail_addr = avail;
    vq->log_addr = log;
    vq->log_used = flags & 1;  /* VHOST_VRING_F_LOG */
    return vu_vq_remap(vq);
}

int vu_vq_set_base(struct vu_vq *vq, uint32_t num)
{
    if (vq->started)
        return -VU_ERR_INVAL;
    if (vq->dev->features & (1ULL << VIRTIO_F_RING_PACKED)) {
        /* bit 15: wrap counter, low 15 bits: index (QEMU's encoding) */
        vq->last_avail_idx = num & 0x7fff;
        vq->avail_wrap = (num >> 15) & 1;
        /* The base names where to take from; where answers go is ours to
         * know: with chains of this session still out (a stop that gave up
         * waiting for them), they are owed the slots before the base. */
        if (vq->inflight == vq->norphans) {
            vq->used_idx = vq->last_avail_idx;
            vq->used_wrap = vq->avail_wrap;
        }
    } else {
        vq->last_avail_idx = (uint16_t)num;
        vq->used_idx = (uint16_t)num;
    }
    return 0;
}

/* The base as SET/GET_VRING_BASE encode it, for the layout negotiated
 * (vq->packed is set only when the ring starts). */
static uint32_t base_of(const struct vu_vq *vq, bool packed)
{
    if (packed)
        return (uint32_t)(vq->last_avail_idx & 0x7fff) | ((uint32_t)vq->avail_wrap << 15);
    return vq->last_avail_idx;
}

uint32_t vu_vq_get_base(struct vu_vq *vq)
{
    return base_of(vq, vq->packed);
}

static int alloc_pool(struct vu_vq *vq)
{
    if (vq->elems)
        return 0;
    vq->elems = calloc(vq->size, sizeof(*vq->elems));
    vq->free_slots = calloc(vq->size, sizeof(*vq->free_slots));
    if (vq->user_size)
        vq->user_area = calloc(vq->size, vq->user_size);
    if (!vq->elems || !vq->free_slots || (vq->user_size && !vq->user_area)) {
        free(vq->elems);
        free(vq->free_slots);
        free(vq->user_area);
        vq->elems = NULL;
        vq->free_slots = NULL;
        vq->user_area = NULL;
        return -VU_ERR_NOMEM;
    }
    for (uint32_t i = 0; i < vq->size; i++) {
        vq->elems[i].slot = i;
        vq->elems[i].vq = vq;
        vq->elems[i].user = vq->user_size ? vq->user_area + (size_t)i * vq->user_size : NULL;
        vq->free_slots[i] = vq->size - 1 - i;
    }
    vq->pool_size = vq->size;
    vq->nfree = vq->size;
    vq->inflight = 0;
    vq->nheld = 0;
    vq->norphans = 0;
    return 0;
}

static int push_locked(struct vu_vq *vq, struct vu_elem *elem, uint32_t len,
                       uint32_t *finished);

/* Publishes the used entries pushed since the last flush (queue lock held). */
static void flush_locked(struct vu_vq *vq)
{
    if (vq->packed)
        vu_packed_flush(vq);
    else
        vu_split_flush(vq);
}

/* Publishes what completed while the ring was stopped (none is an orphan:
 * a held element stops being one, see vu_vq_orphan). */
static void publish_held(struct vu_vq *vq)
{
    for (uint32_t i = 0; vq->nheld && i < vq->pool_size; i++) {
        struct vu_elem *e = &vq->elems[i];
        if (e->in_flight && e->held) {
            uint32_t finished = 0;
            e->held = 0;
            vq->nheld--;
            push_locked(vq, e, e->held_len, &finished);
        }
    }
    flush_locked(vq);
}

/* The inflight region's entry of elem's request: where the ring's
 * resubmit list names it (UINT16_MAX when untracked). */
static uint16_t region_entry(const struct vu_vq *vq, const struct vu_elem *e)
{
    return vq->packed ? e->inflight_head : e->id;
}

/* A request resubmitted at start whose previous execution still runs (an
 * orphan: the session before ended, or a reset or a new driver gave up on
 * it, while its back-end still had it) is held back until that one ends:
 * both at once, the older write could land after a newer one the guest
 * made once it saw the new copy complete. Queue lock held. */
static void hold_resubmits_of_orphans(struct vu_vq *vq)
{
    bool resubmits = vq->resubmit_blockers && vq->resubmit_pos < vq->resubmit_num;
    if (vq->resubmit_blockers)
        memset(vq->resubmit_blockers, 0, vq->size * sizeof(*vq->resubmit_blockers));
    for (uint32_t i = 0; i < vq->pool_size; i++) {
        struct vu_elem *e = &vq->elems[i];
        e->blocks_resubmit = 0;
        if (!resubmits || !e->in_flight || !e->orphan)
            continue;
        uint16_t entry = region_entry(vq, e);
        if (entry < vq->size) {
            vq->resubmit_blockers[entry]++;
            e->blocks_resubmit = 1;
        }
    }
}

/* Index in the resubmit list of the first head that may go now, or
 * resubmit_num. Also read by the worker without the queue lock (has_avail):
 * a count seen late only delays the look its release asks for. */
static uint32_t first_ready_resubmit(const struct vu_vq *vq)
{
    uint32_t i = vq->resubmit_pos;
    if (!vq->resubmit_blockers)
        return i < vq->resubmit_num ? i : vq->resubmit_num;
    for (; i < vq->resubmit_num; i++) {
        uint16_t head = vq->resubmit[i];
        if (head >= vq->size || !__atomic_load_n(&vq->resubmit_blockers[head], __ATOMIC_RELAXED))
            return i;
    }
    return vq->resubmit_num;
}

bool vu_resubmit_next(struct vu_vq *vq, uint16_t *head)
{
    uint32_t pos = vq->resubmit_pos, i = first_ready_resubmit(vq);
    if (i >= vq->resubmit_num)
        return false;
    /* Those held back stay next, in their order (vu_vq_unpop steps back
     * over the one popped). */
    uint16_t ready = vq->resubmit[i];
    memmove(&vq->resubmit[pos + 1], &vq->resubmit[pos], (i - pos) * sizeof(vq->resubmit[0]));
    vq->resubmit[pos] = ready;
    *head = ready;
    return true;
}

/* An orphan a resubmitted request waited for ended: when it was the last,
 * the worker looks at the ring again, as no kick comes for a request the
 * driver made available long ago (queue lock held; the worker stays while
 * it is, see vu_worker_free). */
static void release_resubmit(struct vu_vq *vq, struct vu_elem *e)
{
    e->blocks_resubmit = 0;
    uint16_t entry = region_entry(vq, e);
    if (!vq->resubmit_blockers || entry >= vq->size || !vq->resubmit_blockers[entry])
        return;
    if (__atomic_sub_fetch(&vq->resubmit_blockers[entry], 1, __ATOMIC_RELAXED) == 0 &&
        vq->started && vq->worker)
        vu_worker_kick(vq->worker, vq);
}

int vu_vq_start(struct vu_vq *vq)
{
    struct vu_dev *dev = vq->dev;
    if (vq->size == 0)
        return -VU_ERR_QUEUE_NOT_READY;
    if (vq->kick_eof)
        return -VU_ERR_KICK_FD;      /* its kick fd ended before it started */
    vq->packed = dev->features & (1ULL << VIRTIO_F_RING_PACKED);
    vq->event_idx = dev->features & (1ULL << VIRTIO_RING_F_EVENT_IDX);
    vq->indirect = dev->features & (1ULL << VIRTIO_RING_F_INDIRECT_DESC);
    /* Packed indices address descriptors directly: SET_VRING_BASE may have
     * named one beyond the ring (split indices are free-running). */
    if (vq->packed && (vq->last_avail_idx >= vq->size || vq->used_idx >= vq->size))
        return -VU_ERR_BAD_BASE;
    int rc = translate(vq);
    if (rc)
        return rc;
    vq->inflight_region = vq->packed ? NULL : vq->inflight_area;
    vq->inflight_packed = vq->packed ? vq->inflight_area : NULL;
    rc = alloc_pool(vq);
    if (rc)
        return rc;
    if (vq->inflight_area && !vq->resubmit_blockers) {
        vq->resubmit_blockers = calloc(vq->size, sizeof(*vq->resubmit_blockers));
        if (!vq->resubmit_blockers)
            return -VU_ERR_NOMEM;
    }
    pthread_mutex_lock(&vq->lock);
    vq->signalled_used_valid = false;
    if (vq->packed)
        vu_packed_sync(vq);
    else
        vu_split_sync(vq);
    hold_resubmits_of_orphans(vq);
    vq->pending_used = 0;
    vq->unnotified = 0;
    vq->broken = false;
    vq->error = 0;
    vq->started = true;
    if (vq->nheld)
        publish_held(vq);
    pthread_mutex_unlock(&vq->lock);
    return 0;
}

int vu_vq_remap(struct vu_vq *vq)
{
    if (!vq->started)
        return 0;
    int rc = translate(vq);
    if (rc)
        vu_vq_break(vq, -rc, vq->desc_addr);
    return rc;
}

static bool ring_live(const struct vu_vq *vq)
{
    return vq->started && rings_mapped(vq);
}

void vu_vq_stop(struct vu_vq *vq)
{
    pthread_mutex_lock(&vq->lock);
    /* Completions pushed and not flushed yet (a worker may drop the device
     * lock for I/O between its pushes and its flush) are published first:
     * the index GET_VRING_BASE returns counts them as used, and a restart
     * would write over them. */
    bool published = ring_live(vq) && vq->pending_used;
    if (published)
        flush_locked(vq);
    vq->started = false;
    vq->stop_known = true;
    vq->stop_base = base_of(vq, vq->packed);
    vq->stop_desc = vq->desc_addr;
    vq->stop_avail = vq->avail_addr;
    vq->stop_used = vq->used_addr;
    pthread_mutex_unlock(&vq->lock);
    if (published)
        vu_vq_signal(vq);
}

uint32_t vu_vq_forget_if_restarted(struct vu_vq *vq)
{
    bool packed = vq->dev->features & (1ULL << VIRTIO_F_RING_PACKED);
    pthread_mutex_lock(&vq->lock);
    uint32_t orphaned = 0;
    bool moved = base_of(vq, packed) != vq->stop_base || vq->desc_addr != vq->stop_desc ||
                 vq->avail_addr != vq->stop_avail || vq->used_addr != vq->stop_used;
    if (!vq->started && vq->stop_known && moved && vq->inflight > vq->norphans) {
        for (uint32_t i = 0; i < vq->pool_size; i++) {
            struct vu_elem *e = &vq->elems[i];
            if (!e->in_flight || e->orphan)
                continue;
            if (e->held) {
                elem_release(vq, e);     /* not an orphan: nothing to count */
            } else {
                vu_vq_orphan(vq, e);
                orphaned++;
            }
        }
        /* Answers go where the new driver's ring starts (see set_base). */
        vq->used_idx = vq->last_avail_idx;
        vq->used_wrap = vq->avail_wrap;
    }
    pthread_mutex_unlock(&vq->lock);
    return orphaned;
}

bool vu_vq_orphaned(const struct vu_elem *elem)
{
    /* Without the queue lock (a held request's I/O asks it each time): an
     * element in flight stops being an orphan only when it is released. */
    return __atomic_load_n(&elem->orphan, __ATOMIC_ACQUIRE);
}

/* Defined by cffi (extern "Python+C"): writes the one log line a broken
 * queue gets. Rare, so crossing into Python here costs nothing that matters. */
void vu_on_queue_broken(struct vu_dev *dev, uint32_t index, int err, uint64_t detail);

void vu_vq_break(struct vu_vq *vq, int err, uint64_t detail)
{
    if (!vq->broken) {
        vq->broken = true;
        vq->error = err;
        vq->error_detail = detail;
        if (vq->err_fd >= 0) {
            uint64_t one = 1;
            ssize_t r = write(vq->err_fd, &one, sizeof(one));
            (void)r;
        }
        vu_on_queue_broken(vq->dev, vq->index, err, detail);
    }
}

/* Element pool ------------------------------------------------------------ */

struct vu_elem *vu_elem_get(struct vu_vq *vq)
{
    if (vq->nfree == 0)
        return NULL;
    struct vu_elem *e = &vq->elems[vq->free_slots[--vq->nfree]];
    e->out_num = e->in_num = 0;
    e->out_len = e->in_len = 0;
    e->ndescs = 0;
    e->in_flight = 0;
    e->held = 0;
    e->orphan = 0;
    e->resubmitted = 0;
    e->blocks_resubmit = 0;
    e->inflight_head = UINT16_MAX;   /* packed: set when the region records it */
    /* No reference taken: the device counts the elements still using a
     * table when it retires it (vu_dev_install_mem). */
    e->mem = vq->dev->mem;
    return e;
}

void vu_elem_put(struct vu_vq *vq, struct vu_elem *e)
{
    vq->free_slots[vq->nfree++] = e->slot;
}

/* Asked when the ring has requests: every element is taken (orphans still
 * running hold them; a driver can't have more requests out than the ring
 * has entries, so not otherwise), and nothing can be popped. The ring is
 * then not reported available (the worker sleeps instead of spinning) and
 * the release that frees one kicks it (pool_freed). Also asked without the
 * queue lock (the worker's has_avail): the store before the second look
 * pairs with the release's fence, so either that release sees the wish or
 * this look sees its element. */
static bool pool_exhausted(struct vu_vq *vq)
{
    if (__atomic_load_n(&vq->nfree, __ATOMIC_RELAXED))
        return false;
    __atomic_store_n(&vq->pool_waited, true, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&vq->nfree, __ATOMIC_RELAXED) == 0;
}

/* An element went back to an empty pool (queue lock held): a worker that
 * found it empty looks at the ring again. */
static void pool_freed(struct vu_vq *vq)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&vq->pool_waited, __ATOMIC_RELAXED) && vq->started && vq->worker) {
        __atomic_store_n(&vq->pool_waited, false, __ATOMIC_RELAXED);
        vu_worker_kick(vq->worker, vq);
    }
}

/* Takes an in-flight element out of flight without publishing anything
 * (queue lock held). True when it was an orphan of a closed device: the
 * caller counts it with vu_dev_orphans_finished() once it let go of the
 * lock and stopped touching the queue (the count reaching 0 frees the
 * device, queues included, and another thread may bring it there). */
static bool elem_release(struct vu_vq *vq, struct vu_elem *e)
{
    struct vu_dev *dev = vq->dev;
    bool orphan = e->orphan;
    if (e->held)
        vq->nheld--;
    if (orphan)
        vq->norphans--;
    if (e->blocks_resubmit)
        release_resubmit(vq, e);
    e->in_flight = 0;
    e->held = 0;
    e->orphan = 0;
    vq->inflight--;
    if (e->mem != dev->mem)
        vu_mem_unpin(e->mem);       /* a retired table counted this element */
    e->mem = NULL;
    vu_elem_put(vq, e);
    if (vq->nfree == 1)
        pool_freed(vq);
    return orphan && dev->closing;
}

void vu_vq_orphan(struct vu_vq *vq, struct vu_elem *e)
{
    if (e->in_flight && !e->orphan) {
        __atomic_store_n(&e->orphan, 1, __ATOMIC_RELEASE);   /* vu_vq_orphaned reads it unlocked */
        vq->norphans++;
    }
}

static bool elem_valid(const struct vu_vq *vq, const struct vu_elem *e)
{
    return vq->elems && e >= vq->elems && e < vq->elems + vq->pool_size && e->in_flight &&
           !e->held;
}

/* Grows e->iov so it holds at least `need` entries, up to VU_MAX_IOV. */
int vu_elem_reserve(struct vu_elem *e, uint32_t need)
{
    if (need <= e->iov_cap)
        return 0;
    if (need > VU_MAX_IOV)
        return -VU_ERR_TOO_MANY_SEGMENTS;
    uint32_t cap = e->iov_cap ? e->iov_cap : VU_ELEM_INLINE_IOV;
    while (cap < need)
        cap *= 2;
    if (cap > VU_MAX_IOV)
        cap = VU_MAX_IOV;
    struct iovec *iov = realloc(e->iov, cap * sizeof(*iov));
    if (!iov)
        return -VU_ERR_NOMEM;
    e->iov = iov;
    e->iov_cap = cap;
    return 0;
}

/* Appends the translation of one descriptor to e. */
int vu_elem_add_buf(struct vu_vq *vq, struct vu_elem *e, uint64_t addr,
                    uint32_t len, bool writable)
{
    writable = writable && !vq->ignore_write;
    if (!writable && e->in_num > 0)
        return -VU_ERR_WRITE_BEFORE_READ;
    if (len == 0)
        return 0;
    for (;;) {
        uint32_t n = e->out_num + e->in_num;
        int rc = vu_gpa_to_iov(vq->dev->mem, addr, len, e->iov, &n, e->iov_cap);
        if (rc == 0) {
            uint32_t added = n - (e->out_num + e->in_num);
            if (writable) {
                e->in_num += added;
                e->in_len += len;
            } else {
                e->out_num += added;
                e->out_len += len;
            }
            return 0;
        }
        if (rc != -VU_ERR_TOO_MANY_SEGMENTS || e->iov_cap >= VU_MAX_IOV)
            return rc;
        rc = vu_elem_reserve(e, e->iov_cap ? e->iov_cap * 2 : VU_ELEM_INLINE_IOV);
        if (rc)
            return rc;
    }
}

const void *vu_vq_indirect_table(struct vu_vq *vq, uint64_t gpa, uint32_t len)
{
    void *direct = vu_gpa_to_hva(vq->dev->mem, gpa, len);
    if (direct)
        return direct;
    struct iovec iov[8];
    uint32_t n = 0;
    if (vu_gpa_to_iov(vq->dev->mem, gpa, len, iov, &n, 8))
        return NULL;
    if (vq->indirect_copy_cap < len) {
        void *p = realloc(vq->indirect_copy, len);
        if (!p)
            return NULL;
        vq->indirect_copy = p;
        vq->indirect_copy_cap = len;
    }
    uint8_t *to = vq->indirect_copy;
    for (uint32_t i = 0; i < n; i++) {
        memcpy(to, iov[i].iov_base, iov[i].iov_len);
        to += iov[i].iov_len;
    }
    return vq->indirect_copy;
}

/* Dispatch ------------------------------------------------------------------ */

int vu_vq_pop(struct vu_vq *vq, struct vu_elem **out)
{
    *out = NULL;
    if (VU_UNLIKELY(!vq->started))
        return 0;
    if (VU_UNLIKELY(vq->broken))
        return -VU_ERR_QUEUE_BROKEN;
    pthread_mutex_lock(&vq->lock);
    int rc = vq->packed ? vu_packed_pop(vq, out) : vu_split_pop(vq, out);
    if (rc == 1) {
        (*out)->in_flight = 1;
        vq->inflight++;
        vq->stat_popped++;
    }
    pthread_mutex_unlock(&vq->lock);
    return rc;
}

int vu_vq_pop_burst(struct vu_vq *vq, struct vu_elem **out, int max)
{
    if (VU_UNLIKELY(!vq->started))
        return 0;
    if (VU_UNLIKELY(vq->broken))
        return -VU_ERR_QUEUE_BROKEN;
    int n = 0, rc = 0;
    pthread_mutex_lock(&vq->lock);
    if (!vq->packed && first_ready_resubmit(vq) >= vq->resubmit_num) {
        rc = vu_split_pop_burst(vq, out, max);
        n = rc > 0 ? rc : 0;
    } else {
        while (n < max) {
            rc = vq->packed ? vu_packed_pop(vq, &out[n]) : vu_split_pop(vq, &out[n]);
            if (rc != 1)
                break;
            n++;
        }
    }
    for (int i = 0; i < n; i++)
        out[i]->in_flight = 1;
    vq->inflight += (uint32_t)n;
    vq->stat_popped += (uint64_t)n;
    pthread_mutex_unlock(&vq->lock);
    return n ? n : rc;
}

int vu_vq_discard(struct vu_vq *vq, struct vu_elem *elem)
{
    pthread_mutex_lock(&vq->lock);
    int rc = -VU_ERR_BAD_USED_ID;
    bool finished = false;
    if (elem_valid(vq, elem)) {
        finished = elem_release(vq, elem);
        rc = 0;
    }
    struct vu_dev *dev = vq->dev;
    pthread_mutex_unlock(&vq->lock);
    vu_dev_orphans_finished(dev, finished);
    return rc;
}

int vu_vq_unpop(struct vu_vq *vq, struct vu_elem *elem)
{
    pthread_mutex_lock(&vq->lock);
    if (!elem_valid(vq, elem) || elem->orphan || !vq->started) {
        /* Nothing to step back over: a reset or a stop came in between. */
        bool finished = elem_valid(vq, elem) && elem_release(vq, elem);
        struct vu_dev *dev = vq->dev;
        pthread_mutex_unlock(&vq->lock);
        vu_dev_orphans_finished(dev, finished);
        return -VU_ERR_BAD_USED_ID;
    }
    if (elem->resubmitted) {
        /* never took a ring entry: back on the resubmit list, still marked */
        vq->resubmit_pos--;
    } else if (vq->packed) {
        if (vq->inflight_packed)
            vu_packed_inflight_unpop(vq, elem);
        /* step back over the descriptors this buffer used */
        if (vq->last_avail_idx < elem->ndescs) {
            vq->last_avail_idx = (uint16_t)(vq->last_avail_idx + vq->size - elem->ndescs);
            vq->avail_wrap = !vq->avail_wrap;
        } else {
            vq->last_avail_idx = (uint16_t)(vq->last_avail_idx - elem->ndescs);
        }
    } else {
        vq->last_avail_idx--;
        if (vq->inflight_region)
            vq->inflight_region->desc[elem->id].inflight = 0;
    }
    vq->stat_popped--;
    elem_release(vq, elem);
    pthread_mutex_unlock(&vq->lock);
    return 0;
}

/* Completes elem: published on a running ring, held on a stopped one,
 * released without a trace for an orphan or a ring that lost its memory. */
static int push_locked(struct vu_vq *vq, struct vu_elem *elem, uint32_t len,
                       uint32_t *finished)
{
    if (!elem_valid(vq, elem))
        return -VU_ERR_BAD_USED_ID;
    if (len > elem->in_len)
        len = (uint32_t)elem->in_len;  /* never claim more than the driver gave */
    if (elem->orphan || (vq->started && !rings_mapped(vq))) {
        *finished += elem_release(vq, elem);
        return 0;
    }
    if (!vq->started) {
        elem->held = 1;
        elem->held_len = len;
        vq->nheld++;
        return 0;
    }
    if (vu_dev_logging(vq->dev))
        vu_log_elem_write(vq, elem, len);
    if (vq->packed)
        vu_packed_push(vq, elem, len);
    else
        vu_split_push(vq, elem, len);
    vq->stat_pushed++;
    elem_release(vq, elem);
    return 0;
}

int vu_vq_push(struct vu_vq *vq, struct vu_elem *elem, uint32_t len)
{
    uint32_t finished = 0;
    pthread_mutex_lock(&vq->lock);
    int rc = push_locked(vq, elem, len, &finished);
    struct vu_dev *dev = vq->dev;
    pthread_mutex_unlock(&vq->lock);
    vu_dev_orphans_finished(dev, finished);
    return rc;
}

int vu_vq_push_burst(struct vu_vq *vq, struct vu_elem *const *elems, const uint32_t *lens, int n)
{
    int rc = 0;
    uint32_t finished = 0;
    pthread_mutex_lock(&vq->lock);
    for (int i = 0; i < n; i++) {
        int r = push_locked(vq, elems[i], lens ? lens[i] : 0, &finished);
        if (r && !rc)
            rc = r;
    }
    struct vu_dev *dev = vq->dev;
    pthread_mutex_unlock(&vq->lock);
    vu_dev_orphans_finished(dev, finished);
    return rc;
}

void vu_vq_flush(struct vu_vq *vq)
{
    pthread_mutex_lock(&vq->lock);
    if (ring_live(vq))
        flush_locked(vq);
    pthread_mutex_unlock(&vq->lock);
}

void vu_vq_notify(struct vu_vq *vq)
{
    pthread_mutex_lock(&vq->lock);
    bool need = false;
    if (ring_live(vq) && vq->unnotified) {
        need = vq->packed ? vu_packed_need_notify(vq) : vu_split_need_notify(vq);
        vq->unnotified = 0;
    }
    int fd = vq->call_fd;
    pthread_mutex_unlock(&vq->lock);
    if (need && fd >= 0) {
        vu_fault_before_notify();
        uint64_t one = 1;
        ssize_t r = write(fd, &one, sizeof(one));
        (void)r;
        __atomic_add_fetch(&vq->stat_notifies, 1, __ATOMIC_RELAXED);
    }
}

void vu_vq_signal(struct vu_vq *vq)
{
    pthread_mutex_lock(&vq->lock);
    int fd = vq->call_fd;
    pthread_mutex_unlock(&vq->lock);
    if (fd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(fd, &one, sizeof(one));
        (void)r;
    }
}

static int complete(struct vu_vq *vq, struct vu_elem *elem, uint32_t len, bool notify)
{
    uint32_t finished = 0;
    pthread_mutex_lock(&vq->lock);
    int rc = push_locked(vq, elem, len, &finished);
    bool live = rc == 0 && !finished && ring_live(vq);
    if (live)
        flush_locked(vq);
    struct vu_dev *dev = vq->dev;
    pthread_mutex_unlock(&vq->lock);
    if (finished) {
        vu_dev_orphans_finished(dev, finished);
        return 0;
    }
    if (live && notify)
        vu_vq_notify(vq);
    return rc;
}

int vu_vq_complete(struct vu_vq *vq, struct vu_elem *elem, uint32_t len)
{
    return complete(vq, elem, len, true);
}

int vu_vq_complete_unlocked(struct vu_vq *vq, struct vu_elem *elem, uint32_t len, bool notify)
{
    struct vu_dev *dev = vq->dev;
    vu_dev_rdlock(dev);
    if (dev->closing) {
        /* Closed (vu_dev_close ran under the write lock): nothing changes
         * the rings any more, and this orphan's completion may be the one
         * that frees the device, lock included. */
        vu_dev_unlock(dev);
        return complete(vq, elem, len, false);
    }
    /* Not closing, so not freed by this completion. */
    int rc = complete(vq, elem, len, notify);
    vu_dev_unlock(dev);
    return rc;
}

static bool set_notification_locked(struct vu_vq *vq, bool enable)
{
    return vq->packed ? vu_packed_set_notification(vq, enable)
                      : vu_split_set_notification(vq, enable);
}

bool vu_vq_set_notification(struct vu_vq *vq, bool enable)
{
    if (!vq->started || vq->broken)
        return false;
    pthread_mutex_lock(&vq->lock);
    bool more;
    if (enable && vq->polling) {
        vq->notify_deferred = true;
        more = vu_vq_has_avail(vq);
    } else {
        vq->notify_deferred = false;
        more = set_notification_locked(vq, enable) && !pool_exhausted(vq);
    }
    pthread_mutex_unlock(&vq->lock);
    return more;
}

void vu_vq_start_polling(struct vu_vq *vq)
{
    pthread_mutex_lock(&vq->lock);
    vq->polling = true;
    pthread_mutex_unlock(&vq->lock);
}

bool vu_vq_stop_polling(struct vu_vq *vq)
{
    pthread_mutex_lock(&vq->lock);
    bool more = false;
    vq->polling = false;
    if (vq->notify_deferred) {
        vq->notify_deferred = false;
        if (vq->started && !vq->broken)
            more = set_notification_locked(vq, true) && !pool_exhausted(vq);
    }
    pthread_mutex_unlock(&vq->lock);
    return more;
}

bool vu_vq_has_avail(struct vu_vq *vq)
{
    if (!vq->started || vq->broken)
        return false;
    bool avail = first_ready_resubmit(vq) < vq->resubmit_num ||
                 (vq->packed ? vu_packed_has_avail(vq) : vu_split_has_avail(vq));
    /* Asked second: only requests that wait for an element ask for a kick. */
    return avail && !pool_exhausted(vq);
}

uint32_t vu_vq_inflight(struct vu_vq *vq)
{
    /* Racy reads of three counters the queue lock guards: for polling
     * (a drain), not for decisions. */
    uint32_t all = __atomic_load_n(&vq->inflight, __ATOMIC_ACQUIRE);
    uint32_t done = __atomic_load_n(&vq->nheld, __ATOMIC_ACQUIRE) +
                    __atomic_load_n(&vq->norphans, __ATOMIC_ACQUIRE);
    return all > done ? all - done : 0;
}

/* Dirty logging of what a completion wrote into guest memory. */
void vu_log_elem_write(struct vu_vq *vq, struct vu_elem *elem, uint32_t len)
{
    struct iovec *iov = elem->iov + elem->out_num;
    /* The table the buffers were translated with (pinned while in flight):
     * one installed since may map the same guest pages at other addresses. */
    struct vu_mem *mem = elem->mem ? elem->mem : vq->dev->mem;
    for (uint32_t i = 0; i < elem->in_num && len > 0; i++) {
        uint32_t chunk = iov[i].iov_len < len ? (uint32_t)iov[i].iov_len : len;
        uint64_t gpa = vu_hva_to_gpa(mem, iov[i].iov_base);
        if (gpa != UINT64_MAX)
            vu_log_write(vq->dev, gpa, chunk);
        len -= chunk;
    }
}

/* Used-ring writes are logged at log_addr + offset (VHOST_VRING_F_LOG). */
void vu_log_used_write(struct vu_vq *vq, uint64_t offset, uint64_t len)
{
    if (vu_dev_logging(vq->dev))
        vu_log_write(vq->dev, vq->log_addr + offset, len);
}

int vu_vq_set_inflight(struct vu_vq *vq, void *region)
{
    if (vq->started)
        return -VU_ERR_INVAL;
    vq->inflight_area = region;
    return 0;
}
