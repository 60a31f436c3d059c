/* Guest memory: mappings, region tables, address translation.
 *
 * Lifetime rules (what keeps a byte of guest memory mapped):
 * - A mapping (struct vu_map) lives while a table or a Python view holds it.
 * - A table (struct vu_mem) lives while it is installed in a device, or while
 *   a request popped through it is still in flight (the device counts those
 *   when it retires the table), or while someone pinned it.
 * - When a table is retired, its mappings that the new table does not share
 *   are *detached*: anonymous private memory replaces them at the same
 *   address, holding a copy of what requests in flight read there. A late
 *   completion then writes into memory of our own, never into memory the
 *   front-end has taken back, a late write stores the guest's data, and
 *   nothing faults. The address range is unmapped with the mapping's last
 *   reference.
 */
#ifndef VU_MEMORY_H
#define VU_MEMORY_H

#include "vu_common.h"
#include <pthread.h>

struct vu_map {
    uint8_t *base;         /* what mmap returned */
    size_t len;
    uint64_t id;           /* unique in the process (key of Python's view cache) */
    /* Which pages: a region naming the same file pages reuses the mapping
     * instead of mapping them again (QEMU re-sends unchanged tables). */
    uint64_t file_dev, file_ino, file_off;
    uint32_t refs;         /* atomic: tables and Python views holding it */
    bool detached;         /* guest pages replaced by private memory */
};

struct vu_region {
    uint64_t gpa;          /* guest-physical start */
    uint64_t size;
    uint64_t uva;          /* front-end user address of the start */
    uint64_t mmap_offset;  /* offset of the region inside the fd */
    uint8_t *host;         /* our mapping of gpa */
    struct vu_map *map;
    uint32_t refs;         /* identical ADD_MEM_REGs seen (QEMU sends one per vhost_dev) */
};

struct vu_mem {
    uint32_t nregions;
    /* Sorted by gpa so translation can binary-search. */
    struct vu_region regions[VU_MAX_REGIONS];
    /* Cache of the last region hit: rings and buffers cluster. Index only;
     * validated on use. */
    uint32_t last_hit;
    uint32_t pins;         /* atomic: see the lifetime rules above */
};

/* A new empty table, pinned once for the caller. */
struct vu_mem *vu_mem_new(void);
void vu_mem_pin(struct vu_mem *mem);
/* Drops a pin; the last one frees the table and releases its mappings. */
void vu_mem_unpin(struct vu_mem *mem);
/* A copy sharing every mapping (for ADD/REM_MEM_REG: the installed table is
 * never changed in place), pinned once; NULL without memory. */
struct vu_mem *vu_mem_copy(const struct vu_mem *src);
/* Whether some mapping of mem still reaches the guest's pages (is not
 * detached). */
bool vu_mem_reaches_guest(const struct vu_mem *mem);
/* Detaches every mapping of mem (keeping the bytes of `keep` as
 * vu_mem_retire does): for a table only requests given up on still hold,
 * whose mappings the installed table no longer has. */
void vu_mem_detach_all(struct vu_mem *mem, const struct iovec *keep, uint32_t nkeep);
/* A copy whose mappings are new views of the same guest pages (mremap), so
 * that retiring `src` detaches what requests still hold without taking the
 * memory away from new requests. NULL with *err set when it can't. */
struct vu_mem *vu_mem_reseat(const struct vu_mem *src, int *err);
/* Maps [mmap_offset, mmap_offset+size) of fd. Does not take ownership of fd.
 * Adding a region identical to a mapped one only counts a reference: QEMU's
 * multiqueue net sends each region once per queue pair on one connection.
 * With `reuse`, a region of it naming the same pages of the same file lends
 * its mapping instead of a new mmap. */
int vu_mem_add_region(struct vu_mem *mem, uint64_t gpa, uint64_t size,
                      uint64_t uva, uint64_t mmap_offset, int fd,
                      const struct vu_mem *reuse);
/* Drops a reference to the region named by gpa, size and uva; removes it
 * with the last one. */
int vu_mem_remove_region(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva);
/* `old` is no longer installed (`now` is, possibly NULL): detaches its
 * mappings that `now` does not share, then drops the installed pin. A
 * mapping of pages that `now` maps too (regions split, merged or moved)
 * stays the guest's unless `orphaning` (requests given up on must not reach
 * the guest's memory at all). The bytes of `keep` (what requests in flight
 * still read) keep their contents in the private pages that replace the
 * guest's. */
void vu_mem_retire(struct vu_mem *old, const struct vu_mem *now, const struct iovec *keep,
                   uint32_t nkeep, bool orphaning);

/* Mappings, for Python's views. */
void vu_map_get(struct vu_map *map);
void vu_map_put(struct vu_map *map);
/* The mapping of `mem` that holds [hva, hva+len), with hva's offset in it;
 * NULL if none does. */
struct vu_map *vu_mem_map_of(struct vu_mem *mem, const void *hva, uint64_t len, uint64_t *off);
/* Mappings currently detached and not yet unmapped, process-wide (tests). */
uint32_t vu_maps_detached(void);

struct stat;
/* How far `fd` (fstat'ed into `st`) may be mapped: a regular file's size,
 * a block device's (BLKGETSIZE64; 0 if it can't be told). False for what
 * has no size to tell (a character device such as /dev/dax): mapped as
 * announced. A mapping past the end is SIGBUS on first touch. */
bool vu_fd_mappable_size(int fd, const struct stat *st, uint64_t *size);

/* Host pointer for [gpa, gpa+len) if it lies wholly inside one region, else NULL. */
void *vu_gpa_to_hva(struct vu_mem *mem, uint64_t gpa, uint64_t len);
/* Same for front-end user addresses (ring addresses in SET_VRING_ADDR). */
void *vu_uva_to_hva(struct vu_mem *mem, uint64_t uva, uint64_t len);
/* Splits [gpa, gpa+len) into iovecs across regions. Appends at iov[*n];
 * returns 0 or -VU_ERR_ADDR_UNMAPPED / -VU_ERR_TOO_MANY_SEGMENTS. */
int vu_gpa_to_iov(struct vu_mem *mem, uint64_t gpa, uint64_t len,
                  struct iovec *iov, uint32_t *n, uint32_t max);
/* Reverse lookup for dirty logging: host pointer back to gpa; UINT64_MAX if
 * not inside a region. */
uint64_t vu_hva_to_gpa(struct vu_mem *mem, const void *hva);

#endif
