/* io_uring through raw system calls. */
#include "vu_uring.h"
#include "vu_fault.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static int sys_setup(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(int fd, unsigned submit, unsigned complete, unsigned flags)
{
    if (__builtin_expect(vu_fault_uring_enter_errno != 0, 0)) {
        errno = vu_fault_uring_enter_errno;
        return -1;
    }
    return (int)syscall(__NR_io_uring_enter, fd, submit, complete, flags, NULL, 0);
}

static int sys_register(int fd, unsigned op, void *arg, unsigned n)
{
    return (int)syscall(__NR_io_uring_register, fd, op, arg, n);
}

/* Only the operations the block back-end submits, without SQE flags, and
 * no registration once enabled: a ring is no way around the sandbox's
 * system call filter (io_uring operations don't pass through seccomp). */
static int restrict_ring(int fd)
{
    static const uint8_t ops[] = {IORING_OP_NOP, IORING_OP_READV, IORING_OP_WRITEV,
                                  IORING_OP_FSYNC};
    struct io_uring_restriction res[sizeof(ops)];
    memset(res, 0, sizeof(res));
    for (unsigned i = 0; i < sizeof(ops); i++) {
        res[i].opcode = IORING_RESTRICTION_SQE_OP;
        res[i].sqe_op = ops[i];
    }
    if (sys_register(fd, IORING_REGISTER_RESTRICTIONS, res, sizeof(ops)) < 0)
        return -errno;
    return 0;
}

int vu_uring_init(struct vu_uring *u, unsigned entries)
{
    memset(u, 0, sizeof(*u));
    u->fd = u->efd = -1;
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    /* Disabled until restricted (Linux 5.10); older kernels get a plain ring. */
    p.flags = IORING_SETUP_R_DISABLED;
    int fd = sys_setup(entries, &p);
    if (fd < 0 && errno == EINVAL) {
        memset(&p, 0, sizeof(p));
        fd = sys_setup(entries, &p);
    }
    if (fd < 0)
        return -errno;
    u->fd = fd;
    u->entries = p.sq_entries;
    u->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    u->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    u->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    u->sq_ptr = mmap(NULL, u->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     fd, IORING_OFF_SQ_RING);
    u->cq_ptr = mmap(NULL, u->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     fd, IORING_OFF_CQ_RING);
    u->sqes = mmap(NULL, u->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   fd, IORING_OFF_SQES);
    if (u->sq_ptr == MAP_FAILED || u->cq_ptr == MAP_FAILED || u->sqes == MAP_FAILED)
        goto fail;
    uint8_t *sq = u->sq_ptr, *cq = u->cq_ptr;
    u->sq_head = (unsigned *)(sq + p.sq_off.head);
    u->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    u->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    u->sq_array = (unsigned *)(sq + p.sq_off.array);
    u->cq_head = (unsigned *)(cq + p.cq_off.head);
    u->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    u->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    u->refused = calloc(p.sq_entries, sizeof(*u->refused));
    if (!u->refused)
        goto fail;
    u->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (u->efd < 0 || sys_register(fd, IORING_REGISTER_EVENTFD, &u->efd, 1) < 0)
        goto fail;
    if (p.flags & IORING_SETUP_R_DISABLED) {
        int rc = restrict_ring(fd);
        if (sys_register(fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0) < 0)
            goto fail;
        u->restricted = rc == 0;
    }
    return 0;
fail:;
    int err = errno ? errno : ENOMEM;
    if (u->sq_ptr == MAP_FAILED)
        u->sq_ptr = NULL;
    if (u->cq_ptr == MAP_FAILED)
        u->cq_ptr = NULL;
    if ((void *)u->sqes == MAP_FAILED)
        u->sqes = NULL;
    vu_uring_exit(u);
    return -err;
}

