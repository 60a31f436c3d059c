/* virtio-net device data path.
 *
 * Transmit: every chain's virtio-net header is checked (size, GSO type
 * against what was negotiated, checksum offsets inside the frame, length
 * against the MTU) before the frame goes anywhere; a bad frame is dropped
 * and counted, the queue goes on. Receive: frames are staged in a bounce
 * buffer and copied into as many guest buffers as they need (mergeable
 * receive buffers); no buffers means drop and count, never a stall of the
 * transmit side. */
#include "vu_net.h"
#include "vu_dev.h"
#include "vu_iov.h"
#include "vu_switch.h"
#include "vu_worker.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/if_tun.h>
#include <linux/virtio_config.h>
#include <linux/virtio_net.h>

#define NET_BATCH 64
#define NET_ROUNDS 16
#define ETH_HLEN 14
#define VLAN_HLEN 4
#define MAX_RX_BUFS 64          /* mergeable buffers one frame may take */

/* Defined by cffi (extern "Python+C"): n validated frames from queue pair qp. */
int vu_net_py_tx(void *ctx, uint32_t qp, struct vu_net_frame **frames, int n);

struct vu_net_dev *vu_net_new(int backend)
{
    struct vu_net_dev *n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->backend = backend;
    n->hdr_len = sizeof(struct vu_net_hdr);
    n->mtu = 1500;
    n->sw_port = -1;    /* not a switch port yet */
    for (int i = 0; i < VU_NET_MAX_QP; i++) {
        n->tap_fds[i] = -1;
        pthread_mutex_init(&n->rx_lock[i], NULL);
    }
    return n;
}

void vu_net_free(struct vu_net_dev *n)
{
    if (!n)
        return;
    for (int i = 0; i < VU_NET_MAX_QP; i++) {
        free(n->bounce[i]);
        for (uint32_t j = 0; j < n->frames_num[i]; j++)
            free(n->frames[i][j].iov);
        free(n->frames[i]);
        pthread_mutex_destroy(&n->rx_lock[i]);
    }
    free(n);
}

void vu_net_set_features(struct vu_net_dev *n, uint64_t f)
{
#define HAS(bit) (!!(f & (1ULL << (bit))))
    n->mrg_rxbuf = HAS(VIRTIO_NET_F_MRG_RXBUF);
    n->hdr_len = (HAS(VIRTIO_F_VERSION_1) || n->mrg_rxbuf) ? 12 : 10;
    n->host_csum = HAS(VIRTIO_NET_F_CSUM);
    n->host_tso4 = HAS(VIRTIO_NET_F_HOST_TSO4);
    n->host_tso6 = HAS(VIRTIO_NET_F_HOST_TSO6);
    n->host_ecn = HAS(VIRTIO_NET_F_HOST_ECN);
    n->host_ufo = HAS(VIRTIO_NET_F_HOST_UFO);
    if (n->backend == VU_NET_BACKEND_TAP) {
        /* The TAP hands us offloaded frames only as far as the guest takes them. */
        unsigned offload = 0;
        if (HAS(VIRTIO_NET_F_GUEST_CSUM)) {
            offload |= TUN_F_CSUM;
            if (HAS(VIRTIO_NET_F_GUEST_TSO4))
                offload |= TUN_F_TSO4;
            if (HAS(VIRTIO_NET_F_GUEST_TSO6))
                offload |= TUN_F_TSO6;
            if (HAS(VIRTIO_NET_F_GUEST_ECN))
                offload |= TUN_F_TSO_ECN;
        }
        int hdr = (int)n->hdr_len;
        for (int i = 0; i < VU_NET_MAX_QP; i++) {
            if (n->tap_fds[i] >= 0) {
                ioctl(n->tap_fds[i], TUNSETVNETHDRSZ, &hdr);
                ioctl(n->tap_fds[i], TUNSETOFFLOAD, offload);
            }
        }
    }
#undef HAS
}

