/* Packed virtqueue, device side (virtio 1.x section 2.8).
 *
 * Descriptors are available when their AVAIL bit equals our avail wrap
 * counter and differs from their USED bit. As with the split ring, each
 * descriptor is snapshotted once and every walk is bounded by the ring size. */
#include "vu_ring_impl.h"
#include "vu_dev.h"

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

void vu_packed_sync(struct vu_vq *vq)
{
    vq->packed_signalled_used = (uint16_t)(vq->used_idx | (vq->used_wrap << 15));
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
    struct vring_packed_desc *table = vu_gpa_to_hva(vq->dev->mem, d->addr, d->len);
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

int vu_packed_pop(struct vu_vq *vq, struct vu_elem **out)
{
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
        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (count > 1 || (d.flags & VRING_DESC_F_NEXT)) {
                /* an indirect descriptor must stand alone */
                rc = -VU_ERR_INDIRECT_NEXT;
                detail = d.addr;
                break;
            }
            rc = walk_indirect(vq, e, &d, &detail);
            break;
        }
        rc = vu_elem_add_buf(vq, e, d.addr, d.len, d.flags & VRING_DESC_F_WRITE);
        if (rc) {
            detail = d.addr;
            break;
        }
        if (!(d.flags & VRING_DESC_F_NEXT))
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
    /* every id, len and later flag of the batch before the first flag */
    vu_smp_wmb();
    VU_WRITE_ONCE(d->flags, vq->pending_head_flags);
    vu_log_used(vq, 16 * (uint64_t)vq->pending_head, 16);
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
