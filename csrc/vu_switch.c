/* A learning switch between virtio-net ports, with a TAP or VXLAN uplink.
 *
 * Frames a guest transmits were validated by the transmit path (header,
 * length); here the source address is learned and the frame goes to the
 * port its destination was learned on, or to every other port and the
 * uplink (broadcast, multicast, unknown unicast). Never back where it came
 * from. Ports get frames with a zeroed virtio-net header: switch ports
 * negotiate no offloads, so every frame is complete and checksummed.
 *
 * Locking: one mutex guards the ports, their attachment, the address table,
 * the counters and sending on the uplink, and is held while a frame is
 * delivered. A session detaches its port under it before its queues are
 * freed, so a delivery never touches a freed queue. While holding it we
 * only try the destination device's lock: its control plane may hold it
 * for writing, and waiting could deadlock against a worker that holds its
 * own device lock and waits for the switch; the frame is dropped instead.
 *
 * The uplink is received by a thread of the switch's own rather than a
 * queue worker: workers belong to one session of one port and go away
 * with it, the uplink serves all ports for the switch's lifetime, and a
 * busy tunnel should not take turns away from a guest's queues. */
#include "vu_switch.h"
#include "vu_iov.h"
#include "vu_dev.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ETH_ALEN 6
#define ETH_HLEN 14
#define VLAN_HLEN 4
#define VXLAN_FLAG_I 0x08       /* the VNI is valid (RFC 7348, 5) */
#define UPLINK_BATCH 256        /* datagrams per wakeup before polling again */
#define UPLINK_BUF (VU_NET_MAX_FRAME + VU_VXLAN_HLEN)

struct mac_entry {
    uint8_t mac[ETH_ALEN];
    uint16_t port;
    bool used;
    uint64_t seen_ms;
};

struct sw_port {
    struct vu_net_dev *net;     /* NULL: free slot */
    uint32_t nqp;
    bool attached;              /* a session serves it: net->rxq[] is live */
    struct vu_switch_stats st;
};

struct vu_switch {
    pthread_mutex_t lock;
    struct sw_port ports[VU_SWITCH_MAX_PORTS + 1];   /* [VU_SWITCH_UPLINK]: its counters */
    /* Set-associative: a new address replaces the least recently seen
     * entry of its set, so the table never grows past SETS * WAYS. */
    struct mac_entry macs[VU_SWITCH_MAC_SETS][VU_SWITCH_MAC_WAYS];
    uint64_t seed;              /* random: guests can't aim at one set */
    uint64_t max_age_ms;
    uint8_t *stage;             /* a guest frame gathered contiguously, under lock */

    int uplink;                 /* VU_SWITCH_UPLINK_* */
    int up_fd;
    uint32_t vni;
    struct sockaddr_storage remote;
    socklen_t remote_len;
    struct vu_vxlan_stats vx;
    pthread_t thread;
    bool running;
    int stop_fd;
    uint8_t *up_buf;            /* the uplink thread's own */
};

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

struct vu_switch *vu_switch_new(void)
{
    struct vu_switch *sw = calloc(1, sizeof(*sw));
    if (!sw)
        return NULL;
    sw->stage = malloc(VU_NET_MAX_FRAME);
    if (!sw->stage) {
        free(sw);
        return NULL;
    }
    pthread_mutex_init(&sw->lock, NULL);
    sw->max_age_ms = VU_SWITCH_MAC_AGE_MS;
    sw->up_fd = -1;
    sw->stop_fd = -1;
    if (getrandom(&sw->seed, sizeof(sw->seed), GRND_NONBLOCK) != sizeof(sw->seed))
        sw->seed = now_ms() ^ (uint64_t)(uintptr_t)sw;
    return sw;
}

void vu_switch_free(struct vu_switch *sw)
{
    if (!sw)
        return;
    vu_switch_stop(sw);
    pthread_mutex_destroy(&sw->lock);
    free(sw->stage);
    free(sw->up_buf);
    free(sw);
}

/* Address table (lock held) --------------------------------------------------- */

static uint32_t mac_set(const struct vu_switch *sw, const uint8_t *mac)
{
    uint64_t x = 0;
    memcpy(&x, mac, ETH_ALEN);
    x ^= sw->seed;
    x *= 0x9E3779B97F4A7C15ull;
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 32;
    return (uint32_t)x % VU_SWITCH_MAC_SETS;
}

