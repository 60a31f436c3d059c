/* Inside the virtio-blk device: the engines that do a request's I/O, and
 * what they share with the queue handler (vu_blk.c). Not part of the cffi
 * API.
 *
 * The handler pops and parses requests; an engine does their I/O:
 *   RAM      vu_blk_ram.c     memcpy to and from an anonymous mapping
 *   file     vu_blk_file.c    preadv/pwritev (or the page cache's mapping)
 *                             in the queue's worker, what may block without
 *                             the device lock
 *   io_uring vu_blk_uring.c   the file through io_uring, trying page-cache
 *                             hits in the worker first
 *   Python   vu_blk_python.c  batches handed to the Python back-end
 * Write-through writes of the file engines wait for one shared sync
 * (vu_blk_stable.c); QoS puts a queue to sleep (vu_blk_qos.c). */
#ifndef VU_BLK_ENGINE_H
#define VU_BLK_ENGINE_H

#include "vu_blk.h"

/* What start() did with a request. */
enum vu_blk_start {
    VU_BLK_DONE = 0,   /* its I/O is done and r->result set (data not yet stable) */
    VU_BLK_TAKEN = 1,  /* the engine holds it and completes it itself later */
};

/* Small: the driver sees completions while the rest of its batch runs. */
#define VU_BLK_ROUND 4

struct vu_blk_engine {
    /* Requests per round of the handler. NULL: VU_BLK_ROUND. */
    int (*round_size)(const struct vu_blk_dev *b);
    /* At the start of the handler: completes what finished since; returns
     * how many requests. May drop the device lock, as end_round. NULL:
     * nothing ever finishes late. */
    int (*reap)(struct vu_blk_dev *b, struct vu_vq *vq);
    /* A parsed request whose result is PENDING (GET_ID excepted: the device
     * answers it from its configuration, except with a Python back-end). */
    enum vu_blk_start (*start)(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *r);
    /* A parsed PENDING request that start() gets next in this round: may
     * bring its data toward the cache meanwhile (a hint: nothing may fault
     * or block). NULL: nothing to prefetch. */
    void (*prefetch)(const struct vu_blk_dev *b, const struct vu_blk_req *r);
    /* After a round's requests started: sends what start() holds; returns
     * how many requests it completed. May drop the device lock meanwhile
     * (what may block runs without it); the handler then looks at the
     * ring's state again. NULL: nothing to do. */
    int (*end_round)(struct vu_blk_dev *b, struct vu_vq *vq);
};

extern const struct vu_blk_engine vu_blk_ram_engine;
extern const struct vu_blk_engine vu_blk_file_engine;
extern const struct vu_blk_engine vu_blk_uring_engine;
extern const struct vu_blk_engine vu_blk_python_engine;

/* Completion (vu_blk.c) ----------------------------------------------------- */

/* At disconnect, with the workers stopped: r is released unanswered (never
 * stable, so never acknowledged) and no longer counted in flight. */
void vu_blk_drop(struct vu_blk_dev *b, struct vu_blk_req *r);

/* Writes status, counts the request and returns its chain. notify: from
 * outside q's worker (other statistics, flush and signal at once). now 0:
 * the caller records the latency. */
int vu_blk_complete(struct vu_vq *vq, struct vu_blk_req *r, uint8_t status, bool notify,
                    uint64_t now);

/* The I/O of one request, done in the calling thread ------------------------ */

void vu_blk_ram_io(struct vu_blk_dev *b, struct vu_blk_req *r);
void vu_blk_ram_close(struct vu_blk_dev *b);
/* Through the mapping first when via_map (false: the caller just tried, and
 * a second try could only fault again). May wait for the storage. */
void vu_blk_file_io(struct vu_blk_dev *b, struct vu_blk_req *r, bool via_map);

/* The file engines' I/O that may wait for the storage (vu_blk_file.c,
 * "Storage that stops answering") ---------------------------------------------- */

/* A copy through the mapping that can't wait for the storage: a read of
 * resident pages, a write into an image in memory. True with r->result set. */
