/* Per-device QoS: token buckets for requests and bytes per second.
 *
 * A request may start while both buckets hold something; it then takes one
 * request token and its bytes, and may leave a bucket in debt. The debt is
 * what makes large requests count fully against the limit without having to
 * know their size before they are popped. */
#ifndef VU_QOS_H
#define VU_QOS_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

struct vu_qos {
    pthread_mutex_t lock;     /* several queues share a device's buckets */
    bool enabled;             /* read unlocked on the hot path: a stale read admits one request */
    double iops_rate, bps_rate;      /* per second; 0 = no limit */
    double iops_burst, bps_burst;    /* bucket sizes */
    double iops_level, bps_level;    /* tokens now; negative = debt */
    uint64_t last_ns;
};

/* The hot path's check: a device without limits pays one load. */
static inline bool vu_qos_active(struct vu_qos *q)
{
    return __atomic_load_n(&q->enabled, __ATOMIC_RELAXED);
}

void vu_qos_init(struct vu_qos *q);
void vu_qos_destroy(struct vu_qos *q);
/* New limits, in force at once; both buckets start full. A burst of 0 means
 * one second's worth of the rate. */
void vu_qos_set(struct vu_qos *q, uint64_t iops, uint64_t bps, uint64_t iops_burst,
                uint64_t bps_burst);
/* 0: a request may start now (one request token is taken). Otherwise how
 * many nanoseconds until one may. */
uint64_t vu_qos_admit(struct vu_qos *q, uint64_t now_ns);
/* Gives back the request token of an admission that found no request. */
void vu_qos_refund(struct vu_qos *q);
/* The admitted request moves this many bytes. */
void vu_qos_charge_bytes(struct vu_qos *q, uint64_t bytes);

uint64_t vu_now_ns(void);

#endif
