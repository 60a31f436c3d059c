/* Fault injection for tests (vu_fault.h). Parsed once; a process without
 * VHOSTUSER_FAULT pays one predictable branch per notification. */
#include "vu_fault.h"
#include "vu_dev.h"
#include "vu_net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

void (*vu_fault_round_unlocked)(void);
int vu_fault_uring_enter_errno;

static pthread_once_t parsed = PTHREAD_ONCE_INIT;
static uint64_t exit_before_notify;   /* 0: off */
static uint64_t notifications;
static char escape[64];               /* sandbox-escape: what to try ("" off) */
static char escape_arg[256];
static int escape_tried;

static void parse(void)
{
    const char *spec = getenv("VHOSTUSER_FAULT");
    const char *name = "exit-before-notify:";
    if (spec && strncmp(spec, name, strlen(name)) == 0)
        exit_before_notify = strtoull(spec + strlen(name), NULL, 10);
    const char *esc = "sandbox-escape:";
    if (spec && strncmp(spec, esc, strlen(esc)) == 0) {
        const char *what = spec + strlen(esc);
        const char *colon = strchr(what, ':');
        size_t n = colon ? (size_t)(colon - what) : strlen(what);
        if (n < sizeof(escape)) {
            memcpy(escape, what, n);
            escape[n] = 0;
        }
        if (colon)
            snprintf(escape_arg, sizeof(escape_arg), "%s", colon + 1);
    }
}

static void report(const char *what, int rc, int err)
{
    char line[200];
    int n = rc < 0 ? snprintf(line, sizeof(line), "vhostuser-fault: sandbox-escape %s: refused (%s)\n",
                              what, strerrorname_np(err) ? strerrorname_np(err) : "?")
                   : snprintf(line, sizeof(line), "vhostuser-fault: sandbox-escape %s: DONE\n", what);
    ssize_t w = write(2, line, (size_t)n);
    (void)w;
}

void vu_fault_worker_start(void)
{
    pthread_once(&parsed, parse);
    if (__builtin_expect(escape[0] == 0, 1))
        return;
    if (__atomic_exchange_n(&escape_tried, 1, __ATOMIC_RELAXED))
        return;
    int rc = -1, err = 0;
    if (strcmp(escape, "exec") == 0) {
        char *argv[] = {"sh", "-c", escape_arg, NULL};
        char *envp[] = {"PATH=/usr/bin:/bin", NULL};
        execve("/bin/sh", argv, envp);
        err = errno;                  /* only returns on failure */
    } else if (strcmp(escape, "open") == 0) {
        int fd = open("/etc/shadow", O_RDONLY | O_CLOEXEC);
        err = errno;
        if (fd >= 0) {
            char c;
            rc = read(fd, &c, 1) == 1 ? 0 : -1;
            err = errno;
            close(fd);
        }
    } else if (strcmp(escape, "socket") == 0) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        err = errno;
        if (fd >= 0) {
            struct sockaddr_in sin = {.sin_family = AF_INET,
                                      .sin_port = htons((uint16_t)atoi(escape_arg))};
            sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            rc = connect(fd, (struct sockaddr *)&sin, sizeof(sin));
            err = errno;
            if (rc == 0) {
                ssize_t w = write(fd, "escaped\n", 8);
                (void)w;
            }
            close(fd);
        }
    } else if (strcmp(escape, "ptrace") == 0) {
        rc = (int)ptrace(PTRACE_ATTACH, (pid_t)atoi(escape_arg), NULL, NULL);
        err = errno;
        if (rc == 0)
            ptrace(PTRACE_DETACH, (pid_t)atoi(escape_arg), NULL, NULL);
    } else {
        err = EINVAL;
    }
    report(escape, rc, err);
}

void vu_fault_before_notify(void)
{
    pthread_once(&parsed, parse);
    if (__builtin_expect(exit_before_notify == 0, 1))
        return;
    if (__atomic_add_fetch(&notifications, 1, __ATOMIC_RELAXED) == exit_before_notify)
        _exit(VU_FAULT_EXIT);
}

/* Readers that never all let go at once (vu_fault.h). Thread i lets go
 * only when `turn` is i, which its partner sets once it holds the lock
 * again, so one of them always holds it. */
