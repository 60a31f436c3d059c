/* virtio-blk metrics. Each vu_blk_stats has one writer (a queue's worker,
 * or whoever holds the device's async_lock), so counting takes no atomics;
 * Python reads them whole (vhostuser.blk.device). */
#include "vu_blk_stats.h"

static unsigned latency_bucket(uint64_t us)
{
    unsigned i = us ? 64u - (unsigned)__builtin_clzll(us) : 0;
    return i < VU_BLK_LAT_BUCKETS ? i : VU_BLK_LAT_BUCKETS - 1;
}

void vu_blk_stats_latency(struct vu_blk_stats *st, uint64_t ns, uint64_t count)
{
    st->latency_ns_sum += ns * count;
    st->latency_us[latency_bucket(ns / 1000)] += count;
}

void vu_blk_stats_count(struct vu_blk_stats *st, const struct vu_blk_req *r, uint8_t status,
                        uint64_t now)
{
    bool ok = status == VU_BLK_S_OK;
    switch (r->type) {
    case VU_BLK_T_IN:
        st->reads++;
        st->bytes_read += ok ? r->data_len : 0;
        break;
    case VU_BLK_T_OUT:
        st->writes++;
        st->bytes_written += ok ? r->data_len : 0;
        break;
    case VU_BLK_T_FLUSH: st->flushes++; break;
    case VU_BLK_T_DISCARD: st->discards++; break;
    case VU_BLK_T_WRITE_ZEROES:
    case VU_BLK_T_SECURE_ERASE: st->write_zeroes++; break;
    default: st->others++; break;
    }
    if (status == VU_BLK_S_IOERR)
        st->errors++;
    else if (status == VU_BLK_S_UNSUPP)
        st->unsupported++;
    st->completed++;
    if (now && r->start_ns)
        vu_blk_stats_latency(st, now > r->start_ns ? now - r->start_ns : 0, 1);
}