void vu_uring_exit(struct vu_uring *u)
{
    if (u->sq_ptr)
        munmap(u->sq_ptr, u->sq_len);
    if (u->cq_ptr)
        munmap(u->cq_ptr, u->cq_len);
    if (u->sqes)
        munmap(u->sqes, u->sqes_len);
    if (u->fd >= 0)
        close(u->fd);
    if (u->efd >= 0)
        close(u->efd);
    free(u->refused);
    memset(u, 0, sizeof(*u));
    u->fd = u->efd = -1;
}

struct io_uring_sqe *vu_uring_sqe(struct vu_uring *u)
{
    unsigned head = __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
    unsigned tail = *u->sq_tail + u->queued;
    if (tail - head >= u->entries || u->pending + u->queued >= u->entries)
        return NULL;
    unsigned idx = tail & *u->sq_mask;
    struct io_uring_sqe *sqe = &u->sqes[idx];
    memset(sqe, 0, sizeof(*sqe));
    u->sq_array[idx] = idx;
    u->queued++;
    return sqe;
}

void vu_uring_void_queued(struct vu_uring *u, bool (*keep)(uint64_t user_data))
{
    for (unsigned i = 0; i < u->queued; i++) {
        struct io_uring_sqe *sqe = &u->sqes[(*u->sq_tail + i) & *u->sq_mask];
        uint64_t tag = sqe->user_data;
        if (keep(tag))
            continue;
        memset(sqe, 0, sizeof(*sqe));
        sqe->opcode = IORING_OP_NOP;
        sqe->user_data = tag;
    }
}

/* The last `left` entries of the submission queue, which the kernel did
 * not take: out of the queue again (it reads the tail only inside
 * io_uring_enter, so none of them can run later), each completed here with
 * -ECANCELED. The worker is woken for them as for the kernel's. */
static void refuse(struct vu_uring *u, unsigned left)
{
    unsigned tail = *u->sq_tail - left;
    for (unsigned i = 0; i < left; i++) {
        struct io_uring_cqe *cqe = &u->refused[u->nrefused++];
        cqe->user_data = u->sqes[(tail + i) & *u->sq_mask].user_data;
        cqe->res = -ECANCELED;
        cqe->flags = 0;
    }
    __atomic_store_n(u->sq_tail, tail, __ATOMIC_RELEASE);
    uint64_t one = 1;
    ssize_t w = write(u->efd, &one, sizeof(one));
    (void)w;
}

/* Tries in a row in which the kernel takes nothing (EINTR, EAGAIN, EBUSY,
 * or none taken) before what is left is refused, this time only. */
#define SUBMIT_TRIES 8

int vu_uring_submit(struct vu_uring *u)
{
    if (!u->queued)
        return 0;
    unsigned n = u->queued;
    __atomic_store_n(u->sq_tail, *u->sq_tail + n, __ATOMIC_RELEASE);
    u->queued = 0;
    u->pending += n;
    unsigned left = n, idle = 0;
    while (left && !u->failed) {
        int rc = sys_enter(u->fd, left, 0, 0);
        if (rc < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) {
            u->failed = errno;   /* for good: asking again would fail again */
            break;
        }
        if (rc > 0) {
            left -= (unsigned)rc;
            idle = 0;
            continue;
        }
        /* For now: EAGAIN, the kernel could not allocate for them (memory
         * pressure); EBUSY, its completion queue overflowed, which can't
         * happen here (at most `entries` submitted and not reaped, and the
         * queue holds twice that). Their end can't be waited for here (the
         * caller reaps), so after a few tries what is left is refused as
         * by a failed ring, done otherwise by the caller, and the ring is
         * kept for what comes next. */
        if (++idle >= SUBMIT_TRIES)
            break;
        sched_yield();
    }
    if (left)
        refuse(u, left);
    return u->failed ? -u->failed : 0;
}

struct io_uring_cqe *vu_uring_peek(struct vu_uring *u)
{
    unsigned head = *u->cq_head;
    u->refused_peeked = false;
    if (head != __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE))
        return &u->cqes[head & *u->cq_mask];
    if (!u->nrefused)
        return NULL;
    u->refused_peeked = true;
    return &u->refused[u->nrefused - 1];
}