int vu_net_check_tx(struct vu_net_dev *n, struct vu_elem *e, struct vu_net_hdr *hdr)
{
    memset(hdr, 0, sizeof(*hdr));
    if (e->out_len < n->hdr_len)
        return VU_NET_D_SHORT;
    if (VU_LIKELY(n->hdr_len == sizeof(*hdr) && e->iov[0].iov_len >= sizeof(*hdr)))
        memcpy(hdr, e->iov[0].iov_base, sizeof(*hdr));    /* fixed size: inlined */
    else if (!vu_iov_gather(e->iov, e->out_num, 0, hdr, n->hdr_len))
        return VU_NET_D_SHORT;
    uint64_t frame = e->out_len - n->hdr_len;
    if (frame < ETH_HLEN)
        return VU_NET_D_SHORT;
    uint8_t gso = hdr->gso_type & ~VIRTIO_NET_HDR_GSO_ECN;
    if ((hdr->gso_type & VIRTIO_NET_HDR_GSO_ECN) && !n->host_ecn)
        return VU_NET_D_BAD_GSO;
    switch (gso) {
    case VIRTIO_NET_HDR_GSO_NONE:
        if (frame > (uint64_t)n->mtu + ETH_HLEN + VLAN_HLEN)
            return VU_NET_D_TOO_LONG;
        break;
    case VIRTIO_NET_HDR_GSO_TCPV4:
        if (!n->host_tso4)
            return VU_NET_D_BAD_GSO;
        break;
    case VIRTIO_NET_HDR_GSO_TCPV6:
        if (!n->host_tso6)
            return VU_NET_D_BAD_GSO;
        break;
    case VIRTIO_NET_HDR_GSO_UDP:
        if (!n->host_ufo)
            return VU_NET_D_BAD_GSO;
        break;
    default:
        return VU_NET_D_BAD_GSO;
    }
    if (gso != VIRTIO_NET_HDR_GSO_NONE) {
        /* a GSO frame needs the checksum offload and a segment size */
        if (frame > VU_NET_MAX_FRAME || hdr->gso_size == 0 ||
            !(hdr->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM))
            return VU_NET_D_BAD_GSO;
    }
    if (hdr->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        if (!n->host_csum)
            return VU_NET_D_BAD_CSUM;
        if ((uint32_t)hdr->csum_start + hdr->csum_offset + 2 > frame)
            return VU_NET_D_BAD_CSUM;
    }
    return 0;
}

/* Receive ----------------------------------------------------------------- */

/* Where the next byte of a frame being delivered comes from: iovecs (a
 * frame the guest transmitted, a Python buffer) or one contiguous buffer. */
struct src_cursor {
    const struct iovec *iov;
    uint32_t n, i;
    size_t off;
};

/* Copies up to len bytes from the cursor into e's writable buffers from
 * byte `at`; returns bytes copied. */
static uint32_t scatter(struct vu_elem *e, uint32_t at, struct src_cursor *src, uint32_t len)
{
    struct iovec *iov = e->iov + e->out_num;
    uint32_t done = 0;
    for (uint32_t i = 0; i < e->in_num && done < len; i++) {
        if (at >= iov[i].iov_len) {
            at -= (uint32_t)iov[i].iov_len;
            continue;
        }
        uint8_t *dst = (uint8_t *)iov[i].iov_base + at;
        uint32_t room = (uint32_t)iov[i].iov_len - at;
        at = 0;
        while (room && done < len && src->i < src->n) {
            const struct iovec *s = &src->iov[src->i];
            size_t avail = s->iov_len - src->off;
            uint32_t c = room;
            if (c > len - done)
                c = len - done;
            if (c > avail)
                c = (uint32_t)avail;
            memcpy(dst, (const uint8_t *)s->iov_base + src->off, c);
            dst += c;
            room -= c;
            done += c;
            src->off += c;
            if (src->off == s->iov_len) {
                src->i++;
                src->off = 0;
            }
        }
    }
    return done;
}

static uint32_t scatter_flat(struct vu_elem *e, uint32_t at, const uint8_t *data, uint32_t len)
{
    struct iovec one = {(void *)data, len};
    struct src_cursor c = {&one, 1, 0, 0};
    return scatter(e, at, &c, len);
}