static bool fresh(const struct vu_switch *sw, const struct mac_entry *e, uint64_t now)
{
    return e->used && now - e->seen_ms < sw->max_age_ms;
}

static void learn(struct vu_switch *sw, const uint8_t *mac, int port, uint64_t now)
{
    struct mac_entry *set = sw->macs[mac_set(sw, mac)];
    struct mac_entry *victim = NULL;
    for (int w = 0; w < VU_SWITCH_MAC_WAYS; w++) {
        struct mac_entry *e = &set[w];
        if (e->used && memcmp(e->mac, mac, ETH_ALEN) == 0) {
            e->port = (uint16_t)port;       /* the address may have moved */
            e->seen_ms = now;
            return;
        }
        /* prefer an empty way, else the least recently seen */
        if (!victim || (victim->used && (!e->used || e->seen_ms < victim->seen_ms)))
            victim = e;
    }
    memcpy(victim->mac, mac, ETH_ALEN);
    victim->port = (uint16_t)port;
    victim->used = true;
    victim->seen_ms = now;
}

static int lookup(struct vu_switch *sw, const uint8_t *mac, uint64_t now)
{
    struct mac_entry *set = sw->macs[mac_set(sw, mac)];
    for (int w = 0; w < VU_SWITCH_MAC_WAYS; w++) {
        if (fresh(sw, &set[w], now) && memcmp(set[w].mac, mac, ETH_ALEN) == 0)
            return set[w].port;
    }
    return -1;
}

static void forget_port(struct vu_switch *sw, int port)
{
    for (int s = 0; s < VU_SWITCH_MAC_SETS; s++)
        for (int w = 0; w < VU_SWITCH_MAC_WAYS; w++)
            if (sw->macs[s][w].port == port)
                sw->macs[s][w].used = false;
}

/* Output (lock held) ------------------------------------------------------------ */