bool vu_blk_file_copy(struct vu_blk_dev *b, struct vu_blk_req *r);
/* Holds r until the round's end, where vu_blk_file_run_held does its I/O. */
void vu_blk_file_hold(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *r);
/* A held request's I/O, run without the device lock. It sets r->result, or
 * leaves it PENDING when it handed r to the queue's io_uring (owned by the
 * queue's worker, so usable without the lock). */
typedef void (*vu_blk_held_io_fn)(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *r);
/* Drops the device lock (the worker's, held while its handler runs), sends
 * what u (the queue's io_uring, or NULL) has queued, runs io on each held
 * request and sends what that queued, takes the lock again and completes
 * them (or puts write-through writes in their group). Returns how many
 * completed; *sent (if not NULL): whether anything went to u. */
int vu_blk_file_run_held(struct vu_blk_dev *b, struct vu_vq *vq, vu_blk_held_io_fn io,
                         struct vu_uring *u, bool *sent);
/* The file engines' prefetch: a read's source in the page cache's mapping. */
void vu_blk_file_prefetch(const struct vu_blk_dev *b, const struct vu_blk_req *r);
/* Full preadv/pwritev at off: retries short transfers and EINTR; 0 or -errno.
 * Consumes iov. */
int vu_blk_file_rw(int fd, struct iovec *iov, uint32_t niov, uint64_t off, bool write_op);
/* O_DIRECT takes only buffers aligned to the storage's logical block. */
bool vu_blk_iov_aligned(const struct vu_blk_req *r);

/* io_uring (vu_blk_uring.c) --------------------------------------------------- */

/* Waits for what io_uring has in flight; answers none of it. */
void vu_blk_uring_quiesce(struct vu_blk_dev *b);
void vu_blk_uring_close(struct vu_blk_dev *b);

/* Write-through group commit (vu_blk_stable.c) ---------------------------------- */

/* The open file queue (or control slot) `slot` syncs through. */
int vu_blk_sync_fd(const struct vu_blk_dev *b, uint32_t slot);
/* The outcome of a sync that returned res (0 or -errno) as the guest must
 * see it: a failure is kept, and fails every later sync of the device. */
int vu_blk_sync_outcome(struct vu_blk_dev *b, int res);

/* Whether r, its I/O done, must wait for a sync before it completes; if so
 * it joins queue q's group and true is returned. */
bool vu_blk_stable_hold(struct vu_blk_dev *b, uint32_t q, struct vu_blk_req *r);
/* A FLUSH (io_uring engine): completes after the next sync of queue q's
 * group, with its outcome. */
void vu_blk_stable_join_flush(struct vu_blk_dev *b, uint32_t q, struct vu_blk_req *r);
/* A write-through request of the synchronous path: stable now. */
bool vu_blk_needs_stable(const struct vu_blk_dev *b, const struct vu_blk_req *r);
/* Starts the sync that covers what waits on vq's group: through u, or done
 * here when u is NULL. Returns how many requests completed. */
int vu_blk_stable_commit(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_uring *u);
/* The sync tagged `group` finished with res (io_uring); returns how many
 * requests completed. */
int vu_blk_stable_synced(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_group *group,
                         int res, uint64_t now);
/* user_data of a group's sync: the group's address with this bit set
 * (requests and groups are at least 8-byte aligned). */
#define VU_BLK_TAG_GROUP 1u
/* At disconnect: a group's requests in flight or waiting are dropped, not
 * answered (never stable, so never acknowledged). */
void vu_blk_stable_drop(struct vu_blk_dev *b, struct vu_blk_group *group, bool syncing);

/* QoS (vu_blk_qos.c) ------------------------------------------------------------- */

/* Puts the queue to sleep for wait_ns (its timerfd wakes the handler); false
 * when no timer can be had (the caller then serves on). */
bool vu_blk_qos_sleep(struct vu_blk_dev *b, struct vu_vq *vq, uint64_t wait_ns);
/* The handler runs: consume the queue's timer expirations. */
void vu_blk_qos_woken(struct vu_blk_dev *b, uint32_t q);
void vu_blk_qos_close(struct vu_blk_dev *b);

#endif
