/* libFuzzer target: the virtio-net data plane through its production queue
 * handler (vu_net_handler), one queue pair (receive queue 0, transmit queue
 * 1) on split or packed rings, with the LOOPBACK back-end (transmitted
 * frames come back on the receive queue), the SINK (counted, dropped) or
 * a Python one stood in for by vu_net_py_tx below (each batch injected
 * back with vu_net_inject_frames, as NetDevice.inject_many does with a
 * FrameBatch, or dropped).
 *
 * Input: 7 bytes of configuration, then the guest memory image (both rings,
 * indirect tables, headers, frames, receive buffers), which the fuzzer
 * controls byte for byte:
 *   [0] features and back-end (CFG_*)
 *   [1] ring sizes: receive 1 << (b & 7), transmit 1 << ((b >> 4) & 7)
 *   [2,3] receive ring base, [4,5] transmit ring base (little endian)
 *   [6] MTU (b & 3: 1500, 68, 9000, 65535), receive/transmit queue
 *       disabled, the Python back-end (with CFG_SINK: one that drops),
 *       dirty logging (VHOST_F_LOG_ALL, used rings logged too)
 * Image layout (guest-physical = offset): receive ring desc 0x0000, avail
 * (packed: driver event) 0x0800, used (device event) 0x0a00; transmit ring
 * the same at 0x1000; the rest is for buffers.
 *
 * Beyond the sanitizers, the checks (all hold whatever the guest wrote):
 *  - buffers are used in the order they were taken (IN_ORDER, which the
 *    device offers for every back-end): each push is of the oldest chain
 *    popped, each unpop of the newest; so nothing stays in flight either;
 *  - a receive buffer is never said to hold more than it has room for
 *    (push_locked would clamp it: the check is on what the net code asks),
 *    and a transmit chain is returned with 0 bytes written;
 *  - the counters agree: every transmitted chain is a packet or a drop,
 *    every looped-back packet a received packet or a receive drop, receive
 *    buffers used = packets (one each without MRG_RXBUF), bytes written to
 *    receive buffers = frame bytes plus at most a header each;
 *  - with dirty logging, every page of guest memory whose bytes changed is
 *    marked in the log (checked beyond the rings' pages, where the device
 *    writes nothing but receive buffers). */
#include "guest.h"
#include "vu_dev.h"
#include "vu_net.h"

#include <linux/virtio_config.h>
#include <linux/virtio_net.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define RX_OFF 0x0000
#define TX_OFF 0x1000
#define DRIVER_OFF 0x800      /* within a ring's area: split avail / packed driver event */
#define DEVICE_OFF 0xa00      /* split used ring (1030 bytes at 128) / packed device event */
#define CFG_BYTES 7

enum {
    CFG_PACKED = 1, CFG_INDIRECT = 2, CFG_EVENT_IDX = 4, CFG_MRG_RXBUF = 8,
    CFG_VERSION_1 = 16, CFG_IN_ORDER = 32,
    CFG_SINK = 64,      /* the SINK back-end instead of LOOPBACK */
    /* The TAP's offloads (CSUM, HOST_TSO4/6, HOST_ECN): not offered with
     * these back-ends, but they reach the GSO and checksum rules of
     * vu_net_check_tx, which all back-ends share, and valid offloaded
     * frames then take the same paths as any other. */
    CFG_OFFLOADS = 128,
};
enum { MISC_RX_DISABLED = 4, MISC_TX_DISABLED = 8, MISC_PYTHON = 16, MISC_LOG = 32 };
#define LOG_PAGE 4096         /* VU_LOG_PAGE: one bit of the log per page */
#define LOG_BYTES 4096
#define DATA_OFF 0x2000       /* the first page the rings don't use */

static const uint32_t mtus[4] = {1500, 68, 9000, 65535};

static struct vu_dev *dev;
static struct vu_net_dev *net;
static uint8_t *view;
static uint8_t before[GUEST_BYTES];   /* guest memory before the handlers ran */
static bool verbose;    /* RING_NET_VERBOSE=1: each input's counters on stderr */

/* The oracle's view of each queue: chains popped and not yet pushed or put
 * back, oldest first; what was claimed written to receive buffers. */
#define MAX_TRACK 1024
struct track {
    struct vu_elem *q[MAX_TRACK];
    uint32_t head, tail;        /* q[head, tail) */
    uint64_t pushed, claimed;
};
static struct track trk[2];

#define FAIL(...) do { fprintf(stderr, "ring_net: " __VA_ARGS__); abort(); } while (0)

static struct track *track_of(struct vu_vq *vq)
{
    return vq == dev->vqs[0] ? &trk[0] : vq == dev->vqs[1] ? &trk[1] : NULL;
}