static bool uplink_send(struct vu_switch *sw, const uint8_t *data, uint32_t len)
{
    if (sw->uplink == VU_SWITCH_UPLINK_TAP)
        return write(sw->up_fd, data, len) == (ssize_t)len;
    if (sw->uplink != VU_SWITCH_UPLINK_VXLAN)
        return false;
    uint8_t h[VU_VXLAN_HLEN] = {VXLAN_FLAG_I, 0, 0, 0, (uint8_t)(sw->vni >> 16),
                                (uint8_t)(sw->vni >> 8), (uint8_t)sw->vni, 0};
    struct iovec iov[2] = {{h, sizeof(h)}, {(void *)data, len}};
    struct msghdr m = {.msg_name = &sw->remote, .msg_namelen = sw->remote_len,
                       .msg_iov = iov, .msg_iovlen = 2};
    if (sendmsg(sw->up_fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        sw->vx.tx_errors++;
        return false;
    }
    return true;
}

/* One receive queue per flow, so a flow stays in order. Device lock held. */
static uint32_t pick_qp(struct vu_switch *sw, struct sw_port *p, const uint8_t *frame)
{
    if (p->nqp <= 1)
        return 0;
    uint32_t qp = (mac_set(sw, frame) ^ mac_set(sw, frame + ETH_ALEN)) % p->nqp;
    struct vu_vq *vq = p->net->rxq[qp];
    return vq && vq->enabled ? qp : 0;   /* the guest may use fewer pairs */
}

static bool port_deliver(struct vu_switch *sw, struct sw_port *p, const uint8_t *data, uint32_t len)
{
    struct vu_net_dev *n = p->net;
    if (!p->attached || len > n->mtu + ETH_HLEN + VLAN_HLEN || !n->rxq[0])
        return false;
    /* all of a session's queues belong to one device */
    struct vu_dev *dev = n->rxq[0]->dev;
    if (pthread_rwlock_tryrdlock(&dev->lock) != 0)
        return false;
    uint32_t qp = pick_qp(sw, p, data);
    struct vu_vq *vq = n->rxq[qp];
    int rc = vq ? vu_net_rx_deliver(n, qp, NULL, data, len) : VU_NET_D_DISABLED;
    if (rc == 0) {
        vu_vq_flush(vq);
        vu_vq_notify(vq);
    }
    vu_dev_unlock(dev);
    return rc == 0;
}

static void output(struct vu_switch *sw, int port, const uint8_t *data, uint32_t len)
{
    struct sw_port *p = &sw->ports[port];
    bool ok = port == VU_SWITCH_UPLINK ? uplink_send(sw, data, len)
                                       : port_deliver(sw, p, data, len);
    if (ok)
        p->st.out++;
    else
        p->st.out_dropped++;
}

/* A frame that entered on port `in`: learn, then forward or flood. */
static void forward(struct vu_switch *sw, int in, const uint8_t *data, uint32_t len)
{
    struct vu_switch_stats *st = &sw->ports[in].st;
    st->in++;
    const uint8_t *dst = data, *src = data + ETH_ALEN;
    static const uint8_t zero[ETH_ALEN];
    /* A group or all-zero source is no station: don't learn it, drop (as
     * bridges do). A port without a session has no way to answer either. */
    if (len < ETH_HLEN || (src[0] & 1) || memcmp(src, zero, ETH_ALEN) == 0 ||
        (in != VU_SWITCH_UPLINK && !sw->ports[in].attached)) {
        st->dropped++;
        return;
    }
    uint64_t now = now_ms();
    learn(sw, src, in, now);
    int to = (dst[0] & 1) ? -1 : lookup(sw, dst, now);
    if (to == in) {
        st->dropped++;          /* both ends behind the same port */
        return;
    }
    if (to >= 0) {
        st->forwarded++;
        output(sw, to, data, len);
        return;
    }
    st->flooded++;
    for (int p = 0; p < VU_SWITCH_MAX_PORTS; p++) {
        if (p != in && sw->ports[p].net && sw->ports[p].attached)
            output(sw, p, data, len);
    }
    if (in != VU_SWITCH_UPLINK && sw->uplink != VU_SWITCH_UPLINK_NONE)
        output(sw, VU_SWITCH_UPLINK, data, len);
}

/* Ports ---------------------------------------------------------------------------- */

static bool valid_port(struct vu_switch *sw, int port)
{
    return port >= 0 && port < VU_SWITCH_MAX_PORTS && sw->ports[port].net;
}

int vu_switch_add_port(struct vu_switch *sw, struct vu_net_dev *n, uint32_t nqp)
{
    if (!n || n->backend != VU_NET_BACKEND_SWITCH || n->sw || nqp == 0 || nqp > VU_NET_MAX_QP)
        return -VU_ERR_INVAL;
    pthread_mutex_lock(&sw->lock);
    int port = -VU_ERR_NOMEM;   /* all slots taken */
    for (int p = 0; p < VU_SWITCH_MAX_PORTS; p++) {
        if (!sw->ports[p].net) {
            memset(&sw->ports[p], 0, sizeof(sw->ports[p]));
            sw->ports[p].net = n;
            sw->ports[p].nqp = nqp;
            n->sw = sw;
            n->sw_port = p;
            port = p;
            break;
        }
    }
    pthread_mutex_unlock(&sw->lock);
    return port;
}

void vu_switch_remove_port(struct vu_switch *sw, int port)
{
    pthread_mutex_lock(&sw->lock);
    if (valid_port(sw, port)) {
        forget_port(sw, port);
        sw->ports[port].net->sw = NULL;
        sw->ports[port].net->sw_port = -1;
        sw->ports[port].net = NULL;
        sw->ports[port].attached = false;
    }
    pthread_mutex_unlock(&sw->lock);
}

int vu_switch_attach(struct vu_switch *sw, int port)
{
    pthread_mutex_lock(&sw->lock);
    bool ok = valid_port(sw, port);
    if (ok)
        sw->ports[port].attached = true;
    pthread_mutex_unlock(&sw->lock);
    return ok ? 0 : -VU_ERR_INVAL;
}

void vu_switch_detach(struct vu_switch *sw, int port)
{
    pthread_mutex_lock(&sw->lock);
    if (valid_port(sw, port)) {
        sw->ports[port].attached = false;
        forget_port(sw, port);
    }
    pthread_mutex_unlock(&sw->lock);
}

/* Frames in ------------------------------------------------------------------------ */

int vu_switch_tx(struct vu_net_dev *n, const struct iovec *iov, uint32_t niov, uint32_t skip,
                 uint32_t len)
{
    struct vu_switch *sw = n->sw;
    if (!sw)
        return VU_NET_D_IO;
    if (len > VU_NET_MAX_FRAME)
        return VU_NET_D_TOO_LONG;
    pthread_mutex_lock(&sw->lock);
    bool whole = vu_iov_gather(iov, niov, skip, sw->stage, len);
    int why = whole ? 0 : VU_NET_D_SHORT;
    if (!why && valid_port(sw, n->sw_port) && sw->ports[n->sw_port].net == n)
        forward(sw, n->sw_port, sw->stage, len);
    else if (!why)
        why = VU_NET_D_IO;      /* the port was removed under a running session */
    pthread_mutex_unlock(&sw->lock);
    return why;
}

int vu_switch_send(struct vu_switch *sw, int port, const uint8_t *data, uint32_t len)
{
    if (len < ETH_HLEN || len > VU_NET_MAX_FRAME)
        return -VU_ERR_INVAL;
    pthread_mutex_lock(&sw->lock);
    bool ok = valid_port(sw, port) || port == VU_SWITCH_UPLINK;
    if (ok)
        forward(sw, port, data, len);
    pthread_mutex_unlock(&sw->lock);
    return ok ? 0 : -VU_ERR_INVAL;
}

/* Uplink ---------------------------------------------------------------------------- */

int vu_switch_set_tap(struct vu_switch *sw, int fd)
{
    if (sw->running || fd < 0)
        return -VU_ERR_INVAL;
    pthread_mutex_lock(&sw->lock);
    sw->uplink = VU_SWITCH_UPLINK_TAP;
    sw->up_fd = fd;
    pthread_mutex_unlock(&sw->lock);
    return 0;
}

int vu_switch_set_vxlan(struct vu_switch *sw, int fd, uint32_t vni, int family,
                        const uint8_t *remote, uint16_t port)
{
    if (sw->running || fd < 0 || vni > 0xFFFFFF)
        return -VU_ERR_INVAL;
    struct sockaddr_storage ss;
    socklen_t sslen;
    memset(&ss, 0, sizeof(ss));
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        memcpy(&a->sin_addr, remote, 4);
        sslen = sizeof(*a);
    } else if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        memcpy(&a->sin6_addr, remote, 16);
        sslen = sizeof(*a);
    } else {
        return -VU_ERR_INVAL;
    }
    pthread_mutex_lock(&sw->lock);
    sw->uplink = VU_SWITCH_UPLINK_VXLAN;
    sw->up_fd = fd;
    sw->vni = vni;
    sw->remote = ss;
    sw->remote_len = sslen;
    pthread_mutex_unlock(&sw->lock);
    return 0;
}

