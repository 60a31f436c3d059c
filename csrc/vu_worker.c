/* Queue worker threads. */
#include "vu_worker.h"
#include "vu_dev.h"
#include "vu_fault.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* How many rounds a handler may run before other queues get a turn. */
#define VU_HANDLER_ROUNDS 16
#define VU_PY_BATCH 64

struct vu_worker *vu_worker_new(uint32_t poll_us)
{
    struct vu_worker *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    w->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (w->epfd < 0 || w->wake_fd < 0)
        goto fail;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->wake_fd, &ev) < 0)
        goto fail;
    pthread_mutex_init(&w->lock, NULL);
    static uint64_t last_id;
    w->id = __atomic_add_fetch(&last_id, 1, __ATOMIC_RELAXED);
    w->poll_us = poll_us;
    vu_worker_set_adaptive_poll(w, VU_ADAPTIVE_POLL_US);
    return w;
fail:
    if (w->epfd >= 0)
        close(w->epfd);
    if (w->wake_fd >= 0)
        close(w->wake_fd);
    free(w);
    return NULL;
}

void vu_worker_set_adaptive_poll(struct vu_worker *w, uint32_t max_us)
{
    /* Set before the thread starts; the window itself is the thread's. */
    w->spin_max_us = max_us;
    w->spin_us = max_us;
}

static void wake(struct vu_worker *w)
{
    uint64_t one = 1;
    ssize_t r = write(w->wake_fd, &one, sizeof(one));
    (void)r;
}

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Runs vq's handler if it may run. Returns true when it did work or wants
 * another turn. */
/* vq->kicked bits: the kick eventfd is readable / someone asked for a look. */
#define KICK_FD 1u
/* epoll data for handler-owned fds: the vq pointer with its low bit set
 * (vq is at least 8-byte aligned), so the worker does not read the fd. */
#define EVENT_FD_TAG 1u
#define KICK_SOFT 2u
/* A handler-owned fd fired: its handler runs even on a stopped ring, since
 * only the handler can drain the fd (io_uring completions that arrive after
 * the ring stopped would otherwise keep a level-triggered fd readable and
 * the worker awake without end). */
#define KICK_EVENT 4u

/* Runs vq's handler if it may run. Returns the handler's VU_HANDLED_*
 * (VU_HANDLED_NONE when it did not run). */
static int serve_queue(struct vu_worker *w, struct vu_vq *vq, bool polling)
{
    uint32_t kicked = __atomic_exchange_n(&vq->kicked, 0, __ATOMIC_ACQ_REL);
    if (!kicked && !polling && !vq->kick_polled)
        return VU_HANDLED_NONE;
    struct vu_dev *dev = vq->dev;
    vu_dev_rdlock(dev);
    int result = VU_HANDLED_NONE;
    /* Disabled or broken rings still get their handler when kicked: it may
     * have requests in flight to finish (the handler decides what it may do). */
    bool may_pop = vq->enabled && !vq->broken;
    if (!vq->started && vq->handler && (kicked & KICK_EVENT)) {
        result = vq->handler(vq->handler_ctx, vq);
    } else if (vq->started && vq->handler && (may_pop || kicked)) {
        if (kicked || vu_vq_has_avail(vq)) {
            if (polling && !vq->polling)
                vu_vq_start_polling(vq);
            result = vq->handler(vq->handler_ctx, vq);
        }
    }
    if ((kicked & KICK_FD) && vq->kick_fd >= 0) {
        /* Read the kick only now: the driver is waiting for the answer, not
         * for this syscall. epoll said readable and only we read it, so it
         * does not block (a replaced fd: a kick for the same ring anyway).
         * A kick sent meanwhile is consumed too, so look at the ring once
         * more: its request was published before it was sent. */
        uint64_t v;
        ssize_t r = read(vq->kick_fd, &v, sizeof(v));
        int err = r < 0 ? errno : 0;
        if (r == 0 || (r < 0 && err != EAGAIN && err != EWOULDBLOCK && err != EINTR)) {
            /* Readable with no kick to read: a pipe or socket whose writer
             * is gone (end of file), or an fd no kick can come from.
             * Watched level-triggered, it would wake us without end: it is
             * watched no more, and the ring breaks (reported on its error
             * eventfd and in the log), or, not started yet, fails to start
             * (vu_vq_start), until a new kick fd comes. */
            epoll_ctl(w->epfd, EPOLL_CTL_DEL, vq->kick_fd, NULL);
            vq->kick_eof = true;
            vq->kick_errno = err;
            if (vq->started)
                vu_vq_break(vq, VU_ERR_KICK_FD, (uint64_t)err);
        }
        vq->stat_kicks++;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (result != VU_HANDLED_MORE && vq->handler && vu_vq_serving(vq) &&
            vu_vq_has_avail(vq))
            result = VU_HANDLED_MORE;
    }
    if (result == VU_HANDLED_MORE)
        __atomic_or_fetch(&vq->kicked, KICK_SOFT, __ATOMIC_RELEASE);
    vu_dev_unlock(dev);
    return result < 0 ? VU_HANDLED_NONE : result;
}