static void track_popped(struct vu_vq *vq, struct vu_elem *const *e, int n)
{
    struct track *t = track_of(vq);
    for (int i = 0; t && i < n; i++) {
        if (t->tail == MAX_TRACK)
            FAIL("more than %d chains of queue %u in flight\n", MAX_TRACK, vq->index);
        t->q[t->tail++] = e[i];
    }
}

static void track_pushed(struct vu_vq *vq, struct vu_elem *e, uint32_t len)
{
    struct track *t = track_of(vq);
    if (!t)
        return;
    if (t->head == t->tail || t->q[t->head] != e)
        FAIL("queue %u: a chain pushed out of order (or never popped)\n", vq->index);
    if (++t->head == t->tail)
        t->head = t->tail = 0;
    t->pushed++;
    if (vq->index == 0) {
        if (len > e->in_len)
            FAIL("receive buffer: %u bytes claimed, %llu writable\n", len,
                 (unsigned long long)e->in_len);
        t->claimed += len;
    } else if (len != 0) {
        FAIL("transmit chain returned with %u bytes written\n", len);
    }
}

/* Linked with --wrap for these (fuzz/build.sh): the net code's calls into
 * vu_queue.c come here first. */
int __real_vu_vq_pop(struct vu_vq *vq, struct vu_elem **out);
int __real_vu_vq_pop_burst(struct vu_vq *vq, struct vu_elem **out, int max);
int __real_vu_vq_unpop(struct vu_vq *vq, struct vu_elem *elem);
int __real_vu_vq_push(struct vu_vq *vq, struct vu_elem *elem, uint32_t len);
int __real_vu_vq_push_burst(struct vu_vq *vq, struct vu_elem *const *elems, const uint32_t *lens,
                            int n);

int __wrap_vu_vq_pop(struct vu_vq *vq, struct vu_elem **out)
{
    int rc = __real_vu_vq_pop(vq, out);
    if (rc == 1)
        track_popped(vq, out, 1);
    return rc;
}

int __wrap_vu_vq_pop_burst(struct vu_vq *vq, struct vu_elem **out, int max)
{
    int rc = __real_vu_vq_pop_burst(vq, out, max);
    if (rc > max)
        FAIL("pop_burst returned %d of at most %d\n", rc, max);
    if (rc > 0)
        track_popped(vq, out, rc);
    return rc;
}

int __wrap_vu_vq_unpop(struct vu_vq *vq, struct vu_elem *elem)
{
    struct track *t = track_of(vq);
    if (t) {
        if (t->head == t->tail || t->q[t->tail - 1] != elem)
            FAIL("queue %u: a chain put back that is not the newest popped\n", vq->index);
        if (--t->tail == t->head)
            t->head = t->tail = 0;
    }
    return __real_vu_vq_unpop(vq, elem);
}

int __wrap_vu_vq_push(struct vu_vq *vq, struct vu_elem *elem, uint32_t len)
{
    track_pushed(vq, elem, len);
    return __real_vu_vq_push(vq, elem, len);
}

int __wrap_vu_vq_push_burst(struct vu_vq *vq, struct vu_elem *const *elems, const uint32_t *lens,
                            int n)
{
    for (int i = 0; i < n; i++)
        track_pushed(vq, elems[i], lens ? lens[i] : 0);
    return __real_vu_vq_push_burst(vq, elems, lens, n);
}

/* The Python back-end's transmit(), called without the device lock: the
 * batch as vu_net_py_describe gives it to Python must add up, then it goes
 * back to the guest (or nowhere). */
static bool py_drops;
static uint64_t py_frames;

int vu_net_py_tx(void *ctx, uint32_t qp, struct vu_net_frame **frames, int n)
{
    (void)ctx;
    struct vu_net_pydesc desc[64];
    if (n <= 0 || n > 64 || qp != 0)
        FAIL("a Python batch of %d frames from queue pair %u\n", n, qp);
    vu_net_py_describe(frames, n, desc);
    for (int i = 0; i < n; i++) {
        uint64_t len = 0;
        for (uint32_t j = 0; j < frames[i]->niov; j++)
            len += frames[i]->iov[j].iov_len;
        if (len != frames[i]->len || desc[i].len != frames[i]->len ||
            desc[i].niov != frames[i]->niov || frames[i]->elem->vq != dev->vqs[1])
            FAIL("a Python frame of %u bytes in %u iovecs adding up to %llu\n",
                 frames[i]->len, frames[i]->niov, (unsigned long long)len);
    }
    py_frames += (uint64_t)n;
    if (!py_drops)
        vu_net_inject_frames(net, qp, frames, n);
    return 0;
}