/* The virtio-net header at the start of e's writable buffers; returns bytes
 * written (hdr_len unless they are shorter). Where the first buffer holds
 * it, only bytes that differ are stored: a driver that reuses its buffers
 * finds the same header there, and a cache line nobody writes needn't move
 * between the CPUs (DPDK's vhost and virtio PMD do the same). */
static uint32_t put_header(struct vu_elem *e, const struct vu_net_hdr *hdr, uint32_t hdr_len)
{
    struct iovec *dst = &e->iov[e->out_num];
    if (VU_LIKELY(e->in_num && hdr_len == sizeof(*hdr) && dst->iov_len >= sizeof(*hdr))) {
        if (memcmp(dst->iov_base, hdr, sizeof(*hdr)) != 0)   /* fixed size: inlined */
            memcpy(dst->iov_base, hdr, sizeof(*hdr));
        return sizeof(*hdr);
    }
    return scatter_flat(e, 0, (const uint8_t *)hdr, hdr_len);
}

static int rx_drop(struct vu_net_dev *n, uint32_t qp, int why)
{
    n->stats[qp].rx_dropped[why]++;
    return why;
}

/* One frame of `len` bytes from src into vq's buffers, behind `hdr`
 * (num_buffers is filled in). The caller holds rx_lock and checked that
 * the queue may be used. Returns 0, or the vu_net_drop reason (not
 * counted: the caller does). */
static int deliver_locked(struct vu_net_dev *n, struct vu_vq *vq, struct vu_net_hdr *hdr,
                          struct src_cursor *src, uint32_t len)
{
    if (len > VU_NET_MAX_FRAME)
        return VU_NET_D_TOO_LONG;
    uint32_t need = n->hdr_len + len;
    struct vu_elem *bufs[MAX_RX_BUFS];
    uint32_t nbufs = 0, room = 0;
    int why = 0;
    while (room < need) {
        if (nbufs == (n->mrg_rxbuf ? MAX_RX_BUFS : 1)) {
            why = VU_NET_D_TOO_LONG;
            break;
        }
        struct vu_elem *e;
        if (vu_vq_pop(vq, &e) != 1) {
            why = VU_NET_D_NO_BUFFERS;
            break;
        }
        bufs[nbufs++] = e;
        room += (uint32_t)e->in_len;
        if (!n->mrg_rxbuf && room < need) {
            why = VU_NET_D_TOO_LONG;   /* one buffer per frame and it is too small */
            break;
        }
    }
    if (why || nbufs == 0) {
        /* Give the buffers back, newest first, for a frame that fits. */
        while (nbufs)
            vu_vq_unpop(vq, bufs[--nbufs]);
        return why ? why : VU_NET_D_NO_BUFFERS;
    }
    hdr->num_buffers = (uint16_t)nbufs;
    /* header into the first buffer, then the frame across all of them */
    uint32_t used0 = put_header(bufs[0], hdr, n->hdr_len);
    uint32_t off = 0;
    for (uint32_t i = 0; i < nbufs; i++) {
        uint32_t at = i == 0 ? used0 : 0;
        uint32_t c = scatter(bufs[i], at, src, len - off);
        off += c;
        vu_vq_push(vq, bufs[i], at + c);
    }
    return 0;
}

static bool rx_usable(struct vu_vq *vq)
{
    return vq && vq->started && vq->enabled && !vq->broken;
}

