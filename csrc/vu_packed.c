/* Packed virtqueue, device side (virtio 1.x section 2.8).
 *
 * Descriptors are available when their AVAIL bit equals our avail wrap
 * counter and differs from their USED bit. As with the split ring, each
 * descriptor is snapshotted once and every walk is bounded by the ring size. */
#include "vu_ring_impl.h"
#include "vu_dev.h"

#include <stdlib.h>
#include <string.h>

#define F_AVAIL (1 << VRING_PACKED_DESC_F_AVAIL)
#define F_USED (1 << VRING_PACKED_DESC_F_USED)

int vu_packed_translate(struct vu_vq *vq)
{
    struct vu_mem *mem = vq->dev->mem;
    /* For packed rings SET_VRING_ADDR's avail/used carry the driver and
     * device event suppression areas. */
    vq->pdesc = vu_uva_to_hva(mem, vq->desc_addr, 16 * (uint64_t)vq->size);
    vq->driver_event = vu_uva_to_hva(mem, vq->avail_addr, 4);
    vq->device_event = vu_uva_to_hva(mem, vq->used_addr, 4);
    if (!vq->pdesc || !vq->driver_event || !vq->device_event)
        return -VU_ERR_RING_UNMAPPED;
    if ((vq->desc_addr & 15) || (vq->avail_addr & 3) || (vq->used_addr & 3))
        return -VU_ERR_RING_UNMAPPED;
    return 0;
}

static void rebuild_inflight(struct vu_vq *vq);

void vu_packed_sync(struct vu_vq *vq)
{
    if (vq->inflight_packed)
        rebuild_inflight(vq);
    vq->packed_signalled_used = (uint16_t)(vq->used_idx | (vq->used_wrap << 15));
}

/* Inflight tracking (vhost-user.rst, "Inflight I/O tracking", packed) ------ *
 * The region is front-end memory: every index read from it is checked, and
 * a region that does not hold together stops being tracked (with a log line
 * through vu_vq_break's hook) rather than steering us out of bounds. */

static void advance(uint16_t *idx, bool *wrap, uint32_t n, uint16_t size)
{
    uint32_t next = (uint32_t)*idx + n;
    while (next >= size) {
        next -= size;
        *wrap = !*wrap;
    }
    *idx = (uint16_t)next;
}

static void drop_inflight(struct vu_vq *vq)
{
    vq->inflight_packed = NULL;
    vq->batch_heads_num = 0;
    vq->resubmit_num = vq->resubmit_pos = 0;
}

static int cmp_packed_counter(const void *a, const void *b, void *arg)
{
    const struct vu_inflight_packed *r = arg;
    uint64_t ca = r->desc[*(const uint16_t *)a].counter;
    uint64_t cb = r->desc[*(const uint16_t *)b].counter;
    return ca < cb ? -1 : ca > cb;
}

