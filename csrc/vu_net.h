/* virtio-net device: the API (what cffi sees) and the port interface a
 * switch uses. The implementation is split by job: vu_net.c (lifecycle,
 * queue dispatch), vu_net_check.c (header rules), vu_net_rx.c (receive),
 * vu_net_tx.c (transmit), vu_net_tap.c (TAP I/O); what they share and
 * nobody else needs is in vu_net_internal.h. */
#ifndef VU_NET_H
#define VU_NET_H

#include "vu_queue.h"

#define VU_NET_MAX_QP 16
#define VU_NET_MAX_FRAME 65550        /* 64 KiB GSO frame + Ethernet header */

enum { VU_NET_BACKEND_TAP = 0, VU_NET_BACKEND_PYTHON = 1,
       VU_NET_BACKEND_SWITCH = 2, /* frames go to a struct vu_net_port (a switch's, vu_switch.h) */
       VU_NET_BACKEND_SINK = 3,   /* transmitted frames are counted and dropped */
       VU_NET_BACKEND_LOOPBACK = 4 /* transmitted frames come back on the same queue pair */ };

/* Why a frame was dropped. */
enum vu_net_drop {
    VU_NET_D_NONE = 0, VU_NET_D_SHORT, VU_NET_D_TOO_LONG, VU_NET_D_BAD_GSO,
    VU_NET_D_BAD_CSUM, VU_NET_D_DISABLED, VU_NET_D_NO_BUFFERS, VU_NET_D_IO,
    VU_NET_D__COUNT
};

