/* virtio-net receive path: frames into the guest's receive buffers.
 *
 * A frame goes into as many buffers as it needs (mergeable receive buffers)
 * behind a virtio-net header. No buffers means drop and count, never a
 * wait: the sender (a TAP, another guest through the switch, a Python
 * back-end) must not stall on a slow guest. One frame at a time per queue
 * (rx_lock), since deliveries come from several threads. Entry points: one
 * frame (vu_net_rx_deliver, vu_net_inject), a batch under one lock, flush
 * and notification (vu_net_inject_frames/_iovs/_packed), and a switch
 * port's delivery (vu_net_port_deliver). */
#include "vu_net_internal.h"
#include "vu_dev.h"

#include <linux/virtio_net.h>

#define MAX_RX_BUFS 64          /* mergeable buffers one frame may take */

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
    uint32_t used0 = net_put_header(bufs[0], hdr, n->hdr_len);
    uint32_t off = 0;
    for (uint32_t i = 0; i < nbufs; i++) {
        uint32_t at = i == 0 ? used0 : 0;
        uint32_t c = net_scatter(bufs[i], at, src, len - off);
        off += c;
        vu_vq_push(vq, bufs[i], at + c);
    }
    return 0;
}

int vu_net_rx_deliver(struct vu_net_dev *n, uint32_t qp, const struct vu_net_hdr *in_hdr,
                      const uint8_t *data, uint32_t len)
{
    if (qp >= VU_NET_MAX_QP)
        return VU_NET_D_IO;
    struct vu_vq *vq = n->rxq[qp];
    if (!vu_vq_serving(vq))
        return net_rx_drop(n, qp, VU_NET_D_DISABLED);
    if (len > VU_NET_MAX_FRAME)
        return net_rx_drop(n, qp, VU_NET_D_TOO_LONG);
    struct vu_net_hdr hdr;
    if (in_hdr)
        hdr = *in_hdr;
    else
        memset(&hdr, 0, sizeof(hdr));
    struct iovec one = {(void *)data, len};
    struct src_cursor src = {&one, 1, 0, 0};
    pthread_mutex_lock(&n->rx_lock[qp]);
    int why = deliver_locked(n, vq, &hdr, &src, len);
    if (!why) {
        struct vu_net_stats *st = &n->stats[qp];
        st->rx_packets++;
        st->rx_gso += hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE;
        st->rx_csum_partial += !!(hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM);
        st->rx_bytes += len;
    }
    pthread_mutex_unlock(&n->rx_lock[qp]);
    if (why)
        return net_rx_drop(n, qp, why);
    return 0;
}