/* The worker's queues as they are now (others add and remove them). */
static uint32_t queues_snapshot(struct vu_worker *w, struct vu_vq **qs)
{
    pthread_mutex_lock(&w->lock);
    uint32_t n = w->nqueues;
    memcpy(qs, w->queues, n * sizeof(qs[0]));
    pthread_mutex_unlock(&w->lock);
    return n;
}

static int serve_all(struct vu_worker *w, bool polling)
{
    /* As good as a snapshot under the lock each time: one taken before a
     * queue is removed may name it either way. */
    uint32_t gen = __atomic_load_n(&w->gen, __ATOMIC_ACQUIRE);
    if (gen != w->snap_gen || !w->snap_n) {
        w->snap_n = queues_snapshot(w, w->snap);
        w->snap_gen = gen;
    }
    uint32_t n = w->snap_n;
    int best = VU_HANDLED_NONE;
    for (uint32_t i = 0; i < n; i++) {
        int r = serve_queue(w, w->snap[i], polling);
        if (r > best)
            best = r;
    }
    return best;
}

/* Before a sleep: rings polled so far get the driver notifications their
 * handlers asked for meanwhile; one that has buffers already gets a look
 * instead (its kick may have been skipped while notifications were off). */
static void stop_polling(struct vu_worker *w)
{
    struct vu_vq *qs[VU_WORKER_MAX_QUEUES];
    uint32_t n = queues_snapshot(w, qs);
    for (uint32_t i = 0; i < n; i++) {
        struct vu_vq *vq = qs[i];
        if (!vq->polling)     /* only this thread sets it */
            continue;
        vu_dev_rdlock(vq->dev);
        if (vu_vq_stop_polling(vq))
            __atomic_or_fetch(&vq->kicked, KICK_SOFT, __ATOMIC_RELEASE);
        vu_dev_unlock(vq->dev);
    }
}

/* How long epoll may sleep: 0 when a queue still has a look pending (its
 * handler ran out of budget with notifications off, so no kick will come
 * for what is left; this can be left over from any loop that stopped on a
 * time limit), 1 ms when a ring has no kick fd (polled by request of the
 * front-end), else until an fd fires. */
static int sleep_timeout(struct vu_worker *w)
{
    int timeout = -1;
    pthread_mutex_lock(&w->lock);
    for (uint32_t i = 0; i < w->nqueues; i++) {
        if (__atomic_load_n(&w->queues[i]->kicked, __ATOMIC_ACQUIRE)) {
            timeout = 0;
            break;
        }
        if (w->queues[i]->kick_polled)
            timeout = 1;
    }
    pthread_mutex_unlock(&w->lock);
    return timeout;
}

static void dispatch_events(struct vu_worker *w, struct epoll_event *evs, int n)
{
    for (int i = 0; i < n; i++) {
        uint64_t data = evs[i].data.u64;
        struct vu_vq *vq = (struct vu_vq *)(uintptr_t)(data & ~(uint64_t)EVENT_FD_TAG);
        if (data & EVENT_FD_TAG) {
            __atomic_or_fetch(&vq->kicked, KICK_SOFT | KICK_EVENT, __ATOMIC_RELEASE);
        } else if (!vq) {
            uint64_t v;
            ssize_t r = read(w->wake_fd, &v, sizeof(v));
            (void)r;
        } else {
            __atomic_or_fetch(&vq->kicked, KICK_FD, __ATOMIC_RELEASE);
        }
    }
}

/* Adaptive polling: the driver often answers a completion with its next
 * request within microseconds, and a sleeping worker takes ~20 us to wake
 * on these VMs (more than the request). Serves what comes within the
 * window, restarting it on each catch; returns when a window passed with
 * nothing, which halves the next one. */
/* Empty looks at the rings between two reads of the clock while polling
 * (a read costs about as much as a look at an idle ring here). */
#define POLL_CLOCK_EVERY 16

