/* virtio-blk device: its state, the control plane's calls and the queue
 * handler. Requests: vu_blk_request.h; metrics: vu_blk_stats.h; the I/O
 * engines behind the handler: vu_blk_engine.h. */
#ifndef VU_BLK_H
#define VU_BLK_H

#include "vu_blk_request.h"
#include "vu_blk_stats.h"
#include "vu_filemap.h"
#include "vu_qos.h"
#include "vu_queue.h"
#include "vu_uring.h"

struct vu_worker;

#define VU_BLK_MAX_QUEUES 64
/* Most requests per call into a Python back-end. */
#define VU_BLK_PY_BATCH_MAX 32

enum { VU_BLK_BACKEND_RAM = 0, VU_BLK_BACKEND_FILE = 1, VU_BLK_BACKEND_PYTHON = 2 };
/* How the FILE back-end does reads or writes (vu_blk_set_io_path):
 *  INLINE: preadv/pwritev in the queue worker (or memcpy from the mapping of
 *          an image in memory);
 *  NOWAIT: preadv2/pwritev2(RWF_NOWAIT) in the worker, and what can't be done
 *          without blocking (not in the page cache, locks) through io_uring;
 *          where the file system can't try (EOPNOTSUPP) it falls back to
 *          nowait_fallback;
 *  URING:  every request through io_uring. */
enum { VU_BLK_IO_INLINE = 0, VU_BLK_IO_NOWAIT = 1, VU_BLK_IO_URING = 2 };

/* Group commit: write-through writes whose data is written wait here for
 * one fdatasync that covers them all, and complete only after it (virtio
 * 1.4 5.2.6.5: stable on completion). Per queue, owned by its worker. */
struct vu_blk_group {
    struct vu_blk_req *waiting;   /* written, no sync started since */
    struct vu_blk_req *syncing;   /* covered by the sync in flight (io_uring) */
    bool sync_inflight;
};

struct vu_blk_dev {
    struct vu_blk_limits lim;
    /* Read by every queue's worker at each parse, changed only under the
     * device lock held for writing (workers parse under it for reading):
     * kept with the limits, away from the counts that change per request. */
    uint64_t barrier_epoch;
    int backend;
    int fd;                 /* FILE */
    bool direct;            /* FILE opened O_DIRECT: bounce unaligned buffers */
    /* FILE: the open file of the image each queue syncs through (-1: fd);
     * [VU_BLK_MAX_QUEUES] is the control plane's. The kernel reports a
     * failed writeback once per open file, then calls the pages clean: two
     * queues syncing one open file would see it once between them, and the
     * other would call the lost data stable. Borrowed, like fd. */
    int sync_fd[VU_BLK_MAX_QUEUES + 1];
    int sync_error;         /* FILE: errno of the first failed sync, 0: none (atomic) */
    bool punch_hole;        /* FILE: fallocate punch-hole works here */
    bool secure_erase;      /* FILE on a block device that does BLKSECDISCARD */
    struct vu_filemap map;  /* FILE (not O_DIRECT): reads copy from the page cache */
    uint8_t *ram;           /* RAM */
    uint64_t ram_size;
    void *py_ctx;           /* PYTHON: cffi handle */
    uint32_t py_batch;      /* PYTHON: requests per call into Python (0: the default) */
    bool use_uring;         /* FILE: a ring per queue for what read_io/write_io send
                             * there, flushes and write-through group syncs */
    uint8_t read_io, write_io;   /* VU_BLK_IO_* */
    uint8_t nowait_fallback[2];  /* [0] reads, [1] writes: NOWAIT unsupported -> this */
    struct vu_uring *rings[VU_BLK_MAX_QUEUES];
    uint64_t ring_worker[VU_BLK_MAX_QUEUES];  /* id of the worker whose epoll has its eventfd */
    bool ring_failure_logged[VU_BLK_MAX_QUEUES];  /* its io_uring_enter failed for good */
    struct vu_blk_group group[VU_BLK_MAX_QUEUES];
    /* Statistics: stats[q] is written only by q's worker; completions from
     * other threads (Python back-ends' coroutines) go to async_stats under
     * async_lock, so no counter has two writers. */
    struct vu_blk_stats stats[VU_BLK_MAX_QUEUES];
    struct vu_blk_stats async_stats[VU_BLK_MAX_QUEUES];
    pthread_mutex_t async_lock;
    uint64_t started[VU_BLK_MAX_QUEUES];     /* popped; minus completed = in flight */
    uint64_t throttled[VU_BLK_MAX_QUEUES];   /* times the queue waited for QoS tokens */
    /* Barriers (vu_blk_barrier_begin): each request, from its parse to its
     * completion (or drop), counts in barrier_inflight[its queue][the parity
     * of barrier_epoch when it was parsed]. The counts are atomic, as
     * completions come from other threads (a Python back-end's
     * coroutines); a cache line a queue (vu_blk_new aligns the device), so
     * queues' workers don't take lines from each other. */
    uint64_t barrier_inflight[VU_BLK_MAX_QUEUES][8] __attribute__((aligned(64)));  /* [q][0..1] */
    struct vu_qos qos;
    int qos_timer[VU_BLK_MAX_QUEUES];        /* timerfd that wakes a throttled queue */
    uint64_t timer_worker[VU_BLK_MAX_QUEUES];  /* the same for qos_timer */
    /* The requests of the queue's current round that its engine runs at the
     * round's end, without the device lock: the Python batch, or the file
     * engines' I/O that may wait for the storage. */
    struct vu_blk_req *round[VU_BLK_MAX_QUEUES][VU_BLK_PY_BATCH_MAX];
    uint8_t round_len[VU_BLK_MAX_QUEUES];
};