int vu_net_rx_deliver(struct vu_net_dev *n, uint32_t qp, const struct vu_net_hdr *in_hdr,
                      const uint8_t *data, uint32_t len)
{
    if (qp >= VU_NET_MAX_QP)
        return VU_NET_D_IO;
    struct vu_vq *vq = n->rxq[qp];
    if (!rx_usable(vq))
        return rx_drop(n, qp, VU_NET_D_DISABLED);
    if (len > VU_NET_MAX_FRAME)
        return rx_drop(n, qp, VU_NET_D_TOO_LONG);
    struct vu_net_hdr hdr;
    if (in_hdr)
        hdr = *in_hdr;
    else
        memset(&hdr, 0, sizeof(hdr));
    struct iovec one = {(void *)data, len};
    struct src_cursor src = {&one, 1, 0, 0};
    pthread_mutex_lock(&n->rx_lock[qp]);
    int why = deliver_locked(n, vq, &hdr, &src, len);
    pthread_mutex_unlock(&n->rx_lock[qp]);
    if (why)
        return rx_drop(n, qp, why);
    n->stats[qp].rx_packets++;
    n->stats[qp].rx_gso += hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE;
    n->stats[qp].rx_csum_partial += !!(hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM);
    n->stats[qp].rx_bytes += len;
    return 0;
}

int vu_net_inject(struct vu_net_dev *n, uint32_t qp, const uint8_t *data, uint32_t len)
{
    if (qp >= VU_NET_MAX_QP || !n->rxq[qp])
        return rx_drop(n, qp < VU_NET_MAX_QP ? qp : 0, VU_NET_D_DISABLED);
    struct vu_vq *vq = n->rxq[qp];
    vu_dev_rdlock(vq->dev);
    int rc = vu_net_rx_deliver(n, qp, NULL, data, len);
    if (rc == 0) {
        vu_vq_flush(vq);
        vu_vq_notify(vq);
    }
    vu_dev_unlock(vq->dev);
    return rc;
}

/* The i-th frame of a batch to inject: its iovecs and length. */
typedef void (*inject_src_fn)(const void *arg, int i, struct src_cursor *src, uint32_t *len);

/* Many frames into receive queue qp: one device lock, one receive lock, one
 * flush and one notification for all. Frames without room are dropped and
 * counted; once the ring has no buffers left, so are the rest. */
static int inject_many(struct vu_net_dev *n, uint32_t qp, int count, inject_src_fn get,
                       const void *arg)
{
    if (count <= 0)
        return 0;
    if (qp >= VU_NET_MAX_QP || !n->rxq[qp]) {
        n->stats[qp < VU_NET_MAX_QP ? qp : 0].rx_dropped[VU_NET_D_DISABLED] += (uint64_t)count;
        return 0;
    }
    struct vu_vq *vq = n->rxq[qp];
    struct vu_net_stats *st = &n->stats[qp];
    int delivered = 0;
    vu_dev_rdlock(vq->dev);
    pthread_mutex_lock(&n->rx_lock[qp]);
    if (!rx_usable(vq)) {
        st->rx_dropped[VU_NET_D_DISABLED] += (uint64_t)count;
    } else {
        uint64_t bytes = 0;
        for (int i = 0; i < count; i++) {
            struct src_cursor src;
            uint32_t len;
            get(arg, i, &src, &len);
            struct vu_net_hdr hdr;
            memset(&hdr, 0, sizeof(hdr));
            int why = deliver_locked(n, vq, &hdr, &src, len);
            if (why == VU_NET_D_NO_BUFFERS) {
                st->rx_dropped[why] += (uint64_t)(count - i);
                break;
            }
            if (why) {
                st->rx_dropped[why]++;
                continue;
            }
            delivered++;
            bytes += len;
        }
        st->rx_packets += (uint64_t)delivered;
        st->rx_bytes += bytes;
    }
    pthread_mutex_unlock(&n->rx_lock[qp]);
    if (delivered) {
        vu_vq_flush(vq);
        vu_vq_notify(vq);
    }
    vu_dev_unlock(vq->dev);
    return delivered;
}

static void frame_src(const void *arg, int i, struct src_cursor *src, uint32_t *len)
{
    const struct vu_net_frame *f = ((struct vu_net_frame *const *)arg)[i];
    *src = (struct src_cursor){f->iov, f->niov, 0, 0};
    *len = f->len;
}

