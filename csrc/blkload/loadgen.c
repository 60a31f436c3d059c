/* vhostuser-blkload's hot loop: the driver side of split virtqueues.
 *
 * Python (vhostuser.frontend) does the control plane: negotiation, memory
 * table, ring addresses, kick/call eventfds. It then hands this code the
 * rings' addresses in its own mapping of guest memory, plus per-slot header,
 * status and data buffers, and lg_run() keeps `qd` requests in flight per
 * queue until the time is up, then drains.
 *
 * Each in-flight slot s owns descriptors 3s (header), 3s+1 (data) and 3s+2
 * (status): direct 3-descriptor chains, head 3s, written once; a request
 * only rewrites the header (type, sector) and the data descriptor's WRITE
 * flag. Latency is clock_gettime(MONOTONIC) from the moment a request is put
 * in the avail ring to the moment its used element is seen, in a log-linear
 * histogram (64 buckets per power of two: <1.6% error).
 *
 * Ordering: x86-TSO with compiler barriers via __atomic; the two store->load
 * orders virtio needs (avail idx -> avail_event/flags, used_event -> used idx)
 * use full fences, as Linux's virtio_ring does with virtio_mb().
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LG_HIST 4096
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define STAMP_MAGIC 0x5655424c4b4c4f44ULL   /* "VUBLKLOD" */

struct lg_queue {
    uint64_t desc_uva, avail_uva, used_uva;
    uint32_t size;
    int32_t kick_fd, call_fd;
    uint64_t hdr_uva, hdr_gpa;     /* qd * 16 bytes */
    uint64_t st_uva, st_gpa;       /* qd bytes */
    uint64_t data_uva, data_gpa;   /* qd * bs bytes */
};

struct lg_config {
    int32_t nq, qd;
    uint32_t bs;
    int32_t random;        /* random offsets, else sequential */
    int32_t read_pct;      /* 100: all reads, 0: all writes */
    int32_t event_idx;     /* VIRTIO_RING_F_EVENT_IDX negotiated */
    int32_t spin;          /* busy-poll the used rings instead of sleeping on call fds */
    int32_t verify;        /* stamp written sectors, check read ones */
    uint64_t capacity;     /* bytes usable (offsets + bs stay below) */
    uint64_t start;        /* first offset for sequential I/O */
    uint64_t max_ios;      /* stop submitting after this many (0: no limit) */
    uint32_t flush_every;  /* a FLUSH after every this many writes submitted (0: none) */
    double seconds;
    uint64_t seed;
};

struct lg_result {
    uint64_t ios, reads, writes, bytes, errors, verify_errors;
    uint64_t flushes;      /* FLUSH requests completed (not in ios) */
    double flush_lat_sum;  /* ns */
    uint64_t kicks, sleeps, calls;
    int32_t stalled;       /* 1: nothing completed for 10 s, gave up */
    double elapsed;        /* seconds from first submit to last completion */
    double lat_min, lat_max, lat_sum;   /* ns */
    uint64_t hist[LG_HIST];
};

struct vdesc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vused_elem { uint32_t id, len; };
struct blk_hdr { uint32_t type, ioprio; uint64_t sector; };

struct qstate {
    struct lg_queue *q;
    struct vdesc *desc;
    volatile uint16_t *avail;   /* flags, idx, ring[size], used_event */
    volatile uint16_t *used;    /* flags, idx, then elems */
    uint16_t avail_idx, kicked_idx, last_used;
    int inflight;
    uint64_t *start_ns;
    uint64_t *offset;
    uint8_t *kind;              /* KIND_* of the request in each slot */
};

enum { KIND_READ = 0, KIND_WRITE = 1, KIND_FLUSH = 2 };

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static inline unsigned hist_index(uint64_t v)
{
    if (v < 128)
        return (unsigned)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - 6;
    unsigned i = 128 + (unsigned)(msb - 7) * 64 + (unsigned)((v >> shift) & 63);
    return i < LG_HIST ? i : LG_HIST - 1;
}

/* The middle of bucket i, in ns. */
double lg_hist_value(unsigned i)
{
    if (i < 128)
        return i;
    unsigned msb = (i - 128) / 64 + 7, m = (i - 128) % 64;
    int shift = msb - 6;
    return (double)((64ull + m) << shift) + (double)(1ull << shift) / 2;
}