static void rebuild_inflight(struct vu_vq *vq)
{
    struct vu_inflight_packed *r = vq->inflight_packed;
    uint16_t size = vq->size;
    vq->batch_heads_num = 0;
    if (!vq->batch_heads)
        vq->batch_heads = calloc(size, sizeof(uint16_t));
    if (!vq->resubmit)
        vq->resubmit = calloc(size, sizeof(uint16_t));
    if (!vq->batch_heads || !vq->resubmit) {
        drop_inflight(vq);
        return;
    }
    if (r->version == 0 || r->desc_num != size) {
        /* a fresh region: every entry free, in a list */
        vq->resubmit_num = vq->resubmit_pos = 0;
        memset(r->desc, 0, sizeof(r->desc[0]) * size);
        for (uint16_t i = 0; i < size; i++)
            r->desc[i].next = (uint16_t)(i + 1);
        r->free_head = r->old_free_head = 0;
        r->used_idx = r->old_used_idx = vq->used_idx;
        r->used_wrap_counter = r->old_used_wrap_counter = vq->used_wrap;
        r->version = 1;
        r->desc_num = size;
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
    if (r->free_head >= size || r->old_free_head >= size || r->used_idx >= size ||
        r->old_used_idx >= size) {
        drop_inflight(vq);
        return;
    }
    if (r->used_idx != r->old_used_idx) {
        /* Did the crash come after the batch's descriptor went to the
         * driver? Then commit it, else roll it back. */
        uint16_t flags = VU_READ_ONCE(vq->pdesc[r->old_used_idx].flags) & (F_AVAIL | F_USED);
        uint16_t still_avail = r->old_used_wrap_counter ? F_AVAIL : F_USED;
        if (flags != still_avail) {
            r->old_free_head = r->free_head;
            r->old_used_idx = r->used_idx;
            r->old_used_wrap_counter = r->used_wrap_counter;
        }
    }
    r->free_head = r->old_free_head;
    r->used_idx = r->old_used_idx;
    r->used_wrap_counter = r->old_used_wrap_counter;
    /* whatever is on the free list is not in flight */
    uint16_t h = r->free_head;
    for (uint32_t n = 0; n < size && h < size; n++) {
        r->desc[h].inflight = 0;
        h = r->desc[h].next;
    }
    uint64_t max_counter = 0;
    uint32_t entries = 0;
    for (uint16_t i = 0; i < size; i++) {
        if (r->desc[i].inflight != 1)
            continue;
        if (r->desc[i].num == 0 || r->desc[i].num > size) {
            drop_inflight(vq);
            return;
        }
        vq->resubmit[vq->resubmit_num++] = i;
        entries += r->desc[i].num;
        if (r->desc[i].counter > max_counter)
            max_counter = r->desc[i].counter;
    }
    if (entries > size) {
        drop_inflight(vq);
        return;
    }
    qsort_r(vq->resubmit, vq->resubmit_num, sizeof(uint16_t), cmp_packed_counter, r);
    vq->inflight_counter = max_counter + 1;
    /* The device side restarts where the region says completions stand;
     * what is resubmitted was taken from the ring beyond that. */
    vq->used_idx = r->used_idx;
    vq->used_wrap = r->used_wrap_counter;
    vq->last_avail_idx = r->used_idx;
    vq->avail_wrap = r->used_wrap_counter;
    advance(&vq->last_avail_idx, &vq->avail_wrap, entries, size);
}

/* Records one ring descriptor of the chain being popped. */
static bool record_desc(struct vu_vq *vq, const struct vring_packed_desc *d, bool first,
                        bool last)
{
    struct vu_inflight_packed *r = vq->inflight_packed;
    uint16_t head = r->old_free_head, slot = r->free_head;
    if (head >= vq->size || slot >= vq->size)
        return false;
    if (first) {
        r->desc[head].num = 0;
        r->desc[head].counter = vq->inflight_counter++;
        r->desc[head].inflight = 1;
    }
    if (last)
        r->desc[head].last = slot;
    r->desc[head].num++;
    r->desc[slot].addr = d->addr;
    r->desc[slot].len = d->len;
    r->desc[slot].flags = d->flags;
    r->desc[slot].id = d->id;
    r->free_head = r->desc[slot].next;
    if (last)
        r->old_free_head = r->free_head;
    return true;
}

void vu_packed_inflight_unpop(struct vu_vq *vq, struct vu_elem *elem)
{
    /* Undo the most recent pop: its entries go back to the head of the free
     * list, which still links through them. */
    struct vu_inflight_packed *r = vq->inflight_packed;
    if (elem->inflight_head >= vq->size)
        return;
    r->desc[elem->inflight_head].inflight = 0;
    r->free_head = r->old_free_head = elem->inflight_head;
}

static bool desc_is_avail(uint16_t flags, bool wrap)
{
    bool avail = flags & F_AVAIL;
    bool used = flags & F_USED;
    return avail != used && avail == wrap;
}

bool vu_packed_has_avail(struct vu_vq *vq)
{
    uint16_t flags = VU_READ_ONCE(vq->pdesc[vq->last_avail_idx].flags);
    return desc_is_avail(flags, vq->avail_wrap);
}

static int walk_indirect(struct vu_vq *vq, struct vu_elem *e,
                         const struct vring_packed_desc *d, uint64_t *detail)
{
    if (!vq->indirect) {
        *detail = d->addr;
        return -VU_ERR_INDIRECT_NOT_NEGOTIATED;
    }
    if (d->len == 0 || d->len % sizeof(struct vring_packed_desc) ||
        d->len / sizeof(struct vring_packed_desc) > vq->size) {
        *detail = d->len;
        return -VU_ERR_INDIRECT_SIZE;
    }
    const struct vring_packed_desc *table = vu_vq_indirect_table(vq, d->addr, d->len);
    if (!table) {
        *detail = d->addr;
        return -VU_ERR_ADDR_UNMAPPED;
    }
    uint32_t n = d->len / sizeof(struct vring_packed_desc);
    for (uint32_t i = 0; i < n; i++) {
        struct vring_packed_desc t;
        memcpy(&t, &table[i], sizeof(t));
        if (t.flags & VRING_DESC_F_INDIRECT) {
            *detail = i;
            return -VU_ERR_NESTED_INDIRECT;
        }
        int rc = vu_elem_add_buf(vq, e, t.addr, t.len, t.flags & VRING_DESC_F_WRITE);
        if (rc) {
            *detail = t.addr;
            return rc;
        }
    }
    return 0;
}

/* Adds one descriptor (from the ring, or saved in the inflight region) to
 * e; `first` says whether it heads the chain (an indirect one must). */
static int add_desc(struct vu_vq *vq, struct vu_elem *e, const struct vring_packed_desc *d,
                    bool first, uint64_t *detail)
{
    if (d->flags & VRING_DESC_F_INDIRECT) {
        if (!first || (d->flags & VRING_DESC_F_NEXT)) {
            /* an indirect descriptor must stand alone */
            *detail = d->addr;
            return -VU_ERR_INDIRECT_NEXT;
        }
        return walk_indirect(vq, e, d, detail);
    }
    int rc = vu_elem_add_buf(vq, e, d->addr, d->len, d->flags & VRING_DESC_F_WRITE);
    if (rc)
        *detail = d->addr;
    return rc;
}

/* A request that was in flight when the previous back-end died, rebuilt
 * from the copies the inflight region kept of its descriptors. */
static int pop_resubmit(struct vu_vq *vq, uint16_t head, struct vu_elem **out)
{
    struct vu_inflight_packed *r = vq->inflight_packed;
    struct vu_elem *e = vu_elem_get(vq);
    if (!e)
        return 0;   /* taken off the list only once popped */
    uint64_t detail = 0;
    int rc = vu_elem_reserve(e, 4);
    uint16_t j = head, id = 0, num = r->desc[head].num;
    for (uint16_t k = 0; rc == 0 && k < num; k++) {
        if (j >= vq->size) {
            rc = -VU_ERR_INFLIGHT;
            detail = j;
            break;
        }
        struct vring_packed_desc d = {
            .addr = r->desc[j].addr, .len = r->desc[j].len,
            .id = r->desc[j].id, .flags = r->desc[j].flags,
        };
        id = d.id;
        rc = add_desc(vq, e, &d, k == 0, &detail);
        j = r->desc[j].next;
    }
    if (rc) {
        vu_elem_put(vq, e);
        vu_vq_break(vq, -rc, detail);
        return rc;
    }
    e->id = id;
    e->ndescs = num;
    e->inflight_head = head;
    e->resubmitted = 1;
    vq->resubmit_pos++;
    *out = e;
    return 1;
}

int vu_packed_pop(struct vu_vq *vq, struct vu_elem **out)
{
    uint16_t head;
    if (vq->inflight_packed && vu_resubmit_next(vq, &head))
        return pop_resubmit(vq, head, out);
    uint16_t idx = vq->last_avail_idx;
    bool wrap = vq->avail_wrap;
    uint16_t flags = VU_READ_ONCE(vq->pdesc[idx].flags);
    if (!desc_is_avail(flags, wrap))
        return 0;
    struct vu_elem *e = vu_elem_get(vq);
    if (!e)
        return 0;
    /* The rest of the descriptor is valid only once its flags say so. */
    vu_smp_rmb();

    uint64_t detail = 0;
    int rc = vu_elem_reserve(e, 4);
    uint16_t count = 0;
    uint16_t id = 0;
    while (rc == 0) {
        if (count >= vq->size) {
            rc = -VU_ERR_CHAIN_LOOP;
            detail = vq->last_avail_idx;
            break;
        }
        struct vring_packed_desc d;
        memcpy(&d, &vq->pdesc[idx], sizeof(d));
        count++;
        if (++idx >= vq->size) {
            idx = 0;
            wrap = !wrap;
        }
        id = d.id;
        bool last = (d.flags & VRING_DESC_F_INDIRECT) || !(d.flags & VRING_DESC_F_NEXT);
        if (vq->inflight_packed) {
            if (count == 1)
                e->inflight_head = vq->inflight_packed->old_free_head;
            if (!record_desc(vq, &d, count == 1, last))
                drop_inflight(vq);
        }
        rc = add_desc(vq, e, &d, count == 1, &detail);
        if (rc || last)
            break;
    }
    if (rc) {
        vu_elem_put(vq, e);
        vu_vq_break(vq, -rc, detail);
        return rc;
    }
    e->id = id;             /* the buffer id is in the chain's last descriptor */
    e->ndescs = count;
    vq->last_avail_idx = idx;
    vq->avail_wrap = wrap;
    *out = e;
    return 1;
}

void vu_packed_push(struct vu_vq *vq, struct vu_elem *elem, uint32_t len)
{
    struct vring_packed_desc *d = &vq->pdesc[vq->used_idx];
    uint16_t flags = vq->used_wrap ? (F_AVAIL | F_USED) : 0;
    if (elem->in_len)
        flags |= VRING_DESC_F_WRITE;
    VU_WRITE_ONCE(d->id, elem->id);
    VU_WRITE_ONCE(d->len, len);
    struct vu_inflight_packed *r = vq->inflight_packed;
    if (r) {
        uint16_t e = elem->inflight_head;
        uint16_t last = e < vq->size ? r->desc[e].last : vq->size;
        if (last < vq->size && vq->batch_heads_num < vq->size) {
            r->desc[last].next = r->free_head;
            r->free_head = e;
            vq->batch_heads[vq->batch_heads_num++] = e;
        } else {
            drop_inflight(vq);
        }
    }
    if (!vq->pending_used) {
        /* The first descriptor of a batch is handed back last, in
         * vu_packed_flush: a driver reads used descriptors in ring order,
         * so it sees none of the batch (e.g. a frame's mergeable buffers)
         * before all of it is written. */
        vq->pending_head = vq->used_idx;
        vq->pending_head_flags = flags;
    } else {
        /* id and len before the flags that hand the descriptor back */
        vu_smp_wmb();
        VU_WRITE_ONCE(d->flags, flags);
        vu_log_used(vq, 16 * (uint64_t)vq->used_idx, 16);
    }
    vq->pending_used++;
    uint32_t next = (uint32_t)vq->used_idx + elem->ndescs;
    if (next >= vq->size) {
        next -= vq->size;
        vq->used_wrap = !vq->used_wrap;
    }
    vq->used_idx = (uint16_t)next;
}

void vu_packed_flush(struct vu_vq *vq)
{
    if (!vq->pending_used)
        return;
    struct vring_packed_desc *d = &vq->pdesc[vq->pending_head];
    struct vu_inflight_packed *r = vq->inflight_packed;
    if (r) {
        r->used_idx = vq->used_idx;
        r->used_wrap_counter = vq->used_wrap;
    }
    /* every id, len and later flag of the batch before the first flag */
    vu_smp_wmb();
    VU_WRITE_ONCE(d->flags, vq->pending_head_flags);
    vu_log_used(vq, 16 * (uint64_t)vq->pending_head, 16);
    if (r) {
        vu_smp_wmb();
        for (uint32_t i = 0; i < vq->batch_heads_num; i++)
            r->desc[vq->batch_heads[i]].inflight = 0;
        vq->batch_heads_num = 0;
        r->old_free_head = r->free_head;
        r->old_used_idx = r->used_idx;
        r->old_used_wrap_counter = r->used_wrap_counter;
    }
    vq->unnotified += vq->pending_used;
    vq->pending_used = 0;
}

bool vu_packed_need_notify(struct vu_vq *vq)
{
    vu_smp_mb();
    uint16_t old = vq->packed_signalled_used;
    uint16_t new_idx = vq->used_idx;
    bool valid = vq->signalled_used_valid;
    vq->packed_signalled_used = (uint16_t)(new_idx | (vq->used_wrap << 15));
    vq->signalled_used_valid = true;

    uint16_t flags = VU_READ_ONCE(vq->driver_event->flags);
    if (flags == VRING_PACKED_EVENT_FLAG_DISABLE)
        return false;
    if (flags != VRING_PACKED_EVENT_FLAG_DESC || !vq->event_idx || !valid)
        return true;
    vu_smp_rmb();
    uint16_t off_wrap = VU_READ_ONCE(vq->driver_event->off_wrap);
    uint16_t event = off_wrap & 0x7fff;
    bool event_wrap = off_wrap >> 15;
    uint16_t old_idx = old & 0x7fff;
    /* Put event, old and new on one linear scale: an event in the other
     * lap is a ring size away. */
    if (event_wrap != vq->used_wrap)
        event = (uint16_t)(event - vq->size);
    if ((old >> 15) != vq->used_wrap)
        old_idx = (uint16_t)(old_idx - vq->size);
    return vu_need_event(event, new_idx, old_idx);
}

bool vu_packed_set_notification(struct vu_vq *vq, bool enable)
{
    uint16_t flags = enable ? VRING_PACKED_EVENT_FLAG_ENABLE : VRING_PACKED_EVENT_FLAG_DISABLE;
    VU_WRITE_ONCE(vq->device_event->flags, flags);
    if (!enable)
        return false;
    vu_smp_mb();
    return vu_packed_has_avail(vq);
}
