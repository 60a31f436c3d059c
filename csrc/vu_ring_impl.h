/* Internal interface between vu_queue.c and the two ring layouts. */
#ifndef VU_RING_IMPL_H
#define VU_RING_IMPL_H

#include "vu_queue.h"

struct vu_elem *vu_elem_get(struct vu_vq *vq);
void vu_elem_put(struct vu_vq *vq, struct vu_elem *e);
int vu_elem_reserve(struct vu_elem *e, uint32_t need);
int vu_elem_add_buf(struct vu_vq *vq, struct vu_elem *e, uint64_t addr,
                    uint32_t len, bool writable);
void vu_log_elem_write(struct vu_vq *vq, struct vu_elem *elem, uint32_t len);
/* The indirect table of `len` bytes at guest address `gpa`, readable: our
 * mapping of it when it lies in one region, else a copy gathered into the
 * queue's scratch buffer (valid until the next call; queue lock held) - a
 * table may straddle two regions that are adjacent in guest memory but not
 * in ours. NULL when part of it is unmapped (or no memory for the copy). */
const void *vu_vq_indirect_table(struct vu_vq *vq, uint64_t gpa, uint32_t len);
void vu_log_used_write(struct vu_vq *vq, uint64_t offset, uint64_t len);
/* Dirty-logs bytes of the used ring; inline because it runs on every push
 * and is nearly always off (only during live migration). */
static inline void vu_log_used(struct vu_vq *vq, uint64_t offset, uint64_t len)
{
    if (VU_UNLIKELY(vq->log_used))
        vu_log_used_write(vq, offset, len);
}

/* The next head of the resubmit list that may go now (none of its orphans
 * still runs), moved to resubmit_pos; the caller advances resubmit_pos once
 * it popped it. False when every head left waits (or none is left). */
bool vu_resubmit_next(struct vu_vq *vq, uint16_t *head);

int vu_split_translate(struct vu_vq *vq);
void vu_split_sync(struct vu_vq *vq);
int vu_split_pop(struct vu_vq *vq, struct vu_elem **out);
/* Up to max (at most VU_SPLIT_BURST) chains: how many, 0 when none, or
 * -vu_err when the first failed. Not for resubmissions. */
#define VU_SPLIT_BURST 64
int vu_split_pop_burst(struct vu_vq *vq, struct vu_elem **out, int max);
void vu_split_push(struct vu_vq *vq, struct vu_elem *elem, uint32_t len);
void vu_split_flush(struct vu_vq *vq);
bool vu_split_need_notify(struct vu_vq *vq);
bool vu_split_set_notification(struct vu_vq *vq, bool enable);
bool vu_split_has_avail(struct vu_vq *vq);

int vu_packed_translate(struct vu_vq *vq);
void vu_packed_sync(struct vu_vq *vq);
int vu_packed_pop(struct vu_vq *vq, struct vu_elem **out);
void vu_packed_push(struct vu_vq *vq, struct vu_elem *elem, uint32_t len);
void vu_packed_flush(struct vu_vq *vq);
void vu_packed_inflight_unpop(struct vu_vq *vq, struct vu_elem *elem);
bool vu_packed_need_notify(struct vu_vq *vq);
bool vu_packed_set_notification(struct vu_vq *vq, bool enable);
bool vu_packed_has_avail(struct vu_vq *vq);

/* vring_need_event from the virtio spec: did new_idx pass event_idx since old? */
static inline bool vu_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old);
}

#endif