static void setup(void)
{
    dev = vu_dev_new(2);
    net = vu_net_new(VU_NET_BACKEND_LOOPBACK);
    if (!dev || !net)
        abort();
    view = guest_init(dev->mem);
    verbose = getenv("RING_NET_VERBOSE") != NULL;
    /* the dirty log, as a front-end's SET_LOG_BASE would give it */
    int fd = memfd_create("fuzz-log", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, LOG_BYTES) < 0 || vu_dev_set_log(dev, fd, LOG_BYTES, 0))
        abort();
    close(fd);
    /* as NetDevice.queue_handler: transmit queues are only read */
    dev->vqs[1]->ignore_write = true;
}

/* Sets up and starts one ring; false if it was refused, which only a packed
 * base index outside the ring may cause (and must: see ring_blk). */
static bool start_ring(struct vu_vq *vq, uint32_t qsize, uint32_t base, uint32_t off,
                       bool packed, bool log)
{
    bool base_outside = packed && (base & 0x7fff) >= qsize;
    vu_vq_reset(vq);
    if (vu_vq_set_num(vq, qsize) || vu_vq_set_base(vq, base))
        abort();
    /* VHOST_VRING_F_LOG: used-ring writes logged at the log address, the
     * used ring's gpa (split) or the descriptor ring's (packed) */
    vu_vq_set_addr(vq, log ? 1 : 0, GUEST_UVA_BASE + off, GUEST_UVA_BASE + off + DEVICE_OFF,
                   GUEST_UVA_BASE + off + DRIVER_OFF, packed ? off : off + DEVICE_OFF);
    if (vu_vq_start(vq)) {
        if (base_outside)
            return false;
        FAIL("queue %u refused to start (size %u, base %#x)\n", vq->index, qsize, base);
    }
    if (base_outside)
        FAIL("packed base %#x started a ring of %u\n", base, qsize);
    return true;
}