/* VXLAN comes from anyone who can reach the port: only the configured peer
 * is listened to (any source port: senders spread flows over ports). */
static bool from_remote(struct vu_switch *sw, const struct sockaddr_storage *from)
{
    if (from->ss_family != sw->remote.ss_family)
        return false;
    if (from->ss_family == AF_INET)
        return memcmp(&((const struct sockaddr_in *)from)->sin_addr,
                      &((const struct sockaddr_in *)&sw->remote)->sin_addr, 4) == 0;
    return memcmp(&((const struct sockaddr_in6 *)from)->sin6_addr,
                  &((const struct sockaddr_in6 *)&sw->remote)->sin6_addr, 16) == 0;
}

/* One datagram (or TAP frame) from the uplink, in the uplink thread. */
static void uplink_input(struct vu_switch *sw, const uint8_t *buf, uint32_t len,
                         const struct sockaddr_storage *from)
{
    pthread_mutex_lock(&sw->lock);
    if (sw->uplink == VU_SWITCH_UPLINK_VXLAN) {
        if (!from_remote(sw, from))
            sw->vx.rx_bad_source++;
        else if (len < VU_VXLAN_HLEN + ETH_HLEN)
            sw->vx.rx_short++;
        else if (!(buf[0] & VXLAN_FLAG_I))   /* other bits: reserved, ignored on receipt */
            sw->vx.rx_bad_flags++;
        else if (((uint32_t)buf[4] << 16 | (uint32_t)buf[5] << 8 | buf[6]) != sw->vni)
            sw->vx.rx_bad_vni++;
        else
            forward(sw, VU_SWITCH_UPLINK, buf + VU_VXLAN_HLEN, len - VU_VXLAN_HLEN);
    } else if (len >= ETH_HLEN) {
        forward(sw, VU_SWITCH_UPLINK, buf, len);
    } else {
        sw->ports[VU_SWITCH_UPLINK].st.dropped++;
    }
    pthread_mutex_unlock(&sw->lock);
}

