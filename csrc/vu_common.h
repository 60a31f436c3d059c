/* Shared definitions for the vhostuser C data plane. */
#ifndef VU_COMMON_H
#define VU_COMMON_H

#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>
#include <sys/uio.h>

/* One error enum for the whole data plane: every failing call returns one of
 * these (negated); vhostuser/errors.py maps each to an exception type. */
enum vu_err {
    VU_OK = 0,
    VU_ERR_NOMEM = 1,            /* allocation failed */
    VU_ERR_INVAL = 2,            /* bad argument from the control plane */
    VU_ERR_MMAP = 3,             /* mmap of a region fd failed */
    VU_ERR_REGION_OVERLAP = 4,   /* new region overlaps an existing one */
    VU_ERR_TOO_MANY_REGIONS = 5, /* more than VU_MAX_REGIONS */
    VU_ERR_REGION_NOT_FOUND = 6, /* REM_MEM_REG of a region we don't have */
    VU_ERR_ADDR_UNMAPPED = 7,    /* guest/user address not inside a region */
    VU_ERR_RING_UNMAPPED = 8,    /* ring address does not translate */
    VU_ERR_BAD_QUEUE_SIZE = 9,   /* not a power of two (split) or > max */
    VU_ERR_AVAIL_IDX_JUMP = 10,  /* avail idx moved more than the ring size */
    VU_ERR_DESC_INDEX = 11,      /* descriptor index beyond the table */
    VU_ERR_CHAIN_LOOP = 12,      /* chain longer than the table: a loop */
    VU_ERR_NESTED_INDIRECT = 13, /* indirect descriptor inside an indirect table */
    VU_ERR_INDIRECT_SIZE = 14,   /* indirect table length not a multiple of 16 or 0 */
    VU_ERR_INDIRECT_NEXT = 15,   /* indirect descriptor with NEXT set */
    VU_ERR_WRITE_BEFORE_READ = 16, /* device-readable after device-writable */
    VU_ERR_TOO_MANY_SEGMENTS = 17, /* more iovecs than VU_MAX_IOV */
    VU_ERR_INDIRECT_NOT_NEGOTIATED = 18,
    VU_ERR_BAD_USED_ID = 19,     /* push of an element that is not in flight */
    VU_ERR_QUEUE_BROKEN = 20,    /* queue already broken; reset needed */
    VU_ERR_QUEUE_NOT_READY = 21, /* queue not configured / started */
    VU_ERR_SYS = 22,             /* system call failure (errno logged) */
    VU_ERR_LOG_RANGE = 23,       /* dirty-log write beyond the log size */
    VU_ERR_BAD_HEAD = 24,        /* avail ring head beyond the table */
    VU_ERR_INFLIGHT = 25,        /* inflight region malformed */
    VU_ERR_ZERO_CHAIN = 26,      /* chain without the byte the device must answer in */
    VU_ERR_BAD_BASE = 27,        /* ring index (SET_VRING_BASE) outside the ring */
    VU_ERR_REGION_BEYOND_FD = 28, /* region extends past the end of its fd */
    VU_ERR_INFLIGHT_BUSY = 29,   /* requests of before a reset still hold the ring's slots */
    VU_ERR_KICK_FD = 30,         /* kick fd at end of file or unreadable (writer gone) */
    VU_ERR__COUNT
};

#define VU_MAX_REGIONS 509     /* VHOST_USER_MAX_RAM_SLOTS in QEMU */
#define VU_MAX_QUEUE_SIZE 32768
#define VU_MAX_IOV 1024        /* IOV_MAX: what preadv/writev take in one call */

#define VU_LIKELY(x) __builtin_expect(!!(x), 1)
#define VU_UNLIKELY(x) __builtin_expect(!!(x), 0)

/* The guest and the front-end run concurrently with us on other CPUs: every
 * ring access that orders against theirs goes through these. */
#define vu_smp_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define vu_smp_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#define vu_smp_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define VU_READ_ONCE(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define VU_WRITE_ONCE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

/* Asks for `lines` cache lines from p ahead of use. Ring entries and frames
 * were written a moment ago by the driver on another CPU: fetching a burst's
 * lines together overlaps those misses instead of taking them one after
 * another. A hint only: never faults. */
static inline void vu_prefetch(const void *p, unsigned lines, int for_write)
{
    const char *c = p;
    for (unsigned i = 0; i < lines; i++) {
        if (for_write)
            __builtin_prefetch(c + 64 * i, 1);
        else
            __builtin_prefetch(c + 64 * i, 0);
    }
}

const char *vu_strerror(int err);

#endif
