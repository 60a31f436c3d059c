/* Split virtqueue, device side (virtio 1.x section 2.7).
 *
 * Everything read from the ring is guest-controlled: each value is read once
 * into a local, checked, and only then used. Chain walks are bounded by the
 * table size, so a looping chain ends in VU_ERR_CHAIN_LOOP, never a hang. */
#include "vu_ring_impl.h"
#include "vu_dev.h"

#include <stdlib.h>
#include <string.h>

static size_t avail_bytes(uint16_t size)
{
    return 4 + 2 * (size_t)size + 2;   /* flags, idx, ring[], used_event */
}

static size_t used_bytes(uint16_t size)
{
    return 4 + 8 * (size_t)size + 2;   /* flags, idx, ring[], avail_event */
}

static void rebuild_inflight(struct vu_vq *vq);

int vu_split_translate(struct vu_vq *vq)
{
    struct vu_mem *mem = vq->dev->mem;
    vq->desc = vu_uva_to_hva(mem, vq->desc_addr, 16 * (uint64_t)vq->size);
    vq->avail = vu_uva_to_hva(mem, vq->avail_addr, avail_bytes(vq->size));
    vq->used = vu_uva_to_hva(mem, vq->used_addr, used_bytes(vq->size));
    if (!vq->desc || !vq->avail || !vq->used)
        return -VU_ERR_RING_UNMAPPED;
    /* Alignment the spec requires; a misaligned ring would make our 16/32-bit
     * accesses non-atomic. */
    if ((vq->desc_addr & 15) || (vq->avail_addr & 1) || (vq->used_addr & 3))
        return -VU_ERR_RING_UNMAPPED;
    return 0;
}

void vu_split_sync(struct vu_vq *vq)
{
    /* Where completions stand is what the used ring says, not what
     * SET_VRING_BASE guessed. */
    vq->used_idx = VU_READ_ONCE(vq->used->idx);
    vq->signalled_used = vq->used_idx;
    if (vq->inflight_region)
        rebuild_inflight(vq);
}

static uint16_t *used_event_ptr(struct vu_vq *vq)
{
    return &vq->avail->ring[vq->size];
}

static uint16_t *avail_event_ptr(struct vu_vq *vq)
{
    return (uint16_t *)&vq->used->ring[vq->size];
}

bool vu_split_has_avail(struct vu_vq *vq)
{
    return VU_READ_ONCE(vq->avail->idx) != vq->last_avail_idx;
}

/* Walks the chain starting at head into e. */
static int walk_chain(struct vu_vq *vq, uint16_t head, struct vu_elem *e,
                      uint64_t *detail)
{
    const struct vring_desc *table = vq->desc;
    uint32_t max = vq->size;
    uint32_t i = head;
    uint32_t count = 0;
    bool in_indirect = false;

    for (;;) {
        if (i >= max) {
            *detail = i;
            return -VU_ERR_DESC_INDEX;
        }
        if (++count > max) {
            *detail = head;
            return -VU_ERR_CHAIN_LOOP;
        }
        struct vring_desc d;
        memcpy(&d, &table[i], sizeof(d));  /* one snapshot: no TOCTOU */

        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (!vq->indirect) {
                *detail = i;
                return -VU_ERR_INDIRECT_NOT_NEGOTIATED;
            }
            if (in_indirect) {
                *detail = i;
                return -VU_ERR_NESTED_INDIRECT;
            }
            if (d.flags & VRING_DESC_F_NEXT) {
                *detail = i;
                return -VU_ERR_INDIRECT_NEXT;
            }
            if (d.len == 0 || d.len % sizeof(struct vring_desc) ||
                d.len / sizeof(struct vring_desc) > VU_MAX_QUEUE_SIZE) {
                *detail = d.len;
                return -VU_ERR_INDIRECT_SIZE;
            }
            table = vu_vq_indirect_table(vq, d.addr, d.len);
            if (!table) {
                *detail = d.addr;
                return -VU_ERR_ADDR_UNMAPPED;
            }
            max = d.len / sizeof(struct vring_desc);
            i = 0;
            count = 0;
            in_indirect = true;
            continue;
        }

        int rc = vu_elem_add_buf(vq, e, d.addr, d.len, d.flags & VRING_DESC_F_WRITE);
        if (rc) {
            *detail = d.addr;
            return rc;
        }
        if (!(d.flags & VRING_DESC_F_NEXT))
            return 0;
        i = d.next;
    }
}