static void *uplink_main(void *arg)
{
    struct vu_switch *sw = arg;
    struct pollfd pf[2] = {{.fd = sw->up_fd, .events = POLLIN},
                           {.fd = sw->stop_fd, .events = POLLIN}};
    for (;;) {
        if (poll(pf, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (pf[1].revents || (pf[0].revents & (POLLHUP | POLLNVAL)))
            break;      /* stop requested, or the uplink is gone */
        for (int i = 0; i < UPLINK_BATCH; i++) {
            struct sockaddr_storage from;
            socklen_t fromlen = sizeof(from);
            memset(&from, 0, sizeof(from));
            /* sw->uplink only changes while this thread is not running */
            ssize_t r = sw->uplink == VU_SWITCH_UPLINK_TAP
                ? read(sw->up_fd, sw->up_buf, UPLINK_BUF)
                : recvfrom(sw->up_fd, sw->up_buf, UPLINK_BUF, MSG_DONTWAIT,
                           (struct sockaddr *)&from, &fromlen);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                break;  /* EAGAIN: drained; an error was reported and cleared */
            }
            uplink_input(sw, sw->up_buf, (uint32_t)r, &from);
        }
    }
    return NULL;
}

int vu_switch_start(struct vu_switch *sw)
{
    if (sw->running || sw->uplink == VU_SWITCH_UPLINK_NONE)
        return 0;
    if (!sw->up_buf) {
        sw->up_buf = malloc(UPLINK_BUF);
        if (!sw->up_buf)
            return -VU_ERR_NOMEM;
    }
    sw->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (sw->stop_fd < 0)
        return -VU_ERR_SYS;
    if (pthread_create(&sw->thread, NULL, uplink_main, sw) != 0) {
        close(sw->stop_fd);
        sw->stop_fd = -1;
        return -VU_ERR_SYS;
    }
    sw->running = true;
    return 0;
}

void vu_switch_stop(struct vu_switch *sw)
{
    if (sw->running) {
        uint64_t one = 1;
        ssize_t r = write(sw->stop_fd, &one, sizeof(one));
        (void)r;
        pthread_join(sw->thread, NULL);
        close(sw->stop_fd);
        sw->stop_fd = -1;
        sw->running = false;
    }
    pthread_mutex_lock(&sw->lock);
    sw->uplink = VU_SWITCH_UPLINK_NONE;
    sw->up_fd = -1;
    pthread_mutex_unlock(&sw->lock);
}

/* Introspection ------------------------------------------------------------------- */

int vu_switch_lookup(struct vu_switch *sw, const uint8_t *mac)
{
    pthread_mutex_lock(&sw->lock);
    int port = lookup(sw, mac, now_ms());
    pthread_mutex_unlock(&sw->lock);
    return port;
}

uint32_t vu_switch_mac_count(struct vu_switch *sw)
{
    uint64_t now = now_ms();
    uint32_t count = 0;
    pthread_mutex_lock(&sw->lock);
    for (int s = 0; s < VU_SWITCH_MAC_SETS; s++)
        for (int w = 0; w < VU_SWITCH_MAC_WAYS; w++)
            count += fresh(sw, &sw->macs[s][w], now);
    pthread_mutex_unlock(&sw->lock);
    return count;
}

void vu_switch_set_aging(struct vu_switch *sw, uint32_t ms)
{
    pthread_mutex_lock(&sw->lock);
    sw->max_age_ms = ms;
    pthread_mutex_unlock(&sw->lock);
}

int vu_switch_get_stats(struct vu_switch *sw, int port, struct vu_switch_stats *out)
{
    pthread_mutex_lock(&sw->lock);
    bool ok = valid_port(sw, port) || port == VU_SWITCH_UPLINK;
    if (ok)
        *out = sw->ports[port].st;
    pthread_mutex_unlock(&sw->lock);
    return ok ? 0 : -VU_ERR_INVAL;
}

void vu_switch_get_vxlan_stats(struct vu_switch *sw, struct vu_vxlan_stats *out)
{
    pthread_mutex_lock(&sw->lock);
    *out = sw->vx;
    pthread_mutex_unlock(&sw->lock);
}