int vu_net_inject(struct vu_net_dev *n, uint32_t qp, const uint8_t *data, uint32_t len)
{
    if (qp >= VU_NET_MAX_QP || !n->rxq[qp])
        return net_rx_drop(n, qp < VU_NET_MAX_QP ? qp : 0, VU_NET_D_DISABLED);
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

/* The i-th frame of a batch to inject: its iovecs and length. Called for
 * i = 0, 1, ... in order, each once at most, so a source may keep a cursor
 * in arg. */
typedef void (*inject_src_fn)(void *arg, int i, struct src_cursor *src, uint32_t *len);

/* Many frames into receive queue qp: one device lock, one receive lock, one
 * flush and one notification for all. Frames without room are dropped and
 * counted; once the ring has no buffers left, so are the rest. */
static int inject_many(struct vu_net_dev *n, uint32_t qp, int count, inject_src_fn get,
                       void *arg)
{
    if (count <= 0)
        return 0;
    if (qp >= VU_NET_MAX_QP || !n->rxq[qp]) {
        net_rx_count(&n->stats[qp < VU_NET_MAX_QP ? qp : 0].rx_dropped[VU_NET_D_DISABLED],
                     (uint64_t)count);
        return 0;
    }
    struct vu_vq *vq = n->rxq[qp];
    struct vu_net_stats *st = &n->stats[qp];
    int delivered = 0;
    vu_dev_rdlock(vq->dev);
    pthread_mutex_lock(&n->rx_lock[qp]);
    if (!vu_vq_serving(vq)) {
        net_rx_count(&st->rx_dropped[VU_NET_D_DISABLED], (uint64_t)count);
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
                net_rx_count(&st->rx_dropped[why], (uint64_t)(count - i));
                break;
            }
            if (why) {
                net_rx_count(&st->rx_dropped[why], 1);
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

static void frame_src(void *arg, int i, struct src_cursor *src, uint32_t *len)
{
    const struct vu_net_frame *f = ((struct vu_net_frame *const *)arg)[i];
    *src = (struct src_cursor){f->iov, f->niov, 0, 0};
    *len = f->len;
}

int vu_net_inject_frames(struct vu_net_dev *n, uint32_t qp, struct vu_net_frame *const *frames,
                         int count)
{
    return inject_many(n, qp, count, frame_src, (void *)frames);
}

struct iov_batch {
    const struct iovec *next;   /* the next frame's first iovec */
    const uint32_t *niov;
};

static void iov_src(void *arg, int i, struct src_cursor *src, uint32_t *len)
{
    struct iov_batch *b = arg;
    const struct iovec *iov = b->next;
    b->next += b->niov[i];
    uint64_t total = 0;
    for (uint32_t j = 0; j < b->niov[i]; j++)
        total += iov[j].iov_len;
    *src = (struct src_cursor){iov, b->niov[i], 0, 0};
    /* longer than any frame: deliver_locked drops it as too long */
    *len = total > VU_NET_MAX_FRAME ? VU_NET_MAX_FRAME + 1 : (uint32_t)total;
}

struct packed_batch {
    const uint8_t *next;        /* the next frame's first byte */
    const uint32_t *lens;
    struct iovec one;           /* the cursor's iovec, one frame at a time */
};

static void packed_src(void *arg, int i, struct src_cursor *src, uint32_t *len)
{
    struct packed_batch *b = arg;
    b->one.iov_base = (void *)b->next;
    b->one.iov_len = b->lens[i];
    b->next += b->lens[i];
    *src = (struct src_cursor){&b->one, 1, 0, 0};
    *len = b->lens[i];
}

int vu_net_inject_packed(struct vu_net_dev *n, uint32_t qp, const uint8_t *buf,
                         const uint32_t *lens, int count)
{
    struct packed_batch b = {buf, lens, {NULL, 0}};
    return inject_many(n, qp, count, packed_src, &b);
}

int vu_net_inject_iovs(struct vu_net_dev *n, uint32_t qp, const struct iovec *iov,
                       const uint32_t *niov, int count)
{
    struct iov_batch b = {iov, niov};
    return inject_many(n, qp, count, iov_src, &b);
}

int vu_net_port_deliver(struct vu_net_dev *n, uint32_t qp, const uint8_t *data, uint32_t len)
{
    if (len > n->mtu + ETH_HLEN + VLAN_HLEN)
        return VU_NET_D_TOO_LONG;
    struct vu_vq *vq0 = n->rxq[0];
    if (!vq0)
        return VU_NET_D_DISABLED;
    /* all of a session's queues belong to one device */
    struct vu_dev *dev = vq0->dev;
    if (pthread_rwlock_tryrdlock(&dev->lock) != 0)
        return VU_NET_D_IO;
    struct vu_vq *vq = qp < VU_NET_MAX_QP ? n->rxq[qp] : NULL;
    if (!vq || !vq->enabled) {
        qp = 0;
        vq = n->rxq[0];
    }
    int rc = vq ? vu_net_rx_deliver(n, qp, NULL, data, len) : VU_NET_D_DISABLED;
    if (rc == 0) {
        vu_vq_flush(vq);
        vu_vq_notify(vq);
    }
    vu_dev_unlock(dev);
    return rc;
}