void vu_net_py_describe(struct vu_net_frame *const *frames, int count, struct vu_net_pydesc *out)
{
    for (int i = 0; i < count; i++) {
        const struct vu_net_frame *f = frames[i];
        out[i] = (struct vu_net_pydesc){
            .len = f->len, .niov = f->niov,
            .base0 = f->niov ? (uint64_t)(uintptr_t)f->iov[0].iov_base : 0,
            .len0 = f->niov ? (uint64_t)f->iov[0].iov_len : 0,
        };
    }
}

int vu_net_inject_frames(struct vu_net_dev *n, uint32_t qp, struct vu_net_frame *const *frames,
                         int count)
{
    return inject_many(n, qp, count, frame_src, frames);
}

struct iov_batch {
    const struct iovec *iov;
    const uint32_t *first, *niov;
};

static void iov_src(const void *arg, int i, struct src_cursor *src, uint32_t *len)
{
    const struct iov_batch *b = arg;
    const struct iovec *iov = b->iov + b->first[i];
    uint64_t total = 0;
    for (uint32_t j = 0; j < b->niov[i]; j++)
        total += iov[j].iov_len;
    *src = (struct src_cursor){iov, b->niov[i], 0, 0};
    /* longer than any frame: deliver_locked drops it as too long */
    *len = total > VU_NET_MAX_FRAME ? VU_NET_MAX_FRAME + 1 : (uint32_t)total;
}

struct packed_batch {
    const uint8_t *buf;
    const uint32_t *lens;
    const uint64_t *at;
    struct iovec *one;      /* a cursor's iovec per call */
};

static void packed_src(const void *arg, int i, struct src_cursor *src, uint32_t *len)
{
    const struct packed_batch *b = arg;
    b->one->iov_base = (void *)(b->buf + b->at[i]);
    b->one->iov_len = b->lens[i];
    *src = (struct src_cursor){b->one, 1, 0, 0};
    *len = b->lens[i];
}

int vu_net_inject_packed(struct vu_net_dev *n, uint32_t qp, const uint8_t *buf,
                         const uint32_t *lens, int count)
{
    if (count <= 0)
        return 0;
    uint64_t stack_at[64];
    uint64_t *at = count <= 64 ? stack_at : malloc((size_t)count * sizeof(uint64_t));
    if (!at)
        return -VU_NET_D_IO;
    uint64_t off = 0;
    for (int i = 0; i < count; i++) {
        at[i] = off;
        off += lens[i];
    }
    struct iovec one;
    struct packed_batch b = {buf, lens, at, &one};
    int rc = inject_many(n, qp, count, packed_src, &b);
    if (at != stack_at)
        free(at);
    return rc;
}

int vu_net_inject_iovs(struct vu_net_dev *n, uint32_t qp, const struct iovec *iov,
                       const uint32_t *niov, int count)
{
    if (count <= 0)
        return 0;
    uint32_t stack_first[64];
    uint32_t *first = count <= 64 ? stack_first : malloc((size_t)count * sizeof(uint32_t));
    if (!first)
        return -VU_NET_D_IO;
    uint32_t at = 0;
    for (int i = 0; i < count; i++) {
        first[i] = at;
        at += niov[i];
    }
    struct iov_batch b = {iov, first, niov};
    int rc = inject_many(n, qp, count, iov_src, &b);
    if (first != stack_first)
        free(first);
    return rc;
}

/* Reads frames from the TAP into receive queue qp until it is empty. */
static int tap_receive(struct vu_net_dev *n, uint32_t qp, struct vu_vq *vq)
{
    int fd = n->tap_fds[qp];
    if (fd < 0)
        return VU_HANDLED_NONE;
    if (!n->bounce[qp]) {
        n->bounce[qp] = malloc(VU_NET_MAX_FRAME + sizeof(struct vu_net_hdr));
        if (!n->bounce[qp])
            return VU_HANDLED_NONE;
    }
    uint8_t *buf = n->bounce[qp];
    int got = 0;
    for (int i = 0; i < NET_BATCH * 4; i++) {
        ssize_t r = read(fd, buf, VU_NET_MAX_FRAME + n->hdr_len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            break;     /* EAGAIN: drained */
        }
        if ((size_t)r < n->hdr_len + ETH_HLEN) {
            rx_drop(n, qp, VU_NET_D_SHORT);
            continue;
        }
        struct vu_net_hdr hdr;
        memset(&hdr, 0, sizeof(hdr));
        memcpy(&hdr, buf, n->hdr_len);
        vu_net_rx_deliver(n, qp, &hdr, buf + n->hdr_len, (uint32_t)(r - n->hdr_len));
        got++;
    }
    if (got) {
        vu_vq_flush(vq);
        vu_vq_notify(vq);
    }
    return got ? VU_HANDLED_SOME : VU_HANDLED_NONE;
}

