/* virtio-net device: its lifecycle, feature negotiation, binding to a
 * switch port, and the queue handler that dispatches each queue's turn to
 * the receive or transmit path (even queues receive, odd ones transmit).
 * The paths themselves live in vu_net_rx.c, vu_net_tx.c and vu_net_tap.c,
 * the header rules in vu_net_check.c. */
#include "vu_net_internal.h"

struct vu_net_dev *vu_net_new(int backend)
{
    struct vu_net_dev *n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->backend = backend;
    n->hdr_len = sizeof(struct vu_net_hdr);
    n->mtu = 1500;
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
    net_check_features(n, f);
    if (n->backend == VU_NET_BACKEND_TAP)
        net_tap_set_offload(n, f);
}

/* Switch port ----------------------------------------------------------------------- */

/* n->port is read by the transmitting worker without a lock: one pointer,
 * published with release and read with acquire (vu_net_tx.c), so the
 * worker sees a whole port or none. */
bool vu_net_port_bindable(const struct vu_net_dev *n)
{
    return n->backend == VU_NET_BACKEND_SWITCH && !__atomic_load_n(&n->port, __ATOMIC_ACQUIRE);
}

int vu_net_bind_port(struct vu_net_dev *n, struct vu_net_port *port)
{
    if (!port || !vu_net_port_bindable(n))
        return -1;
    __atomic_store_n(&n->port, port, __ATOMIC_RELEASE);
    return 0;
}

void vu_net_unbind_port(struct vu_net_dev *n)
{
    __atomic_store_n(&n->port, NULL, __ATOMIC_RELEASE);
}

/* Dispatch ---------------------------------------------------------------------------- */

int vu_net_handler(void *ctx, struct vu_vq *vq)
{
    struct vu_net_dev *n = ctx;
    uint32_t qp = vq->index / 2;
    /* Called on a stopped ring when its TAP fires: the frames wait in the
     * TAP (watched edge-triggered) until the ring runs again. */
    if (qp >= VU_NET_MAX_QP || !vq->started)
        return VU_HANDLED_NONE;
    if (vq->index % 2 == 0) {
        /* Receive queue: remember it for deliveries; pull from the TAP. */
        n->rxq[qp] = vq;
        if (n->backend == VU_NET_BACKEND_TAP)
            return net_tap_poll(n, qp, vq);
        /* Deliveries from other threads pop buffers when they have a
         * frame; nothing waits for new ones, so the driver need not kick
         * (each kick would wake this worker for nothing). */
        vu_vq_set_notification(vq, false);
        return VU_HANDLED_NONE;
    }
    /* Transmit queue: a disabled one still drains and drops what it is given. */
    if (vq->broken)
        return VU_HANDLED_NONE;
    return net_transmit(n, vq, qp);
}
