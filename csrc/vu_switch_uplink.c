/* The switch's uplink: a TAP (plain Ethernet frames) or a VXLAN tunnel
 * (RFC 7348) over a UDP socket to one peer, the switch's way off the host.
 * Frames flooded or forwarded to it are sent from whichever thread
 * forwards them (under the switch's lock); what arrives is received by a
 * thread of the switch's own rather than a queue worker: workers belong to
 * one session of one port and go away with it, the uplink serves all ports
 * for the switch's lifetime, and a busy tunnel should not take turns away
 * from a guest's queues. */
#include "vu_switch_internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define VXLAN_FLAG_I 0x08       /* the VNI is valid (RFC 7348, 5) */
#define UPLINK_BATCH 256        /* datagrams per wakeup before polling again */
#define UPLINK_BUF (VU_NET_MAX_FRAME + VU_VXLAN_HLEN)

void sw_uplink_init(struct sw_uplink *up)
{
    up->fd = -1;
    up->stop_fd = -1;
}

void sw_uplink_free(struct sw_uplink *up)
{
    free(up->buf);
    up->buf = NULL;
}

/* Sending (switch lock held) ----------------------------------------------------------- */

bool sw_uplink_send(struct vu_switch *sw, const uint8_t *data, uint32_t len)
{
    if (sw->up.kind == VU_SWITCH_UPLINK_TAP)
        return write(sw->up.fd, data, len) == (ssize_t)len;
    if (sw->up.kind != VU_SWITCH_UPLINK_VXLAN)
        return false;
    uint8_t h[VU_VXLAN_HLEN] = {VXLAN_FLAG_I, 0, 0, 0, (uint8_t)(sw->up.vni >> 16),
                                (uint8_t)(sw->up.vni >> 8), (uint8_t)sw->up.vni, 0};
    struct iovec iov[2] = {{h, sizeof(h)}, {(void *)data, len}};
    struct msghdr m = {.msg_name = &sw->up.remote, .msg_namelen = sw->up.remote_len,
                       .msg_iov = iov, .msg_iovlen = 2};
    if (sendmsg(sw->up.fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        sw->up.vx.tx_errors++;
        return false;
    }
    return true;
}

/* Set-up and thread ----------------------------------------------------------------- */

int vu_switch_set_tap(struct vu_switch *sw, int fd)
{
    if (sw->up.running || fd < 0)
        return -VU_ERR_INVAL;
    pthread_mutex_lock(&sw->lock);
    sw->up.kind = VU_SWITCH_UPLINK_TAP;
    sw->up.fd = fd;
    pthread_mutex_unlock(&sw->lock);
    return 0;
}

int vu_switch_set_vxlan(struct vu_switch *sw, int fd, uint32_t vni, int family,
                        const uint8_t *remote, uint16_t port)
{
    if (sw->up.running || fd < 0 || vni > 0xFFFFFF)
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
    sw->up.kind = VU_SWITCH_UPLINK_VXLAN;
    sw->up.fd = fd;
    sw->up.vni = vni;
    sw->up.remote = ss;
    sw->up.remote_len = sslen;
    pthread_mutex_unlock(&sw->lock);
    return 0;
}

/* VXLAN comes from anyone who can reach the port: only the configured peer
 * is listened to (any source port: senders spread flows over ports). */
static bool from_remote(struct vu_switch *sw, const struct sockaddr_storage *from)
{
    if (from->ss_family != sw->up.remote.ss_family)
        return false;
    if (from->ss_family == AF_INET)
        return memcmp(&((const struct sockaddr_in *)from)->sin_addr,
                      &((const struct sockaddr_in *)&sw->up.remote)->sin_addr, 4) == 0;
    return memcmp(&((const struct sockaddr_in6 *)from)->sin6_addr,
                  &((const struct sockaddr_in6 *)&sw->up.remote)->sin6_addr, 16) == 0;
}

/* One datagram (or TAP frame) from the uplink, in the uplink thread. */
static void uplink_input(struct vu_switch *sw, const uint8_t *buf, uint32_t len,
                         const struct sockaddr_storage *from)
{
    pthread_mutex_lock(&sw->lock);
    if (sw->up.kind == VU_SWITCH_UPLINK_VXLAN) {
        if (!from_remote(sw, from))
            sw->up.vx.rx_bad_source++;
        else if (len < VU_VXLAN_HLEN + ETH_HLEN)
            sw->up.vx.rx_short++;
        else if (!(buf[0] & VXLAN_FLAG_I))   /* other bits: reserved, ignored on receipt */
            sw->up.vx.rx_bad_flags++;
        else if (((uint32_t)buf[4] << 16 | (uint32_t)buf[5] << 8 | buf[6]) != sw->up.vni)
            sw->up.vx.rx_bad_vni++;
        else
            sw_forward(sw, VU_SWITCH_UPLINK, buf + VU_VXLAN_HLEN, len - VU_VXLAN_HLEN);
    } else if (len >= ETH_HLEN) {
        sw_forward(sw, VU_SWITCH_UPLINK, buf, len);
    } else {
        sw->ports[VU_SWITCH_UPLINK].st.dropped++;
    }
    pthread_mutex_unlock(&sw->lock);
}

static void *uplink_main(void *arg)
{
    struct vu_switch *sw = arg;
    struct pollfd pf[2] = {{.fd = sw->up.fd, .events = POLLIN},
                           {.fd = sw->up.stop_fd, .events = POLLIN}};
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
            /* sw->up.kind only changes while this thread is not running */
            ssize_t r = sw->up.kind == VU_SWITCH_UPLINK_TAP
                ? read(sw->up.fd, sw->up.buf, UPLINK_BUF)
                : recvfrom(sw->up.fd, sw->up.buf, UPLINK_BUF, MSG_DONTWAIT,
                           (struct sockaddr *)&from, &fromlen);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                break;  /* EAGAIN: drained; an error was reported and cleared */
            }
            uplink_input(sw, sw->up.buf, (uint32_t)r, &from);
        }
    }
    return NULL;
}

int vu_switch_start(struct vu_switch *sw)
{
    if (sw->up.running || sw->up.kind == VU_SWITCH_UPLINK_NONE)
        return 0;
    if (!sw->up.buf) {
        sw->up.buf = malloc(UPLINK_BUF);
        if (!sw->up.buf)
            return -VU_ERR_NOMEM;
    }
    sw->up.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (sw->up.stop_fd < 0)
        return -VU_ERR_SYS;
    if (pthread_create(&sw->up.thread, NULL, uplink_main, sw) != 0) {
        close(sw->up.stop_fd);
        sw->up.stop_fd = -1;
        return -VU_ERR_SYS;
    }
    sw->up.running = true;
    return 0;
}

void vu_switch_stop(struct vu_switch *sw)
{
    if (sw->up.running) {
        uint64_t one = 1;
        ssize_t r = write(sw->up.stop_fd, &one, sizeof(one));
        (void)r;
        pthread_join(sw->up.thread, NULL);
        close(sw->up.stop_fd);
        sw->up.stop_fd = -1;
        sw->up.running = false;
    }
    pthread_mutex_lock(&sw->lock);
    sw->up.kind = VU_SWITCH_UPLINK_NONE;
    sw->up.fd = -1;
    pthread_mutex_unlock(&sw->lock);
}

void vu_switch_get_vxlan_stats(struct vu_switch *sw, struct vu_vxlan_stats *out)
{
    pthread_mutex_lock(&sw->lock);
    *out = sw->up.vx;
    pthread_mutex_unlock(&sw->lock);
}