static void spin(struct vu_worker *w, struct epoll_event *evs)
{
    uint64_t start = now_us();
    unsigned empty = 0;
    bool caught = false;   /* since the clock was last read */
    while (!w->stop) {
        /* Handler-owned fds (io_uring completions, TAP) are not in the
         * rings: look at them too, without sleeping. Kicks need no look
         * (the rings are looked at), so without such fds: no syscall. */
        if (w->event_fds)
            dispatch_events(w, evs, epoll_wait(w->epfd, evs, 32, 0));
        if (serve_all(w, true) != VU_HANDLED_NONE) {
            w->spin_catches++;
            caught = true;
            continue;
        }
        if (++empty % POLL_CLOCK_EVERY)
            continue;
        uint64_t t = now_us();
        if (caught) {
            start = t;
            caught = false;
        } else if (t - start >= w->spin_us) {
            break;
        }
    }
    w->spin_us = w->spin_us >= 8 ? w->spin_us / 2 : 0;
}

static void *worker_main(void *arg)
{
    struct vu_worker *w = arg;
    struct epoll_event evs[32];
    bool more = false;   /* a handler returned VU_HANDLED_MORE: serve again soon */
    vu_fault_worker_start();
    while (!w->stop) {
        if (w->poll_us) {
            /* Busy-poll: spin while work keeps coming, for up to poll_us
             * after the last piece of work, then sleep on the eventfds. */
            uint64_t idle_since = now_us();
            unsigned empty = 0;
            bool worked = false;   /* since the clock was last read */
            while (!w->stop) {
                /* Handler-owned fds (io_uring completions, TAP) are not in
                 * the rings: look at them too, without sleeping. */
                if (w->event_fds)
                    dispatch_events(w, evs, epoll_wait(w->epfd, evs, 32, 0));
                if (serve_all(w, true) != VU_HANDLED_NONE) {
                    worked = true;
                    continue;
                }
                if (++empty % POLL_CLOCK_EVERY)
                    continue;
                uint64_t t = now_us();
                if (worked) {
                    idle_since = t;
                    worked = false;
                } else if (t - idle_since >= w->poll_us) {
                    break;
                }
            }
            /* The poll may have consumed vu_worker_free's wake-up. */
            if (w->stop)
                break;
        }
        /* A ring whose front-end asked for polling (no kick fd) is looked
         * at every millisecond. Handlers still in the middle of their work
         * (below) have notifications off: nothing would wake us for them,
         * so only glance at the fds then. */
        if (!more)
            stop_polling(w);
        int timeout = more ? 0 : sleep_timeout(w);
        uint64_t slept_at = w->spin_max_us && timeout ? now_us() : 0;
        int n = epoll_wait(w->epfd, evs, 32, timeout);
        if (n < 0 && errno != EINTR)
            break;
        w->wakeups++;
        /* Work soon after going to sleep: the driver is busy, try a full
         * window again. Not only when a window would have caught it: a
         * driver answers faster when we don't sleep (its own wake-up is
         * quicker when ours is not in the way), so a sleeping worker sees
         * longer gaps than a spinning one would. */
        if (slept_at && n > 0 && now_us() - slept_at < 4 * (uint64_t)w->spin_max_us)
            w->spin_us = w->spin_max_us;
        dispatch_events(w, evs, n);
        if (w->stop)
            break;
        /* Handlers that ran out of their round budget set kicked again;
         * after a while the fds get a look in between. A worker that polls
         * after serving serves as a polling one already: a driver quick
         * enough to add its next request before the handler looks again
         * (one sharing our CPU runs right after our notification) would
         * otherwise be asked to kick for each of them. stop_polling() asks
         * for kicks again before any sleep. */
        more = false;
        int served = VU_HANDLED_NONE;
        bool polls = w->poll_us || w->spin_us;
        for (int rounds = 0; rounds < 1000; rounds++) {
            int r = serve_all(w, polls);
            served = r > served ? r : served;
            more = r == VU_HANDLED_MORE;
            if (!more || w->stop)
                break;
        }
        if (!more && served != VU_HANDLED_NONE && w->spin_us && !w->stop)
            spin(w, evs);
    }
    return NULL;
}

int vu_worker_start(struct vu_worker *w)
{
    if (w->running)
        return 0;
    w->stop = false;
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0)
        return -VU_ERR_SYS;
    w->running = true;
    return 0;
}

/* Under the queue lock: a completion on another thread that frees a
 * resubmitted request kicks the worker under it (vu_queue.c), and must
 * not find one that is being freed. */
static void forget_worker(struct vu_vq *vq)
{
    pthread_mutex_lock(&vq->lock);
    vq->worker = NULL;
    pthread_mutex_unlock(&vq->lock);
}

