/* Per-device QoS token buckets (vu_qos.h): the arithmetic only; a queue
 * that must wait sleeps in vu_blk_qos.c. */
#include "vu_qos.h"

#include <time.h>

/* Below this a wait is not worth a timer: the caller retries at once. */
#define MIN_WAIT_NS 50000ull
/* Refills never cover more than this, so a long idle spell can't overflow. */
#define MAX_REFILL_NS 60000000000ull

uint64_t vu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void vu_qos_init(struct vu_qos *q)
{
    pthread_mutex_init(&q->lock, NULL);
    q->enabled = false;
}

void vu_qos_destroy(struct vu_qos *q)
{
    pthread_mutex_destroy(&q->lock);
}

void vu_qos_set(struct vu_qos *q, uint64_t iops, uint64_t bps, uint64_t iops_burst,
                uint64_t bps_burst)
{
    pthread_mutex_lock(&q->lock);
    q->iops_rate = (double)iops;
    q->bps_rate = (double)bps;
    q->iops_burst = (double)(iops_burst ? iops_burst : iops);
    q->bps_burst = (double)(bps_burst ? bps_burst : bps);
    q->iops_level = q->iops_burst;
    q->bps_level = q->bps_burst;
    q->last_ns = vu_now_ns();
    __atomic_store_n(&q->enabled, iops || bps, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&q->lock);
}

static void refill(double *level, double rate, double burst, uint64_t dt_ns)
{
    if (rate <= 0)
        return;
    *level += rate * (double)dt_ns * 1e-9;
    if (*level > burst)
        *level = burst;
}

/* ns until level is above zero again at rate */
static uint64_t wait_for(double level, double rate)
{
    if (rate <= 0 || level > 0)
        return 0;
    return (uint64_t)((-level / rate) * 1e9) + 1;
}

uint64_t vu_qos_admit(struct vu_qos *q, uint64_t now_ns)
{
    if (!__atomic_load_n(&q->enabled, __ATOMIC_ACQUIRE))
        return 0;
    pthread_mutex_lock(&q->lock);
    uint64_t dt = now_ns > q->last_ns ? now_ns - q->last_ns : 0;
    if (dt > MAX_REFILL_NS)
        dt = MAX_REFILL_NS;
    q->last_ns = now_ns;
    refill(&q->iops_level, q->iops_rate, q->iops_burst, dt);
    refill(&q->bps_level, q->bps_rate, q->bps_burst, dt);
    uint64_t wait_iops = wait_for(q->iops_level, q->iops_rate);
    uint64_t wait_bps = wait_for(q->bps_level, q->bps_rate);
    uint64_t wait = wait_iops > wait_bps ? wait_iops : wait_bps;
    if (wait == 0 && q->iops_rate > 0)
        q->iops_level -= 1.0;
    pthread_mutex_unlock(&q->lock);
    return wait == 0 ? 0 : (wait < MIN_WAIT_NS ? MIN_WAIT_NS : wait);
}

void vu_qos_charge_bytes(struct vu_qos *q, uint64_t bytes)
{
    if (!bytes || !__atomic_load_n(&q->enabled, __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&q->lock);
    if (q->bps_rate > 0)
        q->bps_level -= (double)bytes;
    pthread_mutex_unlock(&q->lock);
}

void vu_qos_refund(struct vu_qos *q)
{
    if (!__atomic_load_n(&q->enabled, __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&q->lock);
    if (q->iops_rate > 0 && q->iops_level + 1.0 <= q->iops_burst)
        q->iops_level += 1.0;
    pthread_mutex_unlock(&q->lock);
}
