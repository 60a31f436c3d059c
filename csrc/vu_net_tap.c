/* virtio-net TAP I/O: the kernel TAP device a VU_NET_BACKEND_TAP device
 * talks to, one fd per queue pair, opened with IFF_VNET_HDR so frames go
 * each way with the guest's own virtio-net header (offloads included, as
 * far as negotiated). Received frames are read by the receive queue's
 * worker, which watches the fd; transmitted ones are written as the guest
 * laid them out. */
#include "vu_net_internal.h"
#include "vu_worker.h"

#include <errno.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>

void net_tap_set_offload(struct vu_net_dev *n, uint64_t f)
{
#define HAS(bit) (!!(f & (1ULL << (bit))))
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
#undef HAS
}

/* Reads frames from the TAP into receive queue qp until it is empty. */
static int tap_receive(struct vu_net_dev *n, uint32_t qp, struct vu_vq *vq)
{
    int fd = n->tap_fds[qp];
    if (fd < 0)
        return VU_HANDLED_NONE;
    uint8_t *buf = net_bounce(n, qp);
    if (!buf)
        return VU_HANDLED_NONE;
    int got = 0;
    bool drained = false;
    for (int i = 0; i < NET_BATCH * 4; i++) {
        ssize_t r = read(fd, buf, VU_NET_MAX_FRAME + n->hdr_len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            drained = true;     /* EAGAIN (or an error: nothing more to read) */
            break;
        }
        if ((size_t)r < n->hdr_len + ETH_HLEN) {
            net_rx_drop(n, qp, VU_NET_D_SHORT);
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
    /* Watched edge-triggered: what is left wakes nobody, so come back. */
    if (!drained)
        return VU_HANDLED_MORE;
    return got ? VU_HANDLED_SOME : VU_HANDLED_NONE;
}

int net_tap_poll(struct vu_net_dev *n, uint32_t qp, struct vu_vq *vq)
{
    /* The TAP's readiness wakes the worker that serves the queue now (a new
     * session or a queue moved to another worker: watched from there), on
     * each arrival only: while the ring is stopped nobody reads the TAP, and
     * a level-triggered fd would wake the worker without end. */
    if (n->tap_fds[qp] >= 0 && vq->worker && n->tap_worker[qp] != vq->worker->id) {
        if (vu_worker_add_event_fd(vq->worker, vq, n->tap_fds[qp], true) == 0)
            n->tap_worker[qp] = vq->worker->id;
    }
    return tap_receive(n, qp, vq);
}

int net_tap_send(struct vu_net_dev *n, uint32_t qp, const struct vu_elem *e)
{
    /* header and frame as the guest laid them out: the TAP takes the same
     * virtio-net header (IFF_VNET_HDR) */
    if (n->tap_fds[qp] < 0 || writev(n->tap_fds[qp], e->iov, (int)e->out_num) < 0)
        return VU_NET_D_IO;
    return 0;
}