/* Transmit ---------------------------------------------------------------------- */

static struct vu_net_frame *qp_frames(struct vu_net_dev *n, uint32_t qp, uint32_t size)
{
    if (n->frames_num[qp] < size) {
        for (uint32_t j = 0; j < n->frames_num[qp]; j++)
            free(n->frames[qp][j].iov);
        free(n->frames[qp]);
        n->frames[qp] = calloc(size, sizeof(struct vu_net_frame));
        n->frames_num[qp] = n->frames[qp] ? size : 0;
    }
    return n->frames[qp];
}

/* frame->iov = e's readable bytes after the header. */
static int frame_iov(struct vu_net_frame *f, struct vu_elem *e, uint32_t skip)
{
    if (f->iov_cap < e->out_num) {
        struct iovec *p = realloc(f->iov, e->out_num * sizeof(*p));
        if (!p)
            return -1;
        f->iov = p;
        f->iov_cap = e->out_num;
    }
    f->niov = vu_iov_slice(f->iov, e->iov, e->out_num, skip, e->out_len - skip);
    return 0;
}

/* LOOPBACK: the frame back into receive queue qp (pushed, not yet flushed).
 * A frame in one buffer goes straight from guest memory; others are gathered
 * in the queue pair's staging buffer first. */
static void loop_back(struct vu_net_dev *n, uint32_t qp, struct vu_elem *e, uint32_t len)
{
    const uint8_t *data;
    if (e->out_num == 1) {
        data = (const uint8_t *)e->iov[0].iov_base + n->hdr_len;
    } else {
        if (!n->bounce[qp] && !(n->bounce[qp] = malloc(VU_NET_MAX_FRAME + sizeof(struct vu_net_hdr)))) {
            rx_drop(n, qp, VU_NET_D_IO);
            return;
        }
        if (!vu_iov_gather(e->iov, e->out_num, n->hdr_len, n->bounce[qp], len)) {
            rx_drop(n, qp, VU_NET_D_SHORT);
            return;
        }
        data = n->bounce[qp];
    }
    /* A drop on the way back (no receive buffers) is the receive side's and
     * counted there; the transmit itself succeeded. */
    vu_net_rx_deliver(n, qp, NULL, data, len);
}

/* LOOPBACK: receive buffers for a transmit burst, taken before the burst is
 * looked at. The driver's CPU wrote their lines last, so fetching them for
 * writing takes a while: started now, it overlaps the transmit checks
 * instead of stalling the copies. Holds the receive lock when rx is usable;
 * loop_back_burst gives it back. */
struct loop_bufs {
    struct vu_elem *bufs[NET_BATCH];
    int got;
    bool locked;
};

static void loop_take_bufs(struct vu_net_dev *n, uint32_t qp, struct loop_bufs *lb, int want)
{
    struct vu_vq *rx = n->rxq[qp];
    lb->got = 0;
    lb->locked = false;
    if (!rx || !rx->started || !rx->enabled || rx->broken)
        return;
    pthread_mutex_lock(&n->rx_lock[qp]);
    lb->locked = true;
    int got = vu_vq_pop_burst(rx, lb->bufs, want);
    lb->got = got > 0 ? got : 0;
    for (int j = 0; j < lb->got; j++) {
        struct vu_elem *b = lb->bufs[j];
        if (b->in_num) {
            /* the header's line to read (often left as it is), the frame's
             * first to write */
            const uint8_t *p = b->iov[b->out_num].iov_base;
            vu_prefetch(p, 1, 0);
            if (b->iov[b->out_num].iov_len > n->hdr_len)
                vu_prefetch(p + n->hdr_len, 1, 1);
        }
    }
}

