/* A minimal io_uring (raw system calls, no liburing): enough for the block
 * back-end to keep many reads and writes in flight from one worker. */
#ifndef VU_URING_H
#define VU_URING_H

#include "vu_common.h"
#include <linux/io_uring.h>

struct vu_uring {
    int fd;
    int efd;                 /* completions are signalled here (EFD_NONBLOCK) */
    unsigned entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ptr, *cq_ptr;
    size_t sq_len, cq_len, sqes_len;
    unsigned queued;         /* prepared, not yet submitted */
    unsigned pending;        /* submitted, completion not reaped */
    bool restricted;         /* only the block back-end's operations (5.10+) */
    int failed;              /* errno io_uring_enter failed with for good, or 0 */
    /* Entries the kernel never took (a failed ring): their completions,
     * res -ECANCELED, handed out by vu_uring_peek after the kernel's. */
    struct io_uring_cqe *refused;
    unsigned nrefused;
    bool refused_peeked;     /* vu_uring_seen consumes one of them */
};

/* 0, or -errno (io_uring not available: the caller falls back to sync I/O). */
int vu_uring_init(struct vu_uring *u, unsigned entries);
void vu_uring_exit(struct vu_uring *u);
/* Next free submission entry, zeroed; NULL when the ring is full. */
struct io_uring_sqe *vu_uring_sqe(struct vu_uring *u);
/* Turns each prepared entry whose user_data `keep` refuses into a no-op,
 * before it is submitted: its completion still comes, with res 0. */
void vu_uring_void_queued(struct vu_uring *u, bool (*keep)(uint64_t user_data));
/* Submits everything prepared: 0, or -errno when io_uring_enter failed
 * other than EINTR, EAGAIN or EBUSY. The ring is failed from then on
 * (u->failed): what the kernel did not take, then and later, completes
 * with res -ECANCELED, signalled on efd, for the caller to do otherwise.
 * What it still did not take after a few tries with EINTR, EAGAIN or
 * EBUSY completes so too, the ring kept (0). */
int vu_uring_submit(struct vu_uring *u);
/* Next completion or NULL; call vu_uring_seen after using it. */
struct io_uring_cqe *vu_uring_peek(struct vu_uring *u);
void vu_uring_seen(struct vu_uring *u);
/* Blocks until every submitted request completed, handing each to fn. */
void vu_uring_drain(struct vu_uring *u, void (*fn)(void *arg, struct io_uring_cqe *), void *arg);

/* Rings made ahead, for a process that can't make them later (the
 * sandbox's filter refuses io_uring_setup, since io_uring operations would
 * bypass it). Until vu_uring_pool_seal, vu_uring_get makes a new ring;
 * after, it takes one from the pool (NULL when none is left: the queue
 * does synchronous I/O) and vu_uring_put gives it back. */
int vu_uring_pool_fill(unsigned n, unsigned entries);   /* rings made, or -errno */
void vu_uring_pool_seal(void);
bool vu_uring_sealed(void);
unsigned vu_uring_pool_size(void);
struct vu_uring *vu_uring_get(unsigned entries);
void vu_uring_put(struct vu_uring *u);

#endif