#define READERS_PATIENCE_NS 200000000ull

struct reader_arg {
    struct vu_fault_readers *r;
    int i;
};

struct vu_fault_readers {
    struct vu_dev *dev;
    pthread_t threads[2];
    struct reader_arg args[2];
    int started[2];
    int ready;          /* atomic: threads holding the lock for the first time */
    int turn;           /* atomic: which thread lets go next */
    int stop;           /* atomic */
    uint64_t taken;     /* atomic */
};

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *reader(void *p)
{
    struct reader_arg *a = p;
    struct vu_fault_readers *r = a->r;
    vu_dev_rdlock(r->dev);
    __atomic_add_fetch(&r->ready, 1, __ATOMIC_ACQ_REL);
    while (__atomic_load_n(&r->ready, __ATOMIC_ACQUIRE) < 2 &&
           !__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE))
        sched_yield();
    for (;;) {
        uint64_t since = mono_ns();
        while (__atomic_load_n(&r->turn, __ATOMIC_ACQUIRE) != a->i &&
               !__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE) &&
               mono_ns() - since < READERS_PATIENCE_NS)
            sched_yield();
        if (__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE))
            break;
        vu_dev_unlock(r->dev);
        vu_dev_rdlock(r->dev);
        __atomic_add_fetch(&r->taken, 1, __ATOMIC_RELAXED);
        __atomic_store_n(&r->turn, 1 - a->i, __ATOMIC_RELEASE);
    }
    vu_dev_unlock(r->dev);
    return NULL;
}

uint64_t vu_fault_readers_stop(struct vu_fault_readers *r)
{
    if (!r)
        return 0;
    __atomic_store_n(&r->stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < 2; i++)
        if (r->started[i])
            pthread_join(r->threads[i], NULL);
    uint64_t taken = __atomic_load_n(&r->taken, __ATOMIC_RELAXED);
    free(r);
    return taken;
}

struct vu_fault_readers *vu_fault_readers_start(struct vu_dev *dev)
{
    struct vu_fault_readers *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->dev = dev;
    for (int i = 0; i < 2; i++) {
        r->args[i] = (struct reader_arg){r, i};
        if (pthread_create(&r->threads[i], NULL, reader, &r->args[i]) != 0) {
            vu_fault_readers_stop(r);
            return NULL;
        }
        r->started[i] = 1;
    }
    return r;
}

uint64_t vu_fault_readers_taken(struct vu_fault_readers *r)
{
    return __atomic_load_n(&r->taken, __ATOMIC_RELAXED);
}

/* Concurrent deliveries into one receive queue (vu_fault.h). */
#define INJECT_THREADS_MAX 8

struct injector {
    struct vu_net_dev *n;
    uint32_t qp;
    const uint8_t *data;
    uint32_t len;
    uint64_t each;
    uint64_t delivered;
    int *go;            /* atomic: 0 wait, 1 go, -1 give up */
};

static void *injector(void *p)
{
    struct injector *in = p;
    int go;
    while ((go = __atomic_load_n(in->go, __ATOMIC_ACQUIRE)) == 0)
        sched_yield();
    for (uint64_t i = 0; go > 0 && i < in->each; i++)
        in->delivered += vu_net_inject(in->n, in->qp, in->data, in->len) == 0;
    return NULL;
}

int64_t vu_fault_net_inject_threads(struct vu_net_dev *n, uint32_t qp, const uint8_t *data,
                                    uint32_t len, int nthreads, uint64_t each)
{
    if (nthreads < 1 || nthreads > INJECT_THREADS_MAX)
        return -1;
    struct injector in[INJECT_THREADS_MAX];
    pthread_t threads[INJECT_THREADS_MAX];
    int go = 0, started = 0;
    for (; started < nthreads; started++) {
        in[started] = (struct injector){n, qp, data, len, each, 0, &go};
        if (pthread_create(&threads[started], NULL, injector, &in[started]) != 0)
            break;
    }
    __atomic_store_n(&go, started == nthreads ? 1 : -1, __ATOMIC_RELEASE);
    int64_t delivered = 0;
    for (int i = 0; i < started; i++) {
        pthread_join(threads[i], NULL);
        delivered += (int64_t)in[i].delivered;
    }
    return started < nthreads ? -1 : delivered;
}
