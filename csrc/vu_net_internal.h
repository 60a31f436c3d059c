/* What the virtio-net files (vu_net*.c) share and nobody else needs: not
 * part of the cffi API. Helpers of the per-frame path that more than one
 * file uses are static inline here, so splitting the files costs no calls.
 * Internal names start with net_, the API's with vu_net_. */
#ifndef VU_NET_INTERNAL_H
#define VU_NET_INTERNAL_H

#include "vu_net.h"

#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#define NET_BATCH 64            /* chains per burst, transmit and loopback */
#define ETH_HLEN 14
#define VLAN_HLEN 4

/* Where the next byte of a frame being delivered comes from: iovecs (a
 * frame the guest transmitted, a Python buffer) or one contiguous buffer. */
struct src_cursor {
    const struct iovec *iov;
    uint32_t n, i;
    size_t off;
};

/* Copies up to len bytes from the cursor into e's writable buffers from
 * byte `at`; returns bytes copied. The source may be guest memory too (a
 * frame looped back, a transmit batch a Python back-end injects), which
 * the guest is free to lay over its own receive buffers: memmove, since
 * overlapping memcpy is undefined. */
static inline uint32_t net_scatter(struct vu_elem *e, uint32_t at, struct src_cursor *src,
                                   uint32_t len)
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
            memmove(dst, (const uint8_t *)s->iov_base + src->off, c);
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

static inline uint32_t net_scatter_flat(struct vu_elem *e, uint32_t at, const uint8_t *data,
                                        uint32_t len)
{
    struct iovec one = {(void *)data, len};
    struct src_cursor c = {&one, 1, 0, 0};
    return net_scatter(e, at, &c, len);
}

/* The virtio-net header at the start of e's writable buffers; returns bytes
 * written (hdr_len unless they are shorter). Where the first buffer holds
 * it, only bytes that differ are stored: a driver that reuses its buffers
 * finds the same header there, and a cache line nobody writes needn't move
 * between the CPUs (DPDK's vhost and virtio PMD do the same). */
static inline uint32_t net_put_header(struct vu_elem *e, const struct vu_net_hdr *hdr,
                                      uint32_t hdr_len)
{
    struct iovec *dst = &e->iov[e->out_num];
    if (VU_LIKELY(e->in_num && hdr_len == sizeof(*hdr) && dst->iov_len >= sizeof(*hdr))) {
        if (memcmp(dst->iov_base, hdr, sizeof(*hdr)) != 0)   /* fixed size: inlined */
            memcpy(dst->iov_base, hdr, sizeof(*hdr));
        return sizeof(*hdr);
    }
    return net_scatter_flat(e, 0, (const uint8_t *)hdr, hdr_len);
}

/* Adds to a receive drop counter. A receive queue gets frames from several
 * threads (the loop's inject(), a worker's TAP or loopback, the switch),
 * and drops are counted outside the queue's receive lock or under none: an
 * atomic add, so none is lost (relaxed: only the sums matter). The
 * delivered counts (rx_packets, rx_bytes, rx_gso, rx_csum_partial) are
 * plain adds under the receive lock, which every delivery holds. */
static inline void net_rx_count(uint64_t *counter, uint64_t n)
{
    if (n)
        __atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

/* Counts a frame the receive side dropped; returns why. */
static inline int net_rx_drop(struct vu_net_dev *n, uint32_t qp, int why)
{
    net_rx_count(&n->stats[qp].rx_dropped[why], 1);
    return why;
}

/* Queue pair qp's staging buffer (a whole frame and its header), made on
 * first use: NULL if there is no memory for it. */
static inline uint8_t *net_bounce(struct vu_net_dev *n, uint32_t qp)
{
    if (!n->bounce[qp])
        n->bounce[qp] = malloc(VU_NET_MAX_FRAME + sizeof(struct vu_net_hdr));
    return n->bounce[qp];
}

/* vu_net_check.c: header size and what the guest may send, from the
 * negotiated features. */
void net_check_features(struct vu_net_dev *n, uint64_t features);

/* vu_net_tx.c: transmit queue vq (of queue pair qp) drained into the
 * back-end; a VU_HANDLED_* value. */
int net_transmit(struct vu_net_dev *n, struct vu_vq *vq, uint32_t qp);

/* vu_net_tap.c */
/* The TAP's header size and offloads to match the negotiated features. */
void net_tap_set_offload(struct vu_net_dev *n, uint64_t features);
/* Receive queue vq's turn: the TAP of queue pair qp watched by the queue's
 * worker, and what it holds read into vq. A VU_HANDLED_* value. */
int net_tap_poll(struct vu_net_dev *n, uint32_t qp, struct vu_vq *vq);
/* A transmitted chain, virtio-net header and all, written to the TAP of
 * queue pair qp: 0 or VU_NET_D_IO. */
int net_tap_send(struct vu_net_dev *n, uint32_t qp, const struct vu_elem *e);

#endif