static uint64_t sum(const uint64_t *v)
{
    uint64_t s = 0;
    for (int i = 0; i < VU_NET_D__COUNT; i++)
        s += v[i];
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!dev)
        setup();
    if (size < CFG_BYTES)
        return 0;
    uint8_t cfg = data[0], sizes = data[1], misc = data[6];
    uint32_t rx_size = 1u << (sizes & 7), tx_size = 1u << ((sizes >> 4) & 7);
    uint32_t rx_base = (uint32_t)data[2] | (uint32_t)data[3] << 8;
    uint32_t tx_base = (uint32_t)data[4] | (uint32_t)data[5] << 8;
    data += CFG_BYTES;
    size -= CFG_BYTES;

    memset(view, 0, GUEST_BYTES);
    memcpy(view, data, size < GUEST_BYTES ? size : GUEST_BYTES);

    bool packed = cfg & CFG_PACKED;
    uint64_t features = 1ULL << VIRTIO_NET_F_MAC | 1ULL << VIRTIO_NET_F_MTU |
                        1ULL << VIRTIO_NET_F_STATUS;
    if (packed)
        features |= 1ULL << VIRTIO_F_RING_PACKED;
    if (cfg & CFG_INDIRECT)
        features |= 1ULL << VIRTIO_RING_F_INDIRECT_DESC;
    if (cfg & CFG_EVENT_IDX)
        features |= 1ULL << VIRTIO_RING_F_EVENT_IDX;
    if (cfg & CFG_MRG_RXBUF)
        features |= 1ULL << VIRTIO_NET_F_MRG_RXBUF;
    if (cfg & CFG_VERSION_1)
        features |= 1ULL << VIRTIO_F_VERSION_1;
    if (cfg & CFG_IN_ORDER)
        features |= 1ULL << 35;     /* VIRTIO_F_IN_ORDER */
    bool log = misc & MISC_LOG;
    if (log)
        features |= 1ULL << 26;     /* VHOST_F_LOG_ALL */
    if (cfg & CFG_OFFLOADS)
        features |= 1ULL << VIRTIO_NET_F_CSUM | 1ULL << VIRTIO_NET_F_HOST_TSO4 |
                    1ULL << VIRTIO_NET_F_HOST_TSO6 | 1ULL << VIRTIO_NET_F_HOST_ECN;
    bool python = misc & MISC_PYTHON;
    py_drops = python && (cfg & CFG_SINK);
    py_frames = 0;
    net->backend = python ? VU_NET_BACKEND_PYTHON
                 : cfg & CFG_SINK ? VU_NET_BACKEND_SINK : VU_NET_BACKEND_LOOPBACK;
    vu_dev_set_features(dev, features);
    vu_net_set_features(net, features);
    net->mtu = mtus[misc & 3];
    memset(&net->stats[0], 0, sizeof(net->stats[0]));
    memset(trk, 0, sizeof(trk));

    struct vu_vq *rx = dev->vqs[0], *tx = dev->vqs[1];
    bool rx_started = start_ring(rx, rx_size, rx_base, RX_OFF, packed, log);
    if (!start_ring(tx, tx_size, tx_base, TX_OFF, packed, log))
        return 0;
    memset(dev->log, 0, LOG_BYTES);
    if (log)
        memcpy(before, view, GUEST_BYTES);
    rx->enabled = rx_started && !(misc & MISC_RX_DISABLED);
    tx->enabled = !(misc & MISC_TX_DISABLED);
    net->rxq[0] = rx;   /* as NetDevice.queue_handler, when the session attaches */

    /* As a worker runs them: each queue's turn with the device's read lock
     * held, the receive queue first (it comes first in the worker's list). */
    vu_dev_rdlock(dev);
    vu_net_handler(net, rx);
    for (int i = 0; i < 4; i++)
        if (vu_net_handler(net, tx) != VU_HANDLED_MORE)
            break;
    vu_dev_unlock(dev);

    for (int q = 0; q < 2; q++) {
        struct vu_vq *vq = dev->vqs[q];
        if (trk[q].head != trk[q].tail)
            FAIL("queue %d: %u chains left in flight (broken %d)\n", q,
                 trk[q].tail - trk[q].head, vq->broken);
        if (vq->inflight != 0)
            FAIL("queue %d: the ring counts %u in flight, the oracle none\n", q, vq->inflight);
    }
    for (size_t off = DATA_OFF; log && off < GUEST_BYTES; off += LOG_PAGE) {
        uint64_t page = guest_gpa(off) / LOG_PAGE;
        if (memcmp(view + off, before + off, LOG_PAGE) != 0 &&
            !(dev->log[page / 8] & (1u << (page % 8))))
            FAIL("guest page %#llx written but not logged dirty\n",
                 (unsigned long long)(page * LOG_PAGE));
    }
    const struct vu_net_stats *st = &net->stats[0];
    uint64_t tx_drops = sum(st->tx_dropped), rx_drops = sum(st->rx_dropped);
    if (verbose) {
        fprintf(stderr, "ring_net: tx %llu packets %llu bytes, rx %llu packets %llu bytes "
                "in %llu buffers (%llu written); drops tx/rx:",
                (unsigned long long)st->tx_packets, (unsigned long long)st->tx_bytes,
                (unsigned long long)st->rx_packets, (unsigned long long)st->rx_bytes,
                (unsigned long long)trk[0].pushed, (unsigned long long)trk[0].claimed);
        for (int i = 1; i < VU_NET_D__COUNT; i++)
            fprintf(stderr, " %llu/%llu", (unsigned long long)st->tx_dropped[i],
                    (unsigned long long)st->rx_dropped[i]);
        int dirty = 0;
        for (int i = 0; i < LOG_BYTES; i++)
            dirty += __builtin_popcount(dev->log[i]);
        fprintf(stderr, "; broken %d/%d; %d pages logged\n", rx->broken, tx->broken, dirty);
    }
    if (st->tx_packets + tx_drops != trk[1].pushed)
        FAIL("%llu transmit chains, %llu packets + %llu drops\n",
             (unsigned long long)trk[1].pushed, (unsigned long long)st->tx_packets,
             (unsigned long long)tx_drops);
    if (python && py_frames != st->tx_packets)
        FAIL("%llu frames given to Python, %llu packets counted\n",
             (unsigned long long)py_frames, (unsigned long long)st->tx_packets);
    if (net->backend == VU_NET_BACKEND_SINK || py_drops) {
        if (st->rx_packets || rx_drops || trk[0].pushed)
            FAIL("the sink received something\n");
    } else if (st->rx_packets + rx_drops != st->tx_packets) {
        FAIL("%llu looped back, %llu received + %llu dropped\n",
             (unsigned long long)st->tx_packets, (unsigned long long)st->rx_packets,
             (unsigned long long)rx_drops);
    }
    if (net->mrg_rxbuf ? trk[0].pushed < st->rx_packets : trk[0].pushed != st->rx_packets)
        FAIL("%llu receive buffers used for %llu packets\n",
             (unsigned long long)trk[0].pushed, (unsigned long long)st->rx_packets);
    if (trk[0].claimed < st->rx_bytes ||
        trk[0].claimed > st->rx_bytes + (uint64_t)net->hdr_len * st->rx_packets)
        FAIL("%llu bytes written to receive buffers for %llu packets of %llu bytes\n",
             (unsigned long long)trk[0].claimed, (unsigned long long)st->rx_packets,
             (unsigned long long)st->rx_bytes);
    return 0;
}