void vu_uring_seen(struct vu_uring *u)
{
    if (u->refused_peeked)
        u->nrefused--;
    else
        __atomic_store_n(u->cq_head, *u->cq_head + 1, __ATOMIC_RELEASE);
    u->refused_peeked = false;
    u->pending--;
}

/* Waits for the kernel's next completion. A ring whose io_uring_enter
 * fails waits on its eventfd instead (completions are posted all the same),
 * a while at most: the eventfd may have been read already. */
static void wait_cqe(struct vu_uring *u)
{
    if (!u->failed && sys_enter(u->fd, 0, 1, IORING_ENTER_GETEVENTS) >= 0)
        return;
    if (!u->failed && errno == EINTR)
        return;
    struct pollfd p = {.fd = u->efd, .events = POLLIN};
    poll(&p, 1, 10);
}

void vu_uring_drain(struct vu_uring *u, void (*fn)(void *arg, struct io_uring_cqe *), void *arg)
{
    vu_uring_submit(u);
    while (u->pending) {
        struct io_uring_cqe *cqe = vu_uring_peek(u);
        if (!cqe) {
            wait_cqe(u);
            continue;
        }
        fn(arg, cqe);
        vu_uring_seen(u);
    }
}

/* The pool (vu_uring.h) ------------------------------------------------------------ */

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static struct vu_uring **pool;
static unsigned pool_len, pool_cap;
static bool sealed;

static bool pool_push(struct vu_uring *u)
{
    if (pool_len == pool_cap) {
        unsigned cap = pool_cap ? 2 * pool_cap : 16;
        struct vu_uring **grown = realloc(pool, cap * sizeof(*pool));
        if (!grown)
            return false;
        pool = grown;
        pool_cap = cap;
    }
    pool[pool_len++] = u;
    return true;
}

int vu_uring_pool_fill(unsigned n, unsigned entries)
{
    int made = 0;
    for (unsigned i = 0; i < n; i++) {
        struct vu_uring *u = calloc(1, sizeof(*u));
        if (!u)
            return made ? made : -ENOMEM;
        int rc = vu_uring_init(u, entries);
        if (rc < 0) {
            free(u);
            return made ? made : rc;
        }
        pthread_mutex_lock(&pool_lock);
        bool ok = pool_push(u);
        pthread_mutex_unlock(&pool_lock);
        if (!ok) {
            vu_uring_exit(u);
            free(u);
            return made ? made : -ENOMEM;
        }
        made++;
    }
    return made;
}

void vu_uring_pool_seal(void)
{
    __atomic_store_n(&sealed, true, __ATOMIC_RELEASE);
}

bool vu_uring_sealed(void)
{
    return __atomic_load_n(&sealed, __ATOMIC_ACQUIRE);
}

unsigned vu_uring_pool_size(void)
{
    pthread_mutex_lock(&pool_lock);
    unsigned n = pool_len;
    pthread_mutex_unlock(&pool_lock);
    return n;
}

struct vu_uring *vu_uring_get(unsigned entries)
{
    if (!vu_uring_sealed()) {
        struct vu_uring *u = calloc(1, sizeof(*u));
        if (u && vu_uring_init(u, entries) < 0) {
            free(u);
            u = NULL;
        }
        return u;
    }
    pthread_mutex_lock(&pool_lock);
    struct vu_uring *u = pool_len ? pool[--pool_len] : NULL;
    pthread_mutex_unlock(&pool_lock);
    return u;
}

void vu_uring_put(struct vu_uring *u)
{
    if (!u)
        return;
    if (vu_uring_sealed() && u->fd >= 0 && !u->pending && !u->queued && !u->failed) {
        pthread_mutex_lock(&pool_lock);
        bool ok = pool_push(u);
        pthread_mutex_unlock(&pool_lock);
        if (ok)
            return;
    }
    vu_uring_exit(u);
    free(u);
}