void vu_worker_free(struct vu_worker *w)
{
    if (!w)
        return;
    if (w->running) {
        w->stop = true;
        wake(w);
        pthread_join(w->thread, NULL);
    }
    pthread_mutex_lock(&w->lock);
    for (uint32_t i = 0; i < w->nqueues; i++)
        forget_worker(w->queues[i]);
    pthread_mutex_unlock(&w->lock);
    close(w->epfd);
    close(w->wake_fd);
    pthread_mutex_destroy(&w->lock);
    free(w);
}

int vu_worker_add_queue(struct vu_worker *w, struct vu_vq *vq,
                        vu_handler_fn handler, void *ctx)
{
    pthread_mutex_lock(&w->lock);
    if (w->nqueues >= VU_WORKER_MAX_QUEUES) {
        pthread_mutex_unlock(&w->lock);
        return -VU_ERR_INVAL;
    }
    vq->handler = handler;
    vq->handler_ctx = ctx;
    vq->worker = w;
    w->queues[w->nqueues++] = vq;
    __atomic_add_fetch(&w->gen, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&w->lock);
    return 0;
}

void vu_worker_remove_queue(struct vu_worker *w, struct vu_vq *vq)
{
    pthread_mutex_lock(&w->lock);
    for (uint32_t i = 0; i < w->nqueues; i++) {
        if (w->queues[i] == vq) {
            w->queues[i] = w->queues[--w->nqueues];
            break;
        }
    }
    __atomic_add_fetch(&w->gen, 1, __ATOMIC_RELEASE);
    if (vq->kick_fd >= 0)
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, vq->kick_fd, NULL);
    forget_worker(vq);
    pthread_mutex_unlock(&w->lock);
}

int vu_worker_set_kick(struct vu_worker *w, struct vu_vq *vq, int fd, bool polled)
{
    if (vq->kick_fd >= 0)
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, vq->kick_fd, NULL);
    vq->kick_fd = fd;
    vq->kick_polled = polled;
    vq->kick_eof = false;
    if (fd >= 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = vq};
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            vq->kick_fd = -1;
            return -VU_ERR_SYS;
        }
    }
    wake(w);  /* recompute the polling timeout */
    return 0;
}

int vu_worker_add_event_fd(struct vu_worker *w, struct vu_vq *vq, int fd, bool edge)
{
    struct epoll_event ev = {.events = EPOLLIN | (edge ? EPOLLET : 0),
                             .data.u64 = (uint64_t)(uintptr_t)vq | EVENT_FD_TAG};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        if (errno != EEXIST)
            return -VU_ERR_SYS;
        return 0;
    }
    w->event_fds++;   /* called on the worker's own thread (from its handlers) */
    return 0;
}

void vu_worker_kick(struct vu_worker *w, struct vu_vq *vq)
{
    __atomic_or_fetch(&vq->kicked, KICK_SOFT, __ATOMIC_RELEASE);
    wake(w);
}

/* Python-side handlers ------------------------------------------------------ */

/* Defined by cffi (extern "Python"): handles n popped chains. */
int vu_py_batch(void *ctx, struct vu_vq *vq, struct vu_elem **elems, int n);

int vu_py_handler(void *ctx, struct vu_vq *vq)
{
    struct vu_elem *elems[VU_PY_BATCH];
    if (!vq->enabled || vq->broken)
        return VU_HANDLED_NONE;
    for (int round = 0; round < VU_HANDLER_ROUNDS; round++) {
        vu_vq_set_notification(vq, false);
        int n = 0;
        int rc = 0;
        while (n < VU_PY_BATCH && (rc = vu_vq_pop(vq, &elems[n])) == 1)
            n++;
        if (n) {
            /* Without the device lock, as the blk and net Python paths: a
             * handler that blocks must not block the control plane, which
             * takes the lock to stop, reset or remap rings. The elements
             * hold their guest memory meanwhile (detached if the front-end
             * takes it back); pushes go through the ring's own lock, which
             * publishes, holds or drops them as the ring is by then. */
            vu_dev_unlock(vq->dev);
            vu_py_batch(ctx, vq, elems, n);
            vu_dev_rdlock(vq->dev);
            vu_vq_flush(vq);
            vu_vq_notify(vq);
        }
        if (rc < 0)
            return VU_HANDLED_SOME;  /* queue broken: nothing more until reset */
        if (!vu_vq_serving(vq))      /* disabled, stopped or broken meanwhile */
            return round || n ? VU_HANDLED_SOME : VU_HANDLED_NONE;
        if (n == VU_PY_BATCH)
            continue;
        if (!vu_vq_set_notification(vq, true))
            return round || n ? VU_HANDLED_SOME : VU_HANDLED_NONE;
    }
    return VU_HANDLED_MORE;
}
