/* Worker threads: each serves a group of queues, waiting on their kick
 * eventfds with epoll and running their handlers without the GIL. */
#ifndef VU_WORKER_H
#define VU_WORKER_H

#include "vu_queue.h"

#define VU_WORKER_MAX_QUEUES 64

struct vu_worker {
    /* Never reused while the process lives, unlike the address of a freed
     * worker: what remembers "this fd is in that worker's epoll" keeps it. */
    uint64_t id;
    pthread_t thread;
    bool running;
    int epfd;
    int wake_fd;                 /* eventfd: stop requests, in-band kicks */
    pthread_mutex_t lock;        /* guards queues[] */
    struct vu_vq *queues[VU_WORKER_MAX_QUEUES];
    uint32_t nqueues;
    uint32_t poll_us;            /* busy-poll this long before sleeping; 0: never */
    /* Adaptive polling (without poll_us): after serving work, look at the
     * rings for up to spin_us before sleeping. A catch keeps the window, a
     * miss halves it; a sleep shorter than 4 x spin_max_us (the driver is
     * busy) restores it. spin_max_us 0: sleep at once. */
    uint32_t spin_max_us;
    uint32_t spin_us;
    uint64_t spin_catches;       /* work found while spinning (a wake-up saved) */
    uint32_t event_fds;          /* handler-owned fds in epoll (io_uring, TAP, timers) */
    volatile bool stop;
    uint64_t wakeups;
    uint32_t gen;                /* bumped (under lock) when queues[] changes */
    /* The worker thread's copy of queues[], taken again when gen moved:
     * no lock per look at the rings while polling. */
    uint32_t snap_gen, snap_n;
    struct vu_vq *snap[VU_WORKER_MAX_QUEUES];
};

/* Like QEMU's iothread poll-max-ns default (32768 ns). */
#define VU_ADAPTIVE_POLL_US 32

struct vu_worker *vu_worker_new(uint32_t poll_us);
/* Adaptive polling window limit (0: off); before vu_worker_start. */
void vu_worker_set_adaptive_poll(struct vu_worker *w, uint32_t max_us);
int vu_worker_start(struct vu_worker *w);
/* Stops the thread (waits for the running batch) and frees w. */
void vu_worker_free(struct vu_worker *w);
int vu_worker_add_queue(struct vu_worker *w, struct vu_vq *vq,
                        vu_handler_fn handler, void *ctx);
void vu_worker_remove_queue(struct vu_worker *w, struct vu_vq *vq);
/* Call after vq->kick_fd changed (old fd still open): re-registers it. */
int vu_worker_set_kick(struct vu_worker *w, struct vu_vq *vq, int fd, bool polled);
/* Also wakes vq's handler when fd (an eventfd the handler drains itself,
 * e.g. io_uring completions) becomes readable, on a stopped ring too: the
 * handler must then drain it (or leave it to an `edge` fd) without popping.
 * `edge`: only when more arrives (EPOLLET), for an fd that may stay
 * readable while the handler can't take from it (a TAP whose receive ring
 * is stopped); such a handler drains it, or returns VU_HANDLED_MORE to
 * come back for the rest. */
int vu_worker_add_event_fd(struct vu_worker *w, struct vu_vq *vq, int fd, bool edge);
/* Makes the worker look at vq soon (in-band VRING_KICK, ring start). */
void vu_worker_kick(struct vu_worker *w, struct vu_vq *vq);

/* Generic batch loop for queues whose requests are handled in Python:
 * pops up to a batch, calls the Python callback once per batch. */
int vu_py_handler(void *ctx, struct vu_vq *vq);

#endif
