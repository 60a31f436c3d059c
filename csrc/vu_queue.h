/* Virtqueues (split and packed) from the device side. */
#ifndef VU_QUEUE_H
#define VU_QUEUE_H

#include "vu_common.h"
#include "vu_memory.h"
#include <linux/virtio_ring.h>
#include <pthread.h>

struct vu_dev;
struct vu_vq;

/* A descriptor chain, walked and translated. iov[0, out_num) are
 * device-readable, iov[out_num, out_num + in_num) device-writable. */
struct vu_elem {
    uint16_t id;         /* split: head index; packed: buffer id */
    uint16_t ndescs;     /* ring entries consumed (packed: used-index step) */
    uint32_t out_num, in_num;
    uint64_t out_len, in_len;
    struct iovec *iov;
    uint32_t iov_cap;
    uint32_t slot;       /* index in the queue's element pool */
    uint16_t inflight_head;  /* packed inflight tracking: its DescStatePacked entry */
    uint8_t in_flight;
    /* Completed while its ring was stopped (GET_VRING_BASE gave up waiting
     * for it): published when the ring starts again. */
    uint8_t held;
    /* In flight across a reset or the device's close: its answer has no
     * ring to go to, so completing it only releases it. */
    uint8_t orphan;
    uint8_t resubmitted; /* popped from the inflight resubmit list */
    /* An orphan whose request the ring resubmits: the new copy waits until
     * this one ends (vq->resubmit_blockers counts it). */
    uint8_t blocks_resubmit;
    uint32_t held_len;
    struct vu_mem *mem;  /* the table its buffers were translated with */
    struct vu_vq *vq;
    void *user;          /* the handler's per-request state (vu_vq_set_user) */
};

/* Device-side handler of a queue, run in the queue's worker thread with the
 * device lock held for reading. It may drop the lock around what can block
 * (a back-end's I/O), and then asks vu_vq_serving() again before it takes
 * more from the ring. Returns one of these. */
enum { VU_HANDLED_NONE = 0, VU_HANDLED_SOME = 1, VU_HANDLED_MORE = 2 };
typedef int (*vu_handler_fn)(void *ctx, struct vu_vq *vq);

struct vu_inflight_split_desc {   /* DescStateSplit in vhost-user.rst */
    uint8_t inflight;
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;
};

struct vu_inflight_split {        /* QueueRegionSplit */
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;
    struct vu_inflight_split_desc desc[];
};

struct vu_inflight_packed_desc {  /* DescStatePacked in vhost-user.rst */
    uint8_t inflight;
    uint8_t padding;
    uint16_t next;
    uint16_t last;
    uint16_t num;
    uint64_t counter;
    uint16_t id;
    uint16_t flags;
    uint32_t len;
    uint64_t addr;
};

struct vu_inflight_packed {       /* QueueRegionPacked */
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t free_head;
    uint16_t old_free_head;
    uint16_t used_idx;
    uint16_t old_used_idx;
    uint8_t used_wrap_counter;
    uint8_t old_used_wrap_counter;
    uint8_t padding[7];
    struct vu_inflight_packed_desc desc[];
};

struct vu_vq {
    struct vu_dev *dev;
    uint32_t index;
    pthread_mutex_t lock;    /* pop/push/pool: completions may come from other threads */

    /* configuration from the control plane */
    uint16_t size;
    bool packed, event_idx, indirect, log_used;
    uint64_t desc_addr, avail_addr, used_addr, log_addr;  /* as the front-end sent them */
    /* Where the ring was when it last stopped (GET_VRING_BASE): a restart
     * elsewhere is a new driver's ring (vu_vq_forget_if_restarted). */
    bool stop_known;
    uint32_t stop_base;
    uint64_t stop_desc, stop_avail, stop_used;
    int kick_fd, call_fd, err_fd;
    bool kick_polled;        /* SET_VRING_KICK with the no-fd bit: poll the ring */
    bool kick_eof;           /* the kick fd ended (worker): no kick comes through it */
    int kick_errno;          /* why: 0 end of file, else read's errno */
    bool started, enabled, broken;
    int error;               /* vu_err that broke the queue */
    uint64_t error_detail;   /* offending value (index, address, ...) */

    /* split ring */
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t last_avail_idx;
    uint16_t used_idx;          /* ours; published to used->idx on flush */
    uint16_t signalled_used;
    bool signalled_used_valid;
    uint16_t pending_used;      /* pushed since the last flush */
    uint16_t unnotified;        /* flushed since the last notify */

