/* What the switch's files share and nobody else needs: the switch's state,
 * and the two calls between forwarding (vu_switch.c) and the uplink
 * (vu_switch_uplink.c). Not part of the cffi API. */
#ifndef VU_SWITCH_INTERNAL_H
#define VU_SWITCH_INTERNAL_H

#include "vu_switch.h"
#include "vu_switch_mac.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>

#define ETH_HLEN 14

struct sw_port {
    struct vu_net_port link;    /* what the device transmits into (vu_net.h) */
    struct vu_switch *sw;       /* link's way back to its switch */
    struct vu_net_dev *net;     /* NULL: free slot */
    uint32_t nqp;
    bool attached;              /* a session serves it: deliveries may go to net */
    struct vu_switch_stats st;
};

/* The uplink's own state: only vu_switch_uplink.c looks inside, except
 * that forwarding asks whether there is one (kind). */
struct sw_uplink {
    int kind;                   /* VU_SWITCH_UPLINK_* */
    int fd;
    uint32_t vni;
    struct sockaddr_storage remote;
    socklen_t remote_len;
    struct vu_vxlan_stats vx;
    pthread_t thread;
    bool running;
    int stop_fd;
    uint8_t *buf;               /* the uplink thread's own */
};

struct vu_switch {
    /* Guards the ports, their attachment, the address table, the counters
     * and sending on the uplink; held while a frame is delivered. */
    pthread_mutex_t lock;
    struct sw_port ports[VU_SWITCH_MAX_PORTS + 1];   /* [VU_SWITCH_UPLINK]: its counters */
    struct mac_table macs;
    uint8_t *stage;             /* a guest frame gathered contiguously, under lock */
    struct sw_uplink up;
};

static inline uint64_t sw_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* vu_switch.c, lock held: a frame that entered on port `in` (or
 * VU_SWITCH_UPLINK) learned from, then forwarded or flooded. */
void sw_forward(struct vu_switch *sw, int in, const uint8_t *data, uint32_t len);

/* vu_switch_uplink.c */
/* Before first use. */
void sw_uplink_init(struct sw_uplink *up);
/* After vu_switch_stop: what the uplink allocated. */
void sw_uplink_free(struct sw_uplink *up);
/* Lock held: a frame out on the uplink; false if it was not sent. */
bool sw_uplink_send(struct vu_switch *sw, const uint8_t *data, uint32_t len);

#endif