double lg_percentile(const struct lg_result *r, double pct)
{
    uint64_t total = 0;
    for (unsigned i = 0; i < LG_HIST; i++)
        total += r->hist[i];
    if (!total)
        return 0;
    uint64_t want = (uint64_t)(pct / 100.0 * (double)total);
    if (want >= total)
        want = total - 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < LG_HIST; i++) {
        seen += r->hist[i];
        if (seen > want)
            return lg_hist_value(i);
    }
    return 0;
}

static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

void lg_stamp(void *buf, uint64_t first_sector, uint64_t nsectors)
{
    for (uint64_t i = 0; i < nsectors; i++) {
        uint64_t *p = (uint64_t *)((char *)buf + i * 512);
        p[0] = (first_sector + i) ^ STAMP_MAGIC;
    }
}

static uint64_t check_stamps(const void *buf, uint64_t first_sector, uint64_t nsectors)
{
    uint64_t bad = 0;
    for (uint64_t i = 0; i < nsectors; i++) {
        const uint64_t *p = (const uint64_t *)((const char *)buf + i * 512);
        bad += p[0] != ((first_sector + i) ^ STAMP_MAGIC);
    }
    return bad;
}

struct gen {
    const struct lg_config *cfg;
    uint64_t rng, seq, submitted;
    uint32_t writes_since_flush;
};

/* Puts slot s on the avail ring. */
static void post(struct qstate *qs, int s, uint64_t t)
{
    struct lg_queue *q = qs->q;
    qs->start_ns[s] = t;
    uint16_t size = (uint16_t)q->size;
    qs->avail[2 + qs->avail_idx % size] = (uint16_t)(3 * s);
    qs->avail_idx++;
    qs->inflight++;
}

/* Fills slot s's header and data descriptor for a new request; returns 0 if
 * the I/O budget is spent. With flush_every, every that many writes are
 * followed by a FLUSH (header and status only: the head skips the data
 * descriptor), which does not count against the budget. */
static int prep(struct gen *g, struct qstate *qs, int s, uint64_t t)
{
    const struct lg_config *cfg = g->cfg;
    struct lg_queue *q = qs->q;
    struct blk_hdr *h = (struct blk_hdr *)(uintptr_t)(q->hdr_uva + 16ull * s);
    uint8_t *st = (uint8_t *)(uintptr_t)(q->st_uva + s);
    if (cfg->flush_every && g->writes_since_flush >= cfg->flush_every) {
        g->writes_since_flush = 0;
        h->type = BLK_T_FLUSH;
        h->ioprio = 0;
        h->sector = 0;
        qs->desc[3 * s].next = (uint16_t)(3 * s + 2);
        *st = 0xff;
        qs->kind[s] = KIND_FLUSH;
        post(qs, s, t);
        return 1;
    }
    if (cfg->max_ios && g->submitted >= cfg->max_ios)
        return 0;
    g->submitted++;
    uint64_t off;
    uint64_t nblocks = cfg->capacity / cfg->bs;
    if (cfg->random) {
        off = (xorshift(&g->rng) % nblocks) * cfg->bs;
    } else {
        off = g->seq;
        g->seq += cfg->bs;
        if (g->seq + cfg->bs > cfg->capacity)
            g->seq = 0;
    }
    int wr = cfg->read_pct >= 100 ? 0 : cfg->read_pct <= 0 ? 1
             : (int)(xorshift(&g->rng) % 100) >= cfg->read_pct;
    h->type = wr ? BLK_T_OUT : BLK_T_IN;
    h->ioprio = 0;
    h->sector = off / 512;
    qs->desc[3 * s].next = (uint16_t)(3 * s + 1);
    struct vdesc *d = &qs->desc[3 * s + 1];
    d->flags = VRING_DESC_F_NEXT | (wr ? 0 : VRING_DESC_F_WRITE);
    *st = 0xff;
    if (wr && cfg->verify)
        lg_stamp((void *)(uintptr_t)(q->data_uva + (uint64_t)cfg->bs * s), off / 512,
                 cfg->bs / 512);
    g->writes_since_flush += (uint32_t)wr;
    qs->offset[s] = off;
    qs->kind[s] = wr ? KIND_WRITE : KIND_READ;
    post(qs, s, t);
    return 1;
}

static inline int need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old);
}

