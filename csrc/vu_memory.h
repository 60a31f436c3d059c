/* Guest memory: the region table and address translation. */
#ifndef VU_MEMORY_H
#define VU_MEMORY_H

#include "vu_common.h"
#include <pthread.h>

struct vu_region {
    uint64_t gpa;          /* guest-physical start */
    uint64_t size;
    uint64_t uva;          /* front-end user address of the start */
    uint64_t mmap_offset;  /* offset of the region inside the fd */
    uint8_t *host;         /* our mapping of gpa */
    void *map_base;        /* what mmap returned (mapping starts at offset 0 of the page) */
    size_t map_len;
    uint32_t refs;         /* identical ADD_MEM_REGs seen (QEMU sends one per vhost_dev) */
};

struct vu_mem {
    uint32_t nregions;
    /* Sorted by gpa so translation can binary-search. */
    struct vu_region regions[VU_MAX_REGIONS];
    /* Cache of the last region hit: rings and buffers cluster. Index only;
     * validated on use. */
    uint32_t last_hit;
};

struct vu_mem *vu_mem_new(void);
void vu_mem_free(struct vu_mem *mem);
/* Unmaps everything. */
void vu_mem_clear(struct vu_mem *mem);
/* Maps [mmap_offset, mmap_offset+size) of fd. Does not take ownership of fd.
 * Adding a region identical to a mapped one only counts a reference: QEMU's
 * multiqueue net sends each region once per queue pair on one connection. */
int vu_mem_add_region(struct vu_mem *mem, uint64_t gpa, uint64_t size,
                      uint64_t uva, uint64_t mmap_offset, int fd);
/* Drops a reference; unmaps with the last one. */
int vu_mem_remove_region(struct vu_mem *mem, uint64_t gpa, uint64_t size);

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
