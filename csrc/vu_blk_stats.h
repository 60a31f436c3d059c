/* virtio-blk metrics: what completed, how much moved, how long it took. */
#ifndef VU_BLK_STATS_H
#define VU_BLK_STATS_H

#include "vu_blk_request.h"

/* Latency histogram: bucket i counts requests under 2^i us, the last one
 * everything slower (vhostuser.blk.device.LATENCY_BOUNDS_US). */
#define VU_BLK_LAT_BUCKETS 26

/* Counted when a request completes, by type whatever its outcome; bytes
 * only for requests that succeeded. */
struct vu_blk_stats {
    uint64_t reads, writes, flushes, discards, write_zeroes, others, errors, unsupported;
    uint64_t bytes_read, bytes_written;
    uint64_t completed;
    uint64_t latency_ns_sum;
    uint64_t latency_us[VU_BLK_LAT_BUCKETS];
    /* write-through writes completed, and the group syncs that made them
     * and the io_uring engine's FLUSHes stable (fewer: group commit) */
    uint64_t stable_writes, stable_syncs;
};

/* Counts r's completion with `status`; now 0: the caller records the
 * latency itself (for a whole batch at once, vu_blk_stats_latency). */
void vu_blk_stats_count(struct vu_blk_stats *st, const struct vu_blk_req *r, uint8_t status,
                        uint64_t now);
/* `count` requests that each took ns nanoseconds. */
void vu_blk_stats_latency(struct vu_blk_stats *st, uint64_t ns, uint64_t count);

#endif