struct vu_blk_dev *vu_blk_new(int backend);
void vu_blk_free(struct vu_blk_dev *b);
/* FILE back-end: fd is borrowed (the caller keeps it open). Returns 1 when
 * reads of pages in the page cache go through a mapping of the file (tmpfs,
 * ramfs, ext4, XFS, btrfs; not O_DIRECT), 0 when not, -errno when mapping
 * it failed (reads then use preadv). */
int vu_blk_set_file(struct vu_blk_dev *b, int fd, bool direct);
/* Whether SECURE_ERASE can be offered: RAM (the bytes are overwritten in
 * our own memory), or a block device that takes BLKSECDISCARD. Never a
 * regular file: overwriting it erases nothing on an SSD or a copy-on-write
 * file system. */
bool vu_blk_can_secure_erase(struct vu_blk_dev *b);
/* FILE back-end: the open file of the image (borrowed) that the syncs of
 * queue `slot` go through; slot VU_BLK_MAX_QUEUES is the control plane's. */
void vu_blk_set_sync_fd(struct vu_blk_dev *b, uint32_t slot, int fd);
/* FILE back-end: one fdatasync of the image through slot's open file.
 * Returns 0, or -errno: of this sync, or of the device's first failed sync
 * (after which none succeeds: see vu_blk_stable.c). */
int vu_blk_sync(struct vu_blk_dev *b, uint32_t slot);
/* errno of the device's first failed sync; 0 if none failed. */
int vu_blk_sync_error(struct vu_blk_dev *b);
/* FILE back-end: asynchronous I/O through io_uring (false: in the worker),
 * with the default I/O path for where the file lives (see vu_blk_uring.c,
 * "Choosing the I/O path"). Returns 0; 1 when the file is in memory (tmpfs,
 * ramfs), where the worker does the I/O itself anyway; or -errno when
 * io_uring is not available. */
int vu_blk_set_uring(struct vu_blk_dev *b, bool on);
/* FILE back-end with io_uring on: how reads and writes are done, VU_BLK_IO_*
 * each (for measurements and tests; vu_blk_set_uring picks the default).
 * -EINVAL without io_uring (only INLINE then) or for an unknown mode. */
int vu_blk_set_io_path(struct vu_blk_dev *b, int read_io, int write_io);
/* Waits for every request in flight in io_uring (at disconnect, before guest
 * memory goes away). They are not completed to the driver (with inflight
 * tracking the front-end resubmits them), only released. */
void vu_blk_quiesce(struct vu_blk_dev *b);
/* Barriers: waiting until every request taken off a ring before a change
 * (read-only, a smaller capacity) has ended, its I/O done; those taken
 * after it, which the change already applies to, are not waited for.
 * begin: with the device lock held for writing (or no worker running),
 * after the change; counts the requests parsed from now on apart, and
 * returns the barrier's number, or 0 while the requests of the barrier
 * before are still in flight (then wait until vu_blk_barrier_pending(b,
 * b->barrier_epoch) is 0 and begin again). */
uint64_t vu_blk_barrier_begin(struct vu_blk_dev *b);
/* How many requests parsed before barrier `epoch` began are still in
 * flight (completed nor dropped); 0 once there are none. */
uint64_t vu_blk_barrier_pending(struct vu_blk_dev *b, uint64_t epoch);
/* QoS limits for the whole device (0 = unlimited), in force at once. */
void vu_blk_set_qos(struct vu_blk_dev *b, uint64_t iops, uint64_t bps, uint64_t iops_burst,
                    uint64_t bps_burst);
/* RAM back-end: anonymous mapping of size bytes (resizes keep the data). */
int vu_blk_set_ram(struct vu_blk_dev *b, uint64_t size);

/* Parses e into r (no I/O). Returns 0 with r->result PENDING (ready to
 * execute) or final (IOERR/UNSUPP/OK already decided), or -VU_ERR_* when the
 * chain has no status byte: the queue must break. Set r->queue first: from
 * a 0 return, r counts in flight for barriers until vu_blk_finish (or a
 * drop at disconnect). */
int vu_blk_parse(struct vu_blk_dev *b, struct vu_elem *e, struct vu_blk_req *r);
/* Executes a parsed request with the C back-end; sets r->result. A write
 * in write-through mode is stable when this returns. */
void vu_blk_execute(struct vu_blk_dev *b, struct vu_blk_req *r);
/* Writes status and returns the chain to the driver. With notify, also
 * flushes and signals (a completion outside the worker's batch). */
int vu_blk_finish(struct vu_vq *vq, struct vu_blk_req *r, uint8_t status, bool notify);

/* A Python back-end's batch, described in one call rather than field by
 * field through cffi: type, iovec count, byte offset, and where iov[0]
 * lies (map id 0: not described, the caller looks it up itself). */
struct vu_blk_pydesc {
    uint32_t type;
    uint32_t niov;
    uint64_t offset;
    uint64_t map_id;
    uint64_t map_off;
    uint64_t len;
};
void vu_blk_py_describe(struct vu_blk_req *const *reqs, int n, struct vu_blk_pydesc *out);
/* Sets each request's result from status[] (PENDING: left as it is). */
void vu_blk_py_set_results(struct vu_blk_req *const *reqs, int n, const uint8_t *status);

/* Gives vq's elements their request state (elem->user): before the ring
 * first starts. A request then lives exactly as long as its element, even
 * past a disconnect, so a late completion never finds it reused. */
int vu_blk_prepare_queue(struct vu_vq *vq);
/* The queue handler for the worker (ctx = struct vu_blk_dev *). */
int vu_blk_handler(void *ctx, struct vu_vq *vq);

#endif