static int pop_head(struct vu_vq *vq, uint16_t head, struct vu_elem **out)
{
    struct vu_elem *e = vu_elem_get(vq);
    if (!e)
        return 0;   /* every slot in flight: the driver can't have more */
    uint64_t detail = 0;
    int rc = vu_elem_reserve(e, 4);
    if (!rc)
        rc = walk_chain(vq, head, e, &detail);
    if (rc) {
        vu_elem_put(vq, e);
        vu_vq_break(vq, -rc, detail);
        return rc;
    }
    e->id = head;
    e->ndescs = 1;
    *out = e;
    return 1;
}

int vu_split_pop(struct vu_vq *vq, struct vu_elem **out)
{
    uint16_t head;
    if (vu_resubmit_next(vq, &head)) {
        /* Taken off the list only once popped: a full pool keeps it there. */
        int rc = pop_head(vq, head, out);
        if (rc == 1) {
            vq->resubmit_pos++;
            (*out)->resubmitted = 1;
        }
        return rc;
    }
    return vu_split_pop_burst(vq, out, 1);
}

int vu_split_pop_burst(struct vu_vq *vq, struct vu_elem **out, int max)
{
    /* One look at the driver's index for the burst: the line it is in is
     * the one the driver writes most, and every read of it can miss. */
    uint16_t avail_idx = VU_READ_ONCE(vq->avail->idx);
    uint16_t pending = (uint16_t)(avail_idx - vq->last_avail_idx);
    if (pending == 0)
        return 0;
    if (pending > vq->size) {
        vu_vq_break(vq, VU_ERR_AVAIL_IDX_JUMP, avail_idx);
        return -VU_ERR_AVAIL_IDX_JUMP;
    }
    uint16_t heads[VU_SPLIT_BURST];
    uint32_t want = pending;
    if (want > (uint32_t)max)
        want = (uint32_t)max;
    if (want > VU_SPLIT_BURST)
        want = VU_SPLIT_BURST;
    if (want > vq->nfree)
        want = vq->nfree;
    /* Read ring entries only after seeing the index that covers them. */
    vu_smp_rmb();
    uint16_t mask = (uint16_t)(vq->size - 1);
    /* Heads first, and for a burst their descriptors fetched together: they
     * were written on the driver's CPU, and the misses then overlap. A single
     * pop (vu_split_pop: disks, one frame) reads its descriptor at once, and
     * may complete much later: prefetching would only take the used ring's
     * line from the driver early. */
    for (uint32_t i = 0; i < want; i++) {
        heads[i] = VU_READ_ONCE(vq->avail->ring[(uint16_t)(vq->last_avail_idx + i) & mask]);
        if (want > 1)
            __builtin_prefetch(&vq->desc[heads[i] & mask]);
    }
    if (want > 1)
        vu_prefetch(&vq->used->ring[(uint16_t)(vq->used_idx + vq->pending_used) & mask],
                    1 + (want * 8u) / 64u, 1);
    int n = 0;
    for (uint32_t i = 0; i < want; i++) {
        uint16_t head = heads[i];
        if (head >= vq->size) {
            vu_vq_break(vq, VU_ERR_BAD_HEAD, head);
            return n ? n : -VU_ERR_BAD_HEAD;
        }
        int rc = pop_head(vq, head, &out[n]);
        if (rc != 1)
            return n ? n : rc;
        vq->last_avail_idx++;
        if (vq->inflight_region) {
            struct vu_inflight_split_desc *d = &vq->inflight_region->desc[head];
            d->counter = vq->inflight_counter++;
            d->inflight = 1;
        }
        n++;
    }
    return n;
}

void vu_split_push(struct vu_vq *vq, struct vu_elem *elem, uint32_t len)
{
    uint16_t slot = (uint16_t)((vq->used_idx + vq->pending_used) & (vq->size - 1));
    struct vring_used_elem *u = &vq->used->ring[slot];
    VU_WRITE_ONCE(u->id, (uint32_t)elem->id);
    VU_WRITE_ONCE(u->len, len);
    vu_log_used(vq, 4 + 8 * (uint64_t)slot, 8);
    vq->pending_used++;
    if (vq->inflight_region) {
        vq->inflight_region->desc[elem->id].next = vq->inflight_region->last_batch_head;
        vq->inflight_region->last_batch_head = elem->id;
        vq->batch_num++;
    }
}

void vu_split_flush(struct vu_vq *vq)
{
    if (!vq->pending_used)
        return;
    /* The used elements must be visible before the index that covers them. */
    vu_smp_wmb();
    vq->used_idx = (uint16_t)(vq->used_idx + vq->pending_used);
    VU_WRITE_ONCE(vq->used->idx, vq->used_idx);
    vu_log_used(vq, 2, 2);
    vq->unnotified += vq->pending_used;
    vq->pending_used = 0;

    struct vu_inflight_split *r = vq->inflight_region;
    if (r) {
        uint16_t h = r->last_batch_head;
        for (uint16_t n = 0; n < vq->batch_num && h < vq->size; n++) {
            r->desc[h].inflight = 0;
            h = r->desc[h].next;
        }
        vu_smp_wmb();
        r->used_idx = vq->used_idx;
        vq->batch_num = 0;
    }
}

