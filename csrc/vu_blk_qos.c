/* QoS for a virtio-blk device: the queue handler asks the device's token
 * buckets (vu_qos.c) before each request; a queue out of tokens sleeps on a
 * timerfd in its worker's epoll instead of spinning or blocking the worker. */
#include "vu_blk_engine.h"
#include "vu_worker.h"

#include <sys/timerfd.h>
#include <unistd.h>

void vu_blk_set_qos(struct vu_blk_dev *b, uint64_t iops, uint64_t bps, uint64_t iops_burst,
                    uint64_t bps_burst)
{
    vu_qos_set(&b->qos, iops, bps, iops_burst, bps_burst);
    /* Queues asleep on the old limits look again now. */
    struct itimerspec soon = {.it_value = {.tv_nsec = 1}};
    for (uint32_t q = 0; q < VU_BLK_MAX_QUEUES; q++)
        if (b->qos_timer[q] >= 0)
            timerfd_settime(b->qos_timer[q], 0, &soon, NULL);
}

bool vu_blk_qos_sleep(struct vu_blk_dev *b, struct vu_vq *vq, uint64_t wait_ns)
{
    uint32_t q = vq->index;
    if (q >= VU_BLK_MAX_QUEUES || !vq->worker)
        return false;
    if (b->qos_timer[q] < 0) {
        b->qos_timer[q] = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (b->qos_timer[q] < 0)
            return false;
    }
    if (b->timer_worker[q] != vq->worker->id) {
        if (vu_worker_add_event_fd(vq->worker, vq, b->qos_timer[q], false) < 0)
            return false;
        b->timer_worker[q] = vq->worker->id;
    }
    struct itimerspec when = {.it_value = {.tv_sec = (time_t)(wait_ns / 1000000000ull),
                                           .tv_nsec = (long)(wait_ns % 1000000000ull)}};
    b->throttled[q]++;
    return timerfd_settime(b->qos_timer[q], 0, &when, NULL) == 0;
}

void vu_blk_qos_woken(struct vu_blk_dev *b, uint32_t q)
{
    if (b->qos_timer[q] >= 0) {
        uint64_t expirations;
        ssize_t rd = read(b->qos_timer[q], &expirations, sizeof(expirations));  /* TFD_NONBLOCK */
        (void)rd;
    }
}

void vu_blk_qos_close(struct vu_blk_dev *b)
{
    for (uint32_t q = 0; q < VU_BLK_MAX_QUEUES; q++) {
        if (b->qos_timer[q] >= 0)
            close(b->qos_timer[q]);
        b->qos_timer[q] = -1;
    }
}
