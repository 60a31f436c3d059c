/* Byte-range helpers over iovec arrays, shared by the device back-ends.
 * Bounded by the array length; a range past the end is reported, never read. */
#ifndef VU_IOV_H
#define VU_IOV_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

/* Copies len bytes starting at byte `skip` of iov[0..n) into dst. False
 * when the iovecs hold fewer bytes than that. */
static inline bool vu_iov_gather(const struct iovec *iov, uint32_t n, uint64_t skip,
                                 void *dst, size_t len)
{
    uint8_t *out = dst;
    for (uint32_t i = 0; i < n && len > 0; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        size_t chunk = iov[i].iov_len - skip;
        if (chunk > len)
            chunk = len;
        memcpy(out, (const uint8_t *)iov[i].iov_base + skip, chunk);
        out += chunk;
        len -= chunk;
        skip = 0;
    }
    return len == 0;
}

/* Writes to dst (room for n entries) the iovecs covering bytes
 * [skip, skip+len) of src[0..n); returns how many. dst may be src: each
 * entry is read before any entry at or after it is written. */
static inline uint32_t vu_iov_slice(struct iovec *dst, const struct iovec *src, uint32_t n,
                                    uint64_t skip, uint64_t len)
{
    uint32_t out = 0;
    for (uint32_t i = 0; i < n && len > 0; i++) {
        size_t have = src[i].iov_len;
        uint8_t *base = src[i].iov_base;
        if (skip >= have) {
            skip -= have;
            continue;
        }
        size_t chunk = have - skip;
        if (chunk > len)
            chunk = len;
        dst[out].iov_base = base + skip;
        dst[out].iov_len = chunk;
        out++;
        len -= chunk;
        skip = 0;
    }
    return out;
}

#endif