    /* packed ring */
    struct vring_packed_desc *pdesc;
    struct vring_packed_desc_event *driver_event;  /* written by the driver */
    struct vring_packed_desc_event *device_event;  /* written by us */
    bool avail_wrap, used_wrap;
    uint16_t packed_signalled_used;  /* used index (with wrap in bit 15) at last notify */
    uint16_t pending_head;           /* first descriptor pushed since the last flush */
    uint16_t pending_head_flags;     /* ... and the flags it gets at flush */
    bool ignore_write;          /* a queue the device only reads (net TX): the WRITE flag
                                 * is ignored, as DPDK's vhost does for its drivers */

    /* element pool: at most `size` chains are in flight. It outlives a
     * reset while orphans are still in it (their slots stay taken). */
    struct vu_elem *elems;
    uint32_t *free_slots;
    uint32_t nfree;
    /* The worker found every element taken (orphans of a session before
     * hold them) with requests on the ring: it sleeps, and the release that
     * frees an element kicks it, as no kick comes for requests the driver
     * made available before. Kept over a reset, as the pool is. */
    bool pool_waited;
    uint32_t pool_size;
    uint32_t inflight;          /* popped, not yet pushed */
    uint32_t nheld;             /* of those, completed but held (ring stopped) */
    uint32_t norphans;          /* of those, orphans (vu_vq_orphan) */
    /* Per-element state of the handler, allocated with the pool so that it
     * lives exactly as long as the element it belongs to. */
    uint32_t user_size;
    void (*user_fini)(void *user);
    uint8_t *user_area;

    /* inflight tracking (INFLIGHT_SHMFD): the area from SET_INFLIGHT_FD, read
     * as one of the two layouts once the ring starts and its layout is known */
    void *inflight_area;
    struct vu_inflight_split *inflight_region;
    struct vu_inflight_packed *inflight_packed;
    uint16_t *batch_heads;      /* packed: state entries pushed since the last flush */
    uint32_t batch_heads_num;
    uint64_t inflight_counter;
    uint16_t *resubmit;         /* heads to hand out again after reconnect */
    uint32_t resubmit_num, resubmit_pos;
    /* Per request (split: head, packed: state entry), the orphans still
     * running it: its resubmission waits for them, as two copies at once
     * could land in either order. Written under `lock`. */
    uint16_t *resubmit_blockers;
    uint16_t batch_num;

    /* serving */
    vu_handler_fn handler;
    void *handler_ctx;
    struct vu_worker *worker;   /* cleared under `lock` before the worker goes */
    volatile uint32_t kicked;   /* in-band kick or eventfd fired */
    /* The worker is polling this ring, so turning driver notifications on
     * would only make the driver kick for nothing (a syscall per burst on
     * its side): vu_vq_set_notification(true) only notes the wish, and the
     * worker grants it before it sleeps (vu_vq_stop_polling). Both under
     * `lock`. */
    bool polling;
    bool notify_deferred;

    /* an indirect table that straddles regions, gathered (vu_vq_indirect_table) */
    void *indirect_copy;
    uint32_t indirect_copy_cap;

    /* statistics */
    uint64_t stat_popped, stat_pushed, stat_notifies, stat_kicks;
};

/* A ring chains may be taken from and frames given to: started, enabled
 * and not broken. A caller that dropped the device lock asks again. */
static inline bool vu_vq_serving(const struct vu_vq *vq)
{
    return vq && vq->started && vq->enabled && !vq->broken;
}

struct vu_vq *vu_vq_new(struct vu_dev *dev, uint32_t index);
void vu_vq_free(struct vu_vq *vq);
/* Back to the freshly created state (rings unmapped, fds forgotten, not
 * broken). Chains still in flight become orphans (their completion only
 * releases them); held completions are dropped. Device locked for writing. */
void vu_vq_reset(struct vu_vq *vq);
/* Gives every element `size` bytes of handler state (elem->user), set up
 * and torn down with the pool; `fini` frees what the handler allocated in
 * it. Only while no pool exists (before the ring first starts). */
int vu_vq_set_user(struct vu_vq *vq, uint32_t size, void (*fini)(void *user));
/* -VU_ERR_INFLIGHT_BUSY for a new size while orphans still hold the pool. */
int vu_vq_set_num(struct vu_vq *vq, uint32_t num);
int vu_vq_set_addr(struct vu_vq *vq, uint32_t flags, uint64_t desc, uint64_t used,
                   uint64_t avail, uint64_t log);
int vu_vq_set_base(struct vu_vq *vq, uint32_t num);
uint32_t vu_vq_get_base(struct vu_vq *vq);
/* Translates the ring addresses and starts processing; completions held
 * while it was stopped are published. A ring that doesn't translate breaks
 * (error eventfd) and stays stopped: new addresses and a new start, or a
 * reset, bring it back. */
int vu_vq_start(struct vu_vq *vq);
/* Stops taking chains; completions of those in flight are held until the
 * ring starts again (those pushed already are published now). */
