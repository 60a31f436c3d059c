/* A learning switch between virtio-net ports: the ports and forwarding.
 *
 * Frames a guest transmits were validated by the transmit path (header,
 * length) and reach us through the port interface (struct vu_net_port in
 * vu_net.h); here the source address is learned (vu_switch_mac.h) and the
 * frame goes to the port its destination was learned on, or to every other
 * port and the uplink (broadcast, multicast, unknown unicast). Never back
 * where it came from. Ports get frames with a zeroed virtio-net header:
 * switch ports negotiate no offloads, so every frame is complete and
 * checksummed. The uplink (TAP or VXLAN) is vu_switch_uplink.c's.
 *
 * Locking: one mutex guards the ports, their attachment, the address table,
 * the counters and sending on the uplink, and is held while a frame is
 * delivered. A session detaches its port under it before its queues are
 * freed, so a delivery never touches a freed queue. Deliveries never wait
 * for the destination device's lock (vu_net_port_deliver only tries it):
 * its control plane may hold it for writing or wait for it (a waiting
 * writer goes first, vu_dev_new), and waiting could deadlock against a
 * worker that holds its own device lock and waits for the switch; the
 * frame is dropped instead. */
#include "vu_switch_internal.h"
#include "vu_iov.h"

#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

static int port_tx(struct vu_net_port *link, struct vu_net_dev *from, const struct iovec *iov,
                   uint32_t niov, uint32_t skip, uint32_t len);

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
    /* Set once, never cleared: a worker that read a port just before it was
     * removed still finds a hook to call (which sees the port is gone). */
    for (int i = 0; i < VU_SWITCH_MAX_PORTS; i++) {
        sw->ports[i].link.tx = port_tx;
        sw->ports[i].sw = sw;
    }
    sw->macs.max_age_ms = VU_SWITCH_MAC_AGE_MS;
    sw_uplink_init(&sw->up);
    if (getrandom(&sw->macs.seed, sizeof(sw->macs.seed), GRND_NONBLOCK) != sizeof(sw->macs.seed))
        sw->macs.seed = sw_now_ms() ^ (uint64_t)(uintptr_t)sw;
    return sw;
}

void vu_switch_free(struct vu_switch *sw)
{
    if (!sw)
        return;
    vu_switch_stop(sw);
    pthread_mutex_destroy(&sw->lock);
    free(sw->stage);
    sw_uplink_free(&sw->up);
    free(sw);
}

/* Output (lock held) ------------------------------------------------------------ */

static bool port_deliver(struct vu_switch *sw, struct sw_port *p, const uint8_t *data, uint32_t len)
{
    if (!p->attached)
        return false;
    /* One receive queue per flow, so a flow stays in order. */
    uint32_t qp = p->nqp <= 1 ? 0
        : (mac_hash(&sw->macs, data) ^ mac_hash(&sw->macs, data + ETH_ALEN)) % p->nqp;
    return vu_net_port_deliver(p->net, qp, data, len) == 0;
}

static void output(struct vu_switch *sw, int port, const uint8_t *data, uint32_t len)
{
    struct sw_port *p = &sw->ports[port];
    bool ok = port == VU_SWITCH_UPLINK ? sw_uplink_send(sw, data, len)
                                       : port_deliver(sw, p, data, len);
    if (ok)
        p->st.out++;
    else
        p->st.out_dropped++;
}

/* A frame that entered on port `in`: learn, then forward or flood. */
void sw_forward(struct vu_switch *sw, int in, const uint8_t *data, uint32_t len)
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
    uint64_t now = sw_now_ms();
    mac_learn(&sw->macs, src, in, now);
    int to = (dst[0] & 1) ? -1 : mac_lookup(&sw->macs, dst, now);
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
    if (in != VU_SWITCH_UPLINK && sw->up.kind != VU_SWITCH_UPLINK_NONE)
        output(sw, VU_SWITCH_UPLINK, data, len);
}

/* Ports ---------------------------------------------------------------------------- */

static bool valid_port(struct vu_switch *sw, int port)
{
    return port >= 0 && port < VU_SWITCH_MAX_PORTS && sw->ports[port].net;
}

/* struct vu_net_port's tx: a frame port->net's guest transmitted. */
static int port_tx(struct vu_net_port *link, struct vu_net_dev *from, const struct iovec *iov,
                   uint32_t niov, uint32_t skip, uint32_t len)
{
    struct sw_port *p = (struct sw_port *)((char *)link - offsetof(struct sw_port, link));
    struct vu_switch *sw = p->sw;
    if (len > VU_NET_MAX_FRAME)
        return VU_NET_D_TOO_LONG;
    pthread_mutex_lock(&sw->lock);
    int in = (int)(p - sw->ports);
    bool whole = vu_iov_gather(iov, niov, skip, sw->stage, len);
    int why = whole ? 0 : VU_NET_D_SHORT;
    if (!why && valid_port(sw, in) && p->net == from)
        sw_forward(sw, in, sw->stage, len);
    else if (!why)
        why = VU_NET_D_IO;      /* the port was removed under a running session */
    pthread_mutex_unlock(&sw->lock);
    return why;
}

int vu_switch_add_port(struct vu_switch *sw, struct vu_net_dev *n, uint32_t nqp)
{
    if (!n || !vu_net_port_bindable(n) || nqp == 0 || nqp > VU_NET_MAX_QP)
        return -VU_ERR_INVAL;
    pthread_mutex_lock(&sw->lock);
    int port = -VU_ERR_NOMEM;   /* all slots taken */
    for (int i = 0; i < VU_SWITCH_MAX_PORTS; i++) {
        struct sw_port *p = &sw->ports[i];
        if (!p->net) {
            /* fails only if another switch bound n meanwhile */
            if (vu_net_bind_port(n, &p->link) != 0) {
                port = -VU_ERR_INVAL;
                break;
            }
            p->net = n;
            p->nqp = nqp;
            p->attached = false;
            memset(&p->st, 0, sizeof(p->st));
            port = i;
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
        mac_forget_port(&sw->macs, port);
        vu_net_unbind_port(sw->ports[port].net);
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
        mac_forget_port(&sw->macs, port);
    }
    pthread_mutex_unlock(&sw->lock);
}

/* Frames in ------------------------------------------------------------------------ */

int vu_switch_send(struct vu_switch *sw, int port, const uint8_t *data, uint32_t len)
{
    if (len < ETH_HLEN || len > VU_NET_MAX_FRAME)
        return -VU_ERR_INVAL;
    pthread_mutex_lock(&sw->lock);
    bool ok = valid_port(sw, port) || port == VU_SWITCH_UPLINK;
    if (ok)
        sw_forward(sw, port, data, len);
    pthread_mutex_unlock(&sw->lock);
    return ok ? 0 : -VU_ERR_INVAL;
}

/* Introspection ------------------------------------------------------------------- */

int vu_switch_lookup(struct vu_switch *sw, const uint8_t *mac)
{
    pthread_mutex_lock(&sw->lock);
    int port = mac_lookup(&sw->macs, mac, sw_now_ms());
    pthread_mutex_unlock(&sw->lock);
    return port;
}

uint32_t vu_switch_mac_count(struct vu_switch *sw)
{
    uint64_t now = sw_now_ms();
    pthread_mutex_lock(&sw->lock);
    uint32_t count = mac_count(&sw->macs, now);
    pthread_mutex_unlock(&sw->lock);
    return count;
}

void vu_switch_set_aging(struct vu_switch *sw, uint32_t ms)
{
    pthread_mutex_lock(&sw->lock);
    sw->macs.max_age_ms = ms;
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
