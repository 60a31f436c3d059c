/* A learning Ethernet switch between virtio-net devices in one process, with
 * an optional uplink: a TAP fd or a VXLAN tunnel (RFC 7348) over UDP. It
 * knows a device only through vu_net.h's port interface. Split by job:
 * vu_switch.c (ports, forwarding), vu_switch_mac.h (address table),
 * vu_switch_uplink.c (TAP/VXLAN uplink); vu_switch_internal.h is what they
 * share. */
#ifndef VU_SWITCH_H
#define VU_SWITCH_H

#include "vu_net.h"

#define VU_SWITCH_MAX_PORTS 64
#define VU_SWITCH_UPLINK VU_SWITCH_MAX_PORTS   /* port number of the uplink */
#define VU_SWITCH_MAC_SETS 256
#define VU_SWITCH_MAC_WAYS 4                   /* 1024 learned addresses at most */
#define VU_SWITCH_MAC_AGE_MS 300000            /* as Linux bridges: 5 minutes */
#define VU_VXLAN_PORT 4789
#define VU_VXLAN_HLEN 8

enum { VU_SWITCH_UPLINK_NONE = 0, VU_SWITCH_UPLINK_TAP = 1, VU_SWITCH_UPLINK_VXLAN = 2 };

/* Per port (and for the uplink), counted by the switch. */
struct vu_switch_stats {
    uint64_t in;            /* frames that entered the switch from this port */
    uint64_t forwarded;     /* ... sent to the one port their destination was learned on */
    uint64_t flooded;       /* ... sent to every other port (broadcast, multicast, unknown) */
    uint64_t dropped;       /* ... sent nowhere (bad source, destination is the source port) */
    uint64_t out;           /* frames delivered to this port */
    uint64_t out_dropped;   /* frames for this port it could not take */
};

struct vu_vxlan_stats {
    uint64_t rx_short, rx_bad_flags, rx_bad_vni, rx_bad_source, tx_errors;
};

struct vu_switch;

struct vu_switch *vu_switch_new(void);
/* Stops the uplink thread and frees the switch; every port must be removed. */
void vu_switch_free(struct vu_switch *sw);

/* A port for n with nqp queue pairs. Returns the port number or -vu_err.
 * Binds n's transmit to the port (vu_net_bind_port); n must use
 * VU_NET_BACKEND_SWITCH. */
int vu_switch_add_port(struct vu_switch *sw, struct vu_net_dev *n, uint32_t nqp);
/* Detaches and forgets the port; n is no longer touched afterwards. */
void vu_switch_remove_port(struct vu_switch *sw, int port);
/* A session serves the port: from now on frames are delivered to n
 * (vu_net_port_deliver). */
int vu_switch_attach(struct vu_switch *sw, int port);
/* Before the session's queues are freed: no delivery touches them after
 * this returns. Also forgets the addresses learned on the port. */
void vu_switch_detach(struct vu_switch *sw, int port);

/* Uplinks (before vu_switch_start; the caller owns fd and closes it after
 * vu_switch_stop). A TAP without IFF_VNET_HDR: plain Ethernet frames. */
int vu_switch_set_tap(struct vu_switch *sw, int fd);
/* A bound UDP socket; remote is a 4 (AF_INET) or 16 (AF_INET6) byte address. */
int vu_switch_set_vxlan(struct vu_switch *sw, int fd, uint32_t vni, int family,
                        const uint8_t *remote, uint16_t port);
/* Starts the thread that receives from the uplink. */
int vu_switch_start(struct vu_switch *sw);
/* Joins the uplink thread; nothing is sent on the uplink fd afterwards. */
void vu_switch_stop(struct vu_switch *sw);

/* A frame into the switch as if `port` had sent it (RARP after migration).
 * From any thread that holds no device lock. */
int vu_switch_send(struct vu_switch *sw, int port, const uint8_t *data, uint32_t len);

/* Where mac was learned: a port, VU_SWITCH_UPLINK, or -1. */
int vu_switch_lookup(struct vu_switch *sw, const uint8_t *mac);
/* Learned addresses not yet aged out. */
uint32_t vu_switch_mac_count(struct vu_switch *sw);
void vu_switch_set_aging(struct vu_switch *sw, uint32_t ms);
/* Copies the counters of port (or VU_SWITCH_UPLINK); -VU_ERR_INVAL if none. */
int vu_switch_get_stats(struct vu_switch *sw, int port, struct vu_switch_stats *out);
void vu_switch_get_vxlan_stats(struct vu_switch *sw, struct vu_vxlan_stats *out);

#endif
