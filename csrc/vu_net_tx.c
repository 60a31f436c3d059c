/* virtio-net transmit path: chains the guest sent, checked and handed to
 * the device's back-end in bursts.
 *
 * A bad frame is dropped and counted and the queue goes on. Back-ends:
 * TAP (written as the guest laid it out, vu_net_tap.c), sink (counted),
 * loopback (copied straight into the same queue pair's receive buffers,
 * taken before the burst is looked at), a switch port (port->tx, see
 * vu_net.h) and Python (one call per burst with the frames described in
 * place, valid during that call). Chains go back to the driver in ring
 * order, one flush and notification per burst. */
#include "vu_net_internal.h"
#include "vu_dev.h"
#include "vu_iov.h"

#include <linux/virtio_net.h>

#define NET_ROUNDS 16           /* bursts per turn before other queues get theirs */

/* Defined by cffi (extern "Python+C"): n validated frames from queue pair qp. */
int vu_net_py_tx(void *ctx, uint32_t qp, struct vu_net_frame **frames, int n);

/* Python hand-off ------------------------------------------------------------------ */

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

/* Loopback ---------------------------------------------------------------------- */

/* LOOPBACK: the frame back into receive queue qp (pushed, not yet flushed).
 * A frame in one buffer goes straight from guest memory; others are gathered
 * in the queue pair's staging buffer first. */
static void loop_back(struct vu_net_dev *n, uint32_t qp, struct vu_elem *e, uint32_t len)
{
    const uint8_t *data;
    if (e->out_num == 1) {
        data = (const uint8_t *)e->iov[0].iov_base + n->hdr_len;
    } else {
        uint8_t *stage = net_bounce(n, qp);
        if (!stage) {
            net_rx_drop(n, qp, VU_NET_D_IO);
            return;
        }
        if (!vu_iov_gather(e->iov, e->out_num, n->hdr_len, stage, len)) {
            net_rx_drop(n, qp, VU_NET_D_SHORT);
            return;
        }
        data = stage;
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
    if (!vu_vq_serving(rx))
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
            net_put_header(b, &hdr, n->hdr_len);
            /* guest memory to guest memory, which may overlap (net_scatter) */
            if (VU_LIKELY(dst->iov_len >= need))     /* all in the first buffer */
                memmove((uint8_t *)dst->iov_base + n->hdr_len, frame, len);
            else
                net_scatter_flat(b, n->hdr_len, frame, len);
            used[done] = need;
            bytes += len;
        }
        for (int j = lb->got - 1; j >= done; j--)   /* newest first */
            vu_vq_unpop(rx, bufs[j]);
        vu_vq_push_burst(rx, bufs, used, done);
        n->stats[qp].rx_packets += (uint64_t)done;
        n->stats[qp].rx_bytes += bytes;
        pthread_mutex_unlock(&n->rx_lock[qp]);
        lb->locked = false;
    }
    for (int j = done; j < cnt; j++)
        loop_back(n, qp, tx[j], lens[j]);
}

/* The burst loop -------------------------------------------------------------------- */

int net_transmit(struct vu_net_dev *n, struct vu_vq *vq, uint32_t qp)
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
                    why = net_tap_send(n, qp, e);     /* header and all */
                } else if (n->backend == VU_NET_BACKEND_SINK) {
                    /* counted below, and that is all */
                } else if (n->backend == VU_NET_BACKEND_LOOPBACK) {
                    /* copied below, before the burst goes back to the driver */
                    loop[looped] = e;
                    loop_len[looped++] = len;
                } else if (n->backend == VU_NET_BACKEND_SWITCH) {
                    /* the port's owner (a switch) learns, forwards or
                     * floods it; unbound: nowhere to go */
                    struct vu_net_port *port = __atomic_load_n(&n->port, __ATOMIC_ACQUIRE);
                    why = port ? port->tx(port, n, e->iov, e->out_num, n->hdr_len, len)
                               : VU_NET_D_IO;
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
        bool stopped = false;
        if (nbatch) {
            /* Without the device lock, as the blk Python batch: a transmit
             * method that blocks must not block the control plane's ring
             * and memory changes too. The frames' elements hold their guest
             * memory meanwhile; their push below goes through the ring's
             * own lock, which publishes, holds or drops them as the ring
             * is by then. (inject() takes the lock itself.) */
            vu_dev_unlock(vq->dev);
            vu_net_py_tx(n->py_ctx, qp, batch, nbatch);
            vu_dev_rdlock(vq->dev);
            for (int i = 0; i < nbatch; i++) {
                st->tx_packets++;
                st->tx_bytes += batch[i]->len;
            }
            stopped = !vu_vq_serving(vq);
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
        if (rc < 0 || stopped)
            return VU_HANDLED_SOME;   /* stopped: nothing more is taken from it */
        if (cnt == NET_BATCH)
            continue;
        if (!vu_vq_set_notification(vq, true))
            return did ? VU_HANDLED_SOME : VU_HANDLED_NONE;
    }
    return VU_HANDLED_MORE;
}