bool vu_split_need_notify(struct vu_vq *vq)
{
    /* Our used->idx store must be visible before we read the driver's
     * suppression state, or we might miss a wake-up it expects. */
    vu_smp_mb();
    if (vq->event_idx) {
        uint16_t old = vq->signalled_used;
        uint16_t new_idx = vq->used_idx;
        bool valid = vq->signalled_used_valid;
        vq->signalled_used = new_idx;
        vq->signalled_used_valid = true;
        uint16_t event = VU_READ_ONCE(*used_event_ptr(vq));
        return !valid || vu_need_event(event, new_idx, old);
    }
    return !(VU_READ_ONCE(vq->avail->flags) & VRING_AVAIL_F_NO_INTERRUPT);
}

bool vu_split_set_notification(struct vu_vq *vq, bool enable)
{
    if (vq->event_idx) {
        /* With EVENT_IDX "off" means: don't move avail_event forward. */
        if (!enable)
            return false;
        VU_WRITE_ONCE(*avail_event_ptr(vq), VU_READ_ONCE(vq->avail->idx));
        vu_log_used(vq, 4 + 8 * (uint64_t)vq->size, 2);
    } else {
        uint16_t flags = enable ? 0 : VRING_USED_F_NO_NOTIFY;
        VU_WRITE_ONCE(vq->used->flags, flags);
        vu_log_used(vq, 0, 2);
        if (!enable)
            return false;
    }
    /* A buffer added between our last pop and the flag change would get no
     * kick: look again after the store is visible. */
    vu_smp_mb();
    return vu_split_has_avail(vq);
}

static int cmp_counter(const void *a, const void *b, void *arg)
{
    const struct vu_inflight_split *r = arg;
    uint64_t ca = r->desc[*(const uint16_t *)a].counter;
    uint64_t cb = r->desc[*(const uint16_t *)b].counter;
    return ca < cb ? -1 : ca > cb;
}

/* After a reconnect: repair the last batch and list what was in flight,
 * oldest first (vhost-user.rst, "Inflight I/O tracking"). */
static void rebuild_inflight(struct vu_vq *vq)
{
    struct vu_inflight_split *r = vq->inflight_region;
    vq->batch_num = 0;
    if (r->version == 0 || r->desc_num != vq->size) {
        /* fresh region: initialise it */
        vq->resubmit_num = vq->resubmit_pos = 0;
        memset(r->desc, 0, sizeof(r->desc[0]) * vq->size);
        r->version = 1;
        r->desc_num = vq->size;
        r->last_batch_head = 0;
        r->used_idx = vq->used_idx;
        vq->inflight_counter = 1;
        return;
    }
    if (vq->inflight > vq->norphans) {
        /* A restart within the session (GET_VRING_BASE gave up waiting):
         * what the region marks is what our own pool still holds, and it
         * completes on its own; resubmitting it would answer it twice.
         * Resubmissions not popped yet (waiting for an orphan) stay. */
        return;
    }
    vq->resubmit_num = vq->resubmit_pos = 0;
    if (r->used_idx != vq->used_idx) {
        uint16_t batch = (uint16_t)(vq->used_idx - r->used_idx);
        uint16_t h = r->last_batch_head;
        for (uint16_t n = 0; n < batch && n < vq->size && h < vq->size; n++) {
            r->desc[h].inflight = 0;
            h = r->desc[h].next;
        }
        r->used_idx = vq->used_idx;
    }
    if (!vq->resubmit) {
        vq->resubmit = calloc(vq->size, sizeof(uint16_t));
        if (!vq->resubmit)
            return;
    }
    uint64_t max_counter = 0;
    for (uint16_t i = 0; i < vq->size; i++) {
        if (r->desc[i].inflight == 1) {
            vq->resubmit[vq->resubmit_num++] = i;
            if (r->desc[i].counter > max_counter)
                max_counter = r->desc[i].counter;
        }
    }
    qsort_r(vq->resubmit, vq->resubmit_num, sizeof(uint16_t), cmp_counter, r);
    vq->inflight_counter = max_counter + 1;
    /* The front-end restarts us at its used index; what we resubmit was
     * popped beyond it already. */
    vq->last_avail_idx = (uint16_t)(vq->used_idx + vq->resubmit_num);
}
