/* Worker threads: each serves a group of queues, waiting on their kick
 * eventfds with epoll and running their handlers without the GIL. */
#ifndef VU_WORKER_H
#define VU_WORKER_H

#include "vu_queue.h"

#define VU_WORKER_MAX_QUEUES 64

struct vu_worker {
    pthread_t thread;
    bool running;
    int epfd;
    int wake_fd;                 /* eventfd: stop requests, in-band kicks */
    pthread_mutex_t lock;        /* guards queues[] */
    struct vu_vq *queues[VU_WORKER_MAX_QUEUES];
    uint32_t nqueues;
    uint32_t poll_us;            /* busy-poll this long before sleeping; 0: never */
    volatile bool stop;
    uint64_t wakeups;
};

struct vu_worker *vu_worker_new(uint32_t poll_us);
int vu_worker_start(struct vu_worker *w);
/* Stops the thread (waits for the running batch) and frees w. */
void vu_worker_free(struct vu_worker *w);
int vu_worker_add_queue(struct vu_worker *w, struct vu_vq *vq,
                        vu_handler_fn handler, void *ctx);
void vu_worker_remove_queue(struct vu_worker *w, struct vu_vq *vq);
/* Call after vq->kick_fd changed (old fd still open): re-registers it. */
int vu_worker_set_kick(struct vu_worker *w, struct vu_vq *vq, int fd, bool polled);
/* Also wakes vq's handler when fd (an eventfd the handler drains itself,
 * e.g. io_uring completions) becomes readable. */
int vu_worker_add_event_fd(struct vu_worker *w, struct vu_vq *vq, int fd);
/* Makes the worker look at vq soon (in-band VRING_KICK, ring start). */
void vu_worker_kick(struct vu_worker *w, struct vu_vq *vq);

/* Generic batch loop for queues whose requests are handled in Python:
 * pops up to a batch, calls the Python callback once per batch. */
int vu_py_handler(void *ctx, struct vu_vq *vq);

#endif