/* LOOPBACK for a burst of transmitted frames into the buffers taken by
 * loop_take_bufs: one lock for them and one to publish them. Frames that fit
 * one receive buffer go here; from the first that doesn't (mergeable buffers
 * needed, too long, no buffers) the rest take loop_back, which handles and
 * counts all that. */
static void loop_back_burst(struct vu_net_dev *n, uint32_t qp, struct vu_elem **tx,
                            const uint32_t *lens, int cnt, struct loop_bufs *lb)
{
    struct vu_vq *rx = n->rxq[qp];
    int done = 0;
    if (lb->locked) {
        struct vu_elem **bufs = lb->bufs;
        uint32_t used[NET_BATCH];
        uint64_t bytes = 0;
        int usable = lb->got < cnt ? lb->got : cnt;
        for (; done < usable; done++) {
            struct vu_elem *t = tx[done], *b = bufs[done];
            uint32_t len = lens[done], need = n->hdr_len + len;
            if (len > VU_NET_MAX_FRAME || b->in_len < need || t->out_num != 1)
                break;
            struct vu_net_hdr hdr = {.num_buffers = 1};
            const uint8_t *frame = (const uint8_t *)t->iov[0].iov_base + n->hdr_len;
            struct iovec *dst = &b->iov[b->out_num];
            put_header(b, &hdr, n->hdr_len);
            if (VU_LIKELY(dst->iov_len >= need))     /* all in the first buffer */
                memcpy((uint8_t *)dst->iov_base + n->hdr_len, frame, len);
            else
                scatter_flat(b, n->hdr_len, frame, len);
            used[done] = need;
            bytes += len;
        }
        for (int j = lb->got - 1; j >= done; j--)   /* newest first */
            vu_vq_unpop(rx, bufs[j]);
        vu_vq_push_burst(rx, bufs, used, done);
        pthread_mutex_unlock(&n->rx_lock[qp]);
        lb->locked = false;
        n->stats[qp].rx_packets += (uint64_t)done;
        n->stats[qp].rx_bytes += bytes;
    }
    for (int j = done; j < cnt; j++)
        loop_back(n, qp, tx[j], lens[j]);
}