struct vu_net_hdr {             /* struct virtio_net_hdr_v1 */
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

struct vu_net_stats {
    uint64_t tx_packets, tx_bytes, rx_packets, rx_bytes;
    /* offloads actually carried: segmentation and partial checksums */
    uint64_t tx_gso, tx_csum_partial, rx_gso, rx_csum_partial;
    uint64_t tx_dropped[VU_NET_D__COUNT];
    uint64_t rx_dropped[VU_NET_D__COUNT];
};

/* A validated transmitted frame handed to a Python back-end. */
struct vu_net_frame {
    struct vu_elem *elem;
    struct vu_net_hdr hdr;
    struct iovec *iov;          /* the frame without the virtio-net header */
    uint32_t niov, iov_cap;
    uint32_t len;
};

struct vu_net_port;

struct vu_net_dev {
    int backend;
    uint32_t hdr_len;           /* 12 (VERSION_1 or MRG_RXBUF), else 10 */
    uint32_t mtu;               /* largest L3 payload of a non-GSO frame */
    bool mrg_rxbuf;
    bool host_csum, host_tso4, host_tso6, host_ecn, host_ufo;   /* negotiated */
    int tap_fds[VU_NET_MAX_QP];
    void *py_ctx;
    struct vu_vq *rxq[VU_NET_MAX_QP];   /* the current session's receive queues */
    pthread_mutex_t rx_lock[VU_NET_MAX_QP];  /* one frame at a time per receive queue */
    uint8_t *bounce[VU_NET_MAX_QP];     /* receive staging, one per queue pair */
    uint64_t tap_worker[VU_NET_MAX_QP];  /* id of the worker whose epoll has the TAP fd */
    struct vu_net_frame *frames[VU_NET_MAX_QP];
    uint32_t frames_num[VU_NET_MAX_QP];
    struct vu_net_stats stats[VU_NET_MAX_QP];
    /* VU_NET_BACKEND_SWITCH: where transmitted frames go (vu_net_bind_port) */
    struct vu_net_port *port;
};

struct vu_net_dev *vu_net_new(int backend);
void vu_net_free(struct vu_net_dev *n);
/* After SET_FEATURES: header size and what the guest may send. */
void vu_net_set_features(struct vu_net_dev *n, uint64_t features);
/* The session's workers are gone: forget whose epoll watched the TAPs. */

/* Validates a transmitted chain: 0 and *hdr filled, or a vu_net_drop. */
int vu_net_check_tx(struct vu_net_dev *n, struct vu_elem *e, struct vu_net_hdr *hdr);
/* Puts one frame (header + data) into receive queue qp's buffers. The
 * caller flushes and notifies. Returns 0 or a vu_net_drop (counted). */
int vu_net_rx_deliver(struct vu_net_dev *n, uint32_t qp, const struct vu_net_hdr *hdr,
                      const uint8_t *data, uint32_t len);
/* Same, from any thread: takes the device lock, flushes and notifies. */
int vu_net_inject(struct vu_net_dev *n, uint32_t qp, const uint8_t *data, uint32_t len);
/* Many frames at once, from any thread: one device lock, one receive lock,
 * one flush and one notification for the batch. Frames a Python back-end
 * was handed by transmit (valid during that call only: they are read from
 * the transmitting guest's memory, copied once), or iovecs, niov[i] of
 * them for frame i. Each frame gets a zero virtio-net header. Returns how
 * many were delivered; the others were dropped and counted (once the ring
 * has no buffers, all that follow). */
int vu_net_inject_frames(struct vu_net_dev *n, uint32_t qp, struct vu_net_frame *const *frames,
                         int count);
int vu_net_inject_iovs(struct vu_net_dev *n, uint32_t qp, const struct iovec *iov,
                       const uint32_t *niov, int count);
/* A Python back-end's transmit batch described in one call rather than
 * field by field through cffi: frame length, iovec count, iov[0]. */
struct vu_net_pydesc {
    uint32_t len, niov;
    uint64_t base0, len0;
};
void vu_net_py_describe(struct vu_net_frame *const *frames, int count, struct vu_net_pydesc *out);
/* Frames laid end to end in buf, lens[i] bytes each. */
int vu_net_inject_packed(struct vu_net_dev *n, uint32_t qp, const uint8_t *buf,
                         const uint32_t *lens, int count);

/* The port interface: how a VU_NET_BACKEND_SWITCH device and whatever
 * owns its port (vu_switch.c) talk, and all they know of each other.
 * Transmit: the device calls port->tx for each validated frame. Receive:
 * the owner calls vu_net_port_deliver. The owner embeds a struct
 * vu_net_port in its own port state and finds that again from `port`; one
 * pointer, so a worker never sees a hook with another port's context. */
struct vu_net_port {
    /* A frame the guest transmitted: the bytes from offset skip of
     * iov[0, niov) (the virtio-net header left out), validated. Called in
     * the device's worker with its device lock held; `from` is the device
     * (a port may be unbound while a session runs: the owner checks it
     * still belongs to `from`). Returns 0 or a vu_net_drop. */
    int (*tx)(struct vu_net_port *port, struct vu_net_dev *from, const struct iovec *iov,
              uint32_t niov, uint32_t skip, uint32_t len);
};
/* n is VU_NET_BACKEND_SWITCH and bound to no port. */
bool vu_net_port_bindable(const struct vu_net_dev *n);
/* From now on n transmits into port: 0, or -1 if n is not bindable. */
int vu_net_bind_port(struct vu_net_dev *n, struct vu_net_port *port);
/* n transmits nowhere (frames are dropped as VU_NET_D_IO). */
void vu_net_unbind_port(struct vu_net_dev *n);
/* A frame from the port for receive queue qp, or queue 0 when the guest
 * has not enabled qp (it may use fewer pairs). From any thread without
 * the device lock; never waits for it (the caller may hold locks that its
 * holder waits for): a busy device refuses the frame. Flushes and
 * notifies. Returns 0 or a vu_net_drop. Frames refused before a queue is
 * picked (longer than the MTU allows, no session, device busy) are not
 * counted by the device: the caller counts its own drops. */
int vu_net_port_deliver(struct vu_net_dev *n, uint32_t qp, const uint8_t *data, uint32_t len);

/* Queue handler for the worker (ctx = struct vu_net_dev *): even queues
 * receive, odd queues transmit. */
int vu_net_handler(void *ctx, struct vu_vq *vq);

#endif