static void publish(const struct lg_config *cfg, struct qstate *qs, struct lg_result *res)
{
    if (qs->avail_idx == qs->kicked_idx)
        return;
    __atomic_store_n(&qs->avail[1], qs->avail_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t old = qs->kicked_idx, nw = qs->avail_idx;
    qs->kicked_idx = nw;
    int kick;
    if (cfg->event_idx) {
        uint16_t avail_event = __atomic_load_n(&qs->used[2 + 4 * qs->q->size], __ATOMIC_ACQUIRE);
        kick = need_event(avail_event, nw, old);
    } else {
        kick = !(__atomic_load_n(&qs->used[0], __ATOMIC_ACQUIRE) & VRING_USED_F_NO_NOTIFY);
    }
    if (kick) {
        uint64_t one = 1;
        if (write(qs->q->kick_fd, &one, 8) == 8)
            res->kicks++;
    }
}

/* Asks for a call after the next used element (or for none, when spinning). */
static void set_notify(const struct lg_config *cfg, struct qstate *qs, int on)
{
    uint16_t size = (uint16_t)qs->q->size;
    if (cfg->event_idx)
        __atomic_store_n(&qs->avail[2 + size], (uint16_t)(on ? qs->last_used : qs->last_used - 1),
                         __ATOMIC_RELEASE);
    else
        __atomic_store_n(&qs->avail[0], (uint16_t)(on ? 0 : VRING_AVAIL_F_NO_INTERRUPT),
                         __ATOMIC_RELEASE);
}

int lg_run(struct lg_queue *queues, const struct lg_config *cfg, struct lg_result *res)
{
    int nq = cfg->nq, qd = cfg->qd;
    if (nq < 1 || nq > 64 || qd < 1 || cfg->bs < 512 || cfg->bs % 512 ||
        cfg->capacity < cfg->bs)
        return -EINVAL;
    struct qstate qs[64];
    memset(qs, 0, sizeof qs);
    memset(res, 0, sizeof *res);
    res->lat_min = 1e30;
    struct gen g = {.cfg = cfg, .rng = cfg->seed | 1, .seq = cfg->start % cfg->capacity};
    for (int i = 0; i < nq; i++) {
        struct lg_queue *q = &queues[i];
        if ((uint32_t)qd * 3 > q->size)
            return -ENOSPC;
        qs[i].q = q;
        qs[i].desc = (struct vdesc *)(uintptr_t)q->desc_uva;
        qs[i].avail = (volatile uint16_t *)(uintptr_t)q->avail_uva;
        qs[i].used = (volatile uint16_t *)(uintptr_t)q->used_uva;
        qs[i].avail_idx = qs[i].kicked_idx = qs[i].avail[1];
        qs[i].last_used = qs[i].used[1];
        qs[i].start_ns = calloc(qd, sizeof(uint64_t));
        qs[i].offset = calloc(qd, sizeof(uint64_t));
        qs[i].kind = calloc(qd, 1);
        if (!qs[i].start_ns || !qs[i].offset || !qs[i].kind)
            return -ENOMEM;
        for (int s = 0; s < qd; s++) {
            qs[i].desc[3 * s] = (struct vdesc){q->hdr_gpa + 16ull * s, 16, VRING_DESC_F_NEXT,
                                               (uint16_t)(3 * s + 1)};
            qs[i].desc[3 * s + 1] = (struct vdesc){q->data_gpa + (uint64_t)cfg->bs * s, cfg->bs,
                                                   VRING_DESC_F_NEXT, (uint16_t)(3 * s + 2)};
            qs[i].desc[3 * s + 2] = (struct vdesc){q->st_gpa + s, 1, VRING_DESC_F_WRITE, 0};
        }
        set_notify(cfg, &qs[i], !cfg->spin);
    }
    struct pollfd pfd[64];
    for (int i = 0; i < nq; i++)
        pfd[i] = (struct pollfd){.fd = queues[i].call_fd, .events = POLLIN};

    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(cfg->seconds * 1e9), last_done = t0;
    int stopping = 0, inflight = 0;
    for (int i = 0; i < nq; i++) {
        for (int s = 0; s < qd && prep(&g, &qs[i], s, t0); s++)
            ;
        inflight += qs[i].inflight;
        publish(cfg, &qs[i], res);
    }
    uint64_t tlast = t0;
    unsigned spins = 0;
    while (inflight > 0) {
        int progressed = 0;
        for (int i = 0; i < nq; i++) {
            struct qstate *q = &qs[i];
            uint16_t uidx = __atomic_load_n(&q->used[1], __ATOMIC_ACQUIRE);
            if (uidx == q->last_used)
                continue;
            if ((uint16_t)(uidx - q->last_used) > q->inflight) {
                res->errors++;     /* device claims more than in flight: give up */
                inflight = 0;
                res->stalled = 1;
                break;
            }
            uint64_t t = now_ns();
            tlast = t;
            if (t >= end)
                stopping = 1;
            uint16_t size = (uint16_t)q->q->size;
            struct vused_elem *ring = (struct vused_elem *)(uintptr_t)(q->q->used_uva + 4);
            while (q->last_used != uidx) {
                struct vused_elem e = ring[q->last_used % size];
                q->last_used++;
                q->inflight--;
                inflight--;
                int s = (int)(e.id / 3);
                if (e.id % 3 || s >= qd) {
                    res->errors++;
                    continue;
                }
                uint8_t status = *(volatile uint8_t *)(uintptr_t)(q->q->st_uva + s);
                if (status != 0)
                    res->errors++;
                uint64_t lat = t - q->start_ns[s];
                if (q->kind[s] == KIND_FLUSH) {
                    res->flushes++;
                    res->flush_lat_sum += (double)lat;
                    if (!stopping && prep(&g, q, s, t))
                        inflight++;
                    continue;
                }
                res->hist[hist_index(lat)]++;
                res->lat_sum += (double)lat;
                if (lat < res->lat_min) res->lat_min = (double)lat;
                if (lat > res->lat_max) res->lat_max = (double)lat;
                res->ios++;
                res->bytes += cfg->bs;
                if (q->kind[s] == KIND_WRITE) {
                    res->writes++;
                } else {
                    res->reads++;
                    if (cfg->verify && status == 0)
                        res->verify_errors += check_stamps(
                            (void *)(uintptr_t)(q->q->data_uva + (uint64_t)cfg->bs * s),
                            q->offset[s] / 512, cfg->bs / 512) != 0;
                }
                if (!stopping && prep(&g, q, s, t))
                    inflight++;
            }
            if (!cfg->spin)
                set_notify(cfg, q, 1);
            publish(cfg, q, res);
            progressed = 1;
        }
        if (progressed) {
            last_done = tlast;
            continue;
        }
        if (cfg->spin) {
            if (++spins % 4096 == 0 && now_ns() - last_done > 10000000000ull) {
                res->stalled = 1;
                break;
            }
            __builtin_ia32_pause();
            continue;
        }
        /* Notifications are on (used_event = last_used); look once more
         * after the fence, then sleep on the call eventfds. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        int ready = 0;
        for (int i = 0; i < nq; i++)
            ready |= __atomic_load_n(&qs[i].used[1], __ATOMIC_ACQUIRE) != qs[i].last_used;
        if (ready)
            continue;
        res->sleeps++;
        int n = poll(pfd, nq, 1000);
        if (n < 0 && errno != EINTR)
            break;
        if (n <= 0) {
            if (now_ns() - last_done > 10000000000ull) {
                res->stalled = 1;
                break;
            }
            continue;
        }
        for (int i = 0; i < nq; i++) {
            if (pfd[i].revents & POLLIN) {
                uint64_t v;
                if (read(pfd[i].fd, &v, 8) == 8)
                    res->calls += v;
            }
        }
    }
    res->elapsed = (double)(tlast - t0) / 1e9;
    if (!res->ios)
        res->lat_min = 0;
    for (int i = 0; i < nq; i++) {
        free(qs[i].start_ns);
        free(qs[i].offset);
        free(qs[i].kind);
    }
    return res->stalled ? -ETIMEDOUT : 0;
}

/* Brings every page of fd's first `size` bytes into the page cache, reading
 * only those mincore() says are not there, 4 KiB at a time with readahead
 * off (so they come back as 4 KiB pages). *resident: pages that were
 * there. Returns the pages read, or -errno. */
int64_t lg_warm(int fd, uint64_t size, uint64_t *resident)
{
    size_t npages = (size_t)((size + 4095) / 4096);
    *resident = 0;
    if (!npages)
        return 0;
    void *m = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        return -errno;
    unsigned char *vec = malloc(npages);
    int64_t rc = 0;
    if (!vec) {
        rc = -ENOMEM;
    } else if (mincore(m, size, vec) < 0) {
        rc = -errno;
    } else {
        static char buf[4096] __attribute__((aligned(4096)));
        posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
        for (size_t i = 0; i < npages; i++) {
            if (vec[i] & 1) {
                (*resident)++;
                continue;
            }
            if (pread(fd, buf, sizeof(buf), (off_t)i * 4096) < 0) {
                rc = -errno;
                break;
            }
            rc++;
        }
        posix_fadvise(fd, 0, 0, POSIX_FADV_NORMAL);
    }
    free(vec);
    munmap(m, size);
    return rc;
}