static int transmit(struct vu_net_dev *n, struct vu_vq *vq, uint32_t qp)
{
    struct vu_net_stats *st = &n->stats[qp];
    struct vu_net_frame *frames = n->backend == VU_NET_BACKEND_PYTHON ? qp_frames(n, qp, vq->size) : NULL;
    struct vu_net_frame *batch[NET_BATCH];
    bool did = false;
    for (int round = 0; round < NET_ROUNDS; round++) {
        vu_vq_set_notification(vq, false);
        int nbatch = 0, looped = 0, ndone = 0;
        /* One lock to take the burst and one to give it back. */
        struct vu_elem *elems[NET_BATCH], *done[NET_BATCH], *loop[NET_BATCH];
        uint32_t loop_len[NET_BATCH];
        int rc = vu_vq_pop_burst(vq, elems, NET_BATCH);
        int cnt = rc > 0 ? rc : 0;
        struct loop_bufs lb = {.got = 0, .locked = false};
        if (cnt && n->backend == VU_NET_BACKEND_LOOPBACK)
            loop_take_bufs(n, qp, &lb, cnt);
        /* header and the frame's start, for the checks and the copy */
        for (int i = 0; i < cnt; i++)
            if (elems[i]->out_num)
                vu_prefetch(elems[i]->iov[0].iov_base, 2, 0);
        for (int i = 0; i < cnt; i++) {
            struct vu_elem *e = elems[i];
            struct vu_net_hdr hdr;
            int why = vq->enabled ? vu_net_check_tx(n, e, &hdr) : VU_NET_D_DISABLED;
            if (!why) {
                uint32_t len = (uint32_t)(e->out_len - n->hdr_len);
                if (n->backend == VU_NET_BACKEND_TAP) {
                    /* header and frame as the guest laid them out: the TAP
                     * takes the same virtio-net header (IFF_VNET_HDR) */
                    if (n->tap_fds[qp] < 0 || writev(n->tap_fds[qp], e->iov, (int)e->out_num) < 0)
                        why = VU_NET_D_IO;
                } else if (n->backend == VU_NET_BACKEND_SINK) {
                    /* counted below, and that is all */
                } else if (n->backend == VU_NET_BACKEND_LOOPBACK) {
                    /* copied below, before the burst goes back to the driver */
                    loop[looped] = e;
                    loop_len[looped++] = len;
                } else if (n->backend == VU_NET_BACKEND_SWITCH) {
                    /* the switch learns, forwards or floods it */
                    why = vu_switch_tx(n, e->iov, e->out_num, n->hdr_len, len);
                } else if (frames && frame_iov(&frames[e->slot], e, n->hdr_len) == 0) {
                    struct vu_net_frame *f = &frames[e->slot];
                    f->elem = e;
                    f->hdr = hdr;
                    f->len = len;
                    batch[nbatch++] = f;
                    /* Pushed after the Python batch, in ring order with the
                     * rest (IN_ORDER): counted there. */
                    done[ndone++] = e;
                    continue;
                } else {
                    why = VU_NET_D_IO;
                }
                if (!why) {
                    st->tx_packets++;
                    st->tx_bytes += len;
                    st->tx_gso += hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE;
                    st->tx_csum_partial += !!(hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM);
                }
            }
            if (why)
                st->tx_dropped[why]++;
            done[ndone++] = e;
        }
        if (looped || lb.locked)
            loop_back_burst(n, qp, loop, loop_len, looped, &lb);
        if (nbatch) {
            vu_net_py_tx(n->py_ctx, qp, batch, nbatch);
            for (int i = 0; i < nbatch; i++) {
                st->tx_packets++;
                st->tx_bytes += batch[i]->len;
            }
        }
        vu_vq_push_burst(vq, done, NULL, ndone);
        if (cnt) {
            did = true;
            vu_vq_flush(vq);
            vu_vq_notify(vq);
        }
        /* The looped-back frames reach the driver once per batch too. */
        if (looped && n->rxq[qp]) {
            vu_vq_flush(n->rxq[qp]);
            vu_vq_notify(n->rxq[qp]);
        }
        if (rc < 0)
            return VU_HANDLED_SOME;
        if (cnt == NET_BATCH)
            continue;
        if (!vu_vq_set_notification(vq, true))
            return did ? VU_HANDLED_SOME : VU_HANDLED_NONE;
    }
    return VU_HANDLED_MORE;
}

int vu_net_handler(void *ctx, struct vu_vq *vq)
{
    struct vu_net_dev *n = ctx;
    uint32_t qp = vq->index / 2;
    if (qp >= VU_NET_MAX_QP)
        return VU_HANDLED_NONE;
    if (vq->index % 2 == 0) {
        /* Receive queue: remember it for deliveries; pull from the TAP. */
        n->rxq[qp] = vq;
        if (n->backend == VU_NET_BACKEND_TAP && n->tap_fds[qp] >= 0 &&
            n->tap_worker[qp] != vq->worker && vq->worker) {
            if (vu_worker_add_event_fd(vq->worker, vq, n->tap_fds[qp]) == 0)
                n->tap_worker[qp] = vq->worker;
        }
        if (n->backend == VU_NET_BACKEND_TAP)
            return tap_receive(n, qp, vq);
        /* Deliveries from other threads pop buffers when they have a
         * frame; nothing waits for new ones, so the driver need not kick
         * (each kick would wake this worker for nothing). */
        vu_vq_set_notification(vq, false);
        return VU_HANDLED_NONE;
    }
    /* Transmit queue: a disabled one still drains and drops what it is given. */
    if (vq->broken)
        return VU_HANDLED_NONE;
    return transmit(n, vq, qp);
}