void vu_vq_stop(struct vu_vq *vq);
/* A stopped ring set up again at another base or other addresses than it
 * stopped at belongs to a new driver: the guest reset the device (QEMU
 * sends no RESET_DEVICE when a guest reboots, only new rings). What the
 * old driver is owed must reach neither: held answers are dropped, chains
 * still in flight become orphans. Returns how many orphans this made.
 * Before vu_vq_start, device locked for writing. */
uint32_t vu_vq_forget_if_restarted(struct vu_vq *vq);
/* Whether elem became an orphan (a reset or the device's close gave up
 * waiting for it): its guest memory may be detached by now. */
bool vu_vq_orphaned(const struct vu_elem *elem);
/* Re-translates the ring addresses of a running ring after a memory table
 * change; breaks the ring if they no longer translate. */
int vu_vq_remap(struct vu_vq *vq);

/* Pops the next available chain. 1: *out filled; 0: ring empty;
 * <0: -vu_err, and the queue is now broken. A request resubmitted from the
 * inflight region waits (is neither popped nor available) while an orphan
 * still runs it; the orphan's end kicks the worker. */
int vu_vq_pop(struct vu_vq *vq, struct vu_elem **out);
/* Up to max chains under one lock (a burst): how many (>0), 0 when the
 * ring is empty, or -vu_err as vu_vq_pop when it failed before the first
 * (after one, the error comes on the next call). */
int vu_vq_pop_burst(struct vu_vq *vq, struct vu_elem **out, int max);
/* Forgets a popped element without publishing it (a broken queue has no
 * valid answer to give; a request dropped at disconnect is resubmitted by
 * the front-end), so nothing waits for it to complete. */
int vu_vq_discard(struct vu_vq *vq, struct vu_elem *elem);
/* Puts back the most recently popped elements, newest first (a receive
 * path that popped buffers for a frame that then did not fit). */
int vu_vq_unpop(struct vu_vq *vq, struct vu_elem *elem);
/* Returns elem to the driver with `len` bytes written. Not visible to the
 * driver until vu_vq_flush. */
int vu_vq_push(struct vu_vq *vq, struct vu_elem *elem, uint32_t len);
/* vu_vq_push for n elements under one lock (lens NULL: all 0). Returns 0 or
 * the first error (the others are still pushed). */
int vu_vq_push_burst(struct vu_vq *vq, struct vu_elem *const *elems, const uint32_t *lens, int n);
void vu_vq_flush(struct vu_vq *vq);
/* Signals the call eventfd if the driver wants it (event suppression). */
void vu_vq_notify(struct vu_vq *vq);
/* Signals the call eventfd whatever the driver asked: after a new call fd
 * or a restart, a completion published by a back-end that died before
 * signalling it would otherwise never be seen (a spurious interrupt is
 * harmless to every driver). */
void vu_vq_signal(struct vu_vq *vq);
/* push + flush + notify, for completions outside the worker's batch. */
int vu_vq_complete(struct vu_vq *vq, struct vu_elem *elem, uint32_t len);
/* push + flush (+ notify) from a thread that does not hold the device lock
 * (a Python batch, which runs without it, or any other thread): takes the
 * read lock, so the ring is not remapped, stopped or its dirty log swapped
 * meanwhile, and publishes at once, so a stop that follows counts only
 * completions the driver can see. */
int vu_vq_complete_unlocked(struct vu_vq *vq, struct vu_elem *elem, uint32_t len, bool notify);
/* Driver notifications on (after a batch) or off (while draining). Enabling
 * returns true when more buffers arrived meanwhile. */
bool vu_vq_set_notification(struct vu_vq *vq, bool enable);
/* The worker starts polling the ring: enabling notifications is deferred. */
void vu_vq_start_polling(struct vu_vq *vq);
/* The worker stops polling (about to sleep): a deferred enable is done now.
 * Returns true when the ring has buffers the sleep would miss. */
bool vu_vq_stop_polling(struct vu_vq *vq);
/* Whether the ring has a request that can be popped now: not while every
 * element of the pool is taken by orphans (the one released first kicks
 * the worker then), nor for a resubmission waiting for its orphan. */
bool vu_vq_has_avail(struct vu_vq *vq);
/* Marks the queue broken with err and fires the error eventfd. */
void vu_vq_break(struct vu_vq *vq, int err, uint64_t detail);

/* Inflight region. QEMU sends it before the features, so the split or packed
 * layout is chosen when the ring starts; requests to resubmit are found then. */
int vu_vq_set_inflight(struct vu_vq *vq, void *region);

/* Chains popped and not yet completed that the ring still waits for (held
 * completions are done; orphans belong to no ring). */
uint32_t vu_vq_inflight(struct vu_vq *vq);
/* Makes an in-flight element an orphan (queue lock held). */
void vu_vq_orphan(struct vu_vq *vq, struct vu_elem *e);

#endif
