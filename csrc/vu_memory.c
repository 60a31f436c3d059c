/* Guest memory: mappings shared between region tables, the tables, and
 * address translation.
 *
 * Regions come from SET_MEM_TABLE / ADD_MEM_REG with an fd each. Every
 * translation checks the whole [addr, addr+len) range, so a descriptor can
 * never make us touch a byte outside what the front-end shared. A table is
 * never changed once installed in a device: changes build a new one, and the
 * old one lives on for the requests that still use it (vu_memory.h). */
#include "vu_memory.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static uint64_t next_map_id = 1;
static uint32_t maps_detached;

/* Mappings ------------------------------------------------------------------- */

void vu_map_get(struct vu_map *map)
{
    __atomic_add_fetch(&map->refs, 1, __ATOMIC_RELAXED);
}

void vu_map_put(struct vu_map *map)
{
    if (__atomic_sub_fetch(&map->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    munmap(map->base, map->len);
    if (map->detached)
        __atomic_sub_fetch(&maps_detached, 1, __ATOMIC_RELAXED);
    free(map);
}

uint32_t vu_maps_detached(void)
{
    return __atomic_load_n(&maps_detached, __ATOMIC_RELAXED);
}

static struct vu_map *map_new(uint8_t *base, size_t len)
{
    struct vu_map *map = calloc(1, sizeof(*map));
    if (!map)
        return NULL;
    map->base = base;
    map->len = len;
    map->id = __atomic_fetch_add(&next_map_id, 1, __ATOMIC_RELAXED);
    map->refs = 1;
    return map;
}

/* Private pages over the guest's: whatever still points here keeps working,
 * and nothing reaches the front-end's memory through it any more. They are
 * zero but for the bytes of `keep` inside the mapping, copied from the
 * guest's pages first: what requests in flight still read (a late write
 * stores the guest's data, not zeroes). The new pages replace the old in
 * one step (MAP_FIXED, or mremap of the filled copy), so a concurrent
 * access sees either the guest's page or ours, never a hole. */
static void map_detach(struct vu_map *map, const struct iovec *keep, uint32_t nkeep)
{
    if (map->detached)
        return;
    uintptr_t lo = (uintptr_t)map->base, hi = lo + map->len;
    uint8_t *copy = NULL;
    for (uint32_t i = 0; i < nkeep; i++) {
        uintptr_t start = (uintptr_t)keep[i].iov_base, end = start + keep[i].iov_len;
        if (start < lo)
            start = lo;
        if (end > hi)
            end = hi;
        if (start >= end)
            continue;
        if (!copy) {
            copy = mmap(NULL, map->len, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (copy == MAP_FAILED) {
                copy = NULL;
                break;   /* zeroes, as without anything to keep */
            }
        }
        memcpy(copy + (start - lo), (const void *)start, end - start);
    }
    void *p;
    if (copy) {
        p = mremap(copy, map->len, map->len, MREMAP_MAYMOVE | MREMAP_FIXED, map->base);
        if (p == MAP_FAILED)
            munmap(copy, map->len);
    } else {
        p = mmap(map->base, map->len, PROT_READ | PROT_WRITE,
                 MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    }
    if (p == MAP_FAILED) {
        /* Out of address-space bookkeeping: keep the pages rather than
         * leave a hole something could fault on. */
        return;
    }
    madvise(map->base, map->len, MADV_DONTDUMP);
    map->detached = true;
    __atomic_add_fetch(&maps_detached, 1, __ATOMIC_RELAXED);
}

bool vu_fd_mappable_size(int fd, const struct stat *st, uint64_t *size)
{
    if (S_ISREG(st->st_mode)) {
        *size = (uint64_t)st->st_size;
        return true;
    }
    if (S_ISBLK(st->st_mode)) {
        /* fstat says 0 for a block device: ask the device. */
        uint64_t bytes;
        *size = ioctl(fd, BLKGETSIZE64, &bytes) == 0 ? bytes : 0;
        return true;
    }
    return false;
}

/* Tables ----------------------------------------------------------------------- */

struct vu_mem *vu_mem_new(void)
{
    struct vu_mem *mem = calloc(1, sizeof(struct vu_mem));
    if (mem)
        mem->pins = 1;
    return mem;
}

void vu_mem_pin(struct vu_mem *mem)
{
    __atomic_add_fetch(&mem->pins, 1, __ATOMIC_RELAXED);
}

void vu_mem_unpin(struct vu_mem *mem)
{
    if (!mem || __atomic_sub_fetch(&mem->pins, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    for (uint32_t i = 0; i < mem->nregions; i++)
        vu_map_put(mem->regions[i].map);
    free(mem);
}

struct vu_mem *vu_mem_copy(const struct vu_mem *src)
{
    struct vu_mem *mem = vu_mem_new();
    if (!mem)
        return NULL;
    memcpy(mem->regions, src->regions, src->nregions * sizeof(struct vu_region));
    mem->nregions = src->nregions;
    for (uint32_t i = 0; i < mem->nregions; i++)
        vu_map_get(mem->regions[i].map);
    return mem;
}

struct vu_mem *vu_mem_reseat(const struct vu_mem *src, int *err)
{
    struct vu_mem *mem = vu_mem_new();
    if (!mem) {
        *err = -VU_ERR_NOMEM;
        return NULL;
    }
    for (uint32_t i = 0; i < src->nregions; i++) {
        const struct vu_region *r = &src->regions[i];
        /* The same map may back several regions: make one new view of it. */
        struct vu_map *fresh = NULL;
        for (uint32_t j = 0; j < i; j++) {
            if (src->regions[j].map == r->map) {
                fresh = mem->regions[j].map;
                vu_map_get(fresh);
                break;
            }
        }
        if (!fresh) {
            /* old_size 0 on a shared mapping: a second mapping of the same
             * pages, no fd needed. */
            void *p = mremap(r->map->base, 0, r->map->len, MREMAP_MAYMOVE);
            if (p == MAP_FAILED || !(fresh = map_new(p, r->map->len))) {
                if (p != MAP_FAILED)
                    munmap(p, r->map->len);
                mem->nregions = i;
                vu_mem_unpin(mem);
                *err = p == MAP_FAILED ? -VU_ERR_MMAP : -VU_ERR_NOMEM;
                return NULL;
            }
            madvise(p, r->map->len, MADV_DONTDUMP);
            fresh->file_dev = r->map->file_dev;
            fresh->file_ino = r->map->file_ino;
            fresh->file_off = r->map->file_off;
        }
        mem->regions[i] = *r;
        mem->regions[i].map = fresh;
        mem->regions[i].host = fresh->base + (r->host - r->map->base);
        mem->nregions = i + 1;
    }
    return mem;
}

static bool table_has_map(const struct vu_mem *mem, const struct vu_map *map)
{
    for (uint32_t i = 0; mem && i < mem->nregions; i++)
        if (mem->regions[i].map == map)
            return true;
    return false;
}

bool vu_mem_reaches_guest(const struct vu_mem *mem)
{
    for (uint32_t i = 0; mem && i < mem->nregions; i++)
        if (!mem->regions[i].map->detached)
            return true;
    return false;
}

void vu_mem_detach_all(struct vu_mem *mem, const struct iovec *keep, uint32_t nkeep)
{
    for (uint32_t i = 0; mem && i < mem->nregions; i++)
        map_detach(mem->regions[i].map, keep, nkeep);
}

/* Whether `now` still maps every page of the file that `map` holds (the
 * front-end split, merged or moved regions over the same memory): those
 * pages are still the guest's, and what a late request writes through
 * `map` must reach them. */
static bool table_has_pages(const struct vu_mem *now, const struct vu_map *map)
{
    uint64_t at = map->file_off, end = map->file_off + map->len;
    while (at < end) {
        uint64_t next = at;
        for (uint32_t i = 0; now && i < now->nregions; i++) {
            const struct vu_map *m = now->regions[i].map;
            if (m->file_dev == map->file_dev && m->file_ino == map->file_ino && !m->detached &&
                m->file_off <= at && at < m->file_off + m->len && m->file_off + m->len > next)
                next = m->file_off + m->len;
        }
        if (next == at)
            return false;
        at = next;
    }
    return true;
}

void vu_mem_retire(struct vu_mem *old, const struct vu_mem *now, const struct iovec *keep,
                   uint32_t nkeep, bool orphaning)
{
    if (!old)
        return;
    /* Detach only what someone else still holds: a mapping nobody else
     * holds is unmapped by the unpin below anyway. */
    bool held = __atomic_load_n(&old->pins, __ATOMIC_ACQUIRE) > 1;
    for (uint32_t i = 0; i < old->nregions; i++) {
        struct vu_map *map = old->regions[i].map;
        if (table_has_map(now, map) || (!orphaning && table_has_pages(now, map)))
            continue;
        if (held || __atomic_load_n(&map->refs, __ATOMIC_ACQUIRE) > 1)
            map_detach(map, keep, nkeep);
    }
    vu_mem_unpin(old);
}

/* [a, a+alen) and [b, b+blen) intersect; lengths are non-zero and checked
 * for overflow by the caller. */
static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

/* A mapping of `reuse` holding exactly these pages of this file. */
static struct vu_map *find_reusable(const struct vu_mem *reuse, uint64_t gpa, uint64_t size,
                                    uint64_t uva, uint64_t mmap_offset, const struct stat *st)
{
    for (uint32_t i = 0; reuse && i < reuse->nregions; i++) {
        const struct vu_region *r = &reuse->regions[i];
        if (r->gpa == gpa && r->size == size && r->uva == uva && r->mmap_offset == mmap_offset &&
            r->map->file_dev == (uint64_t)st->st_dev && r->map->file_ino == (uint64_t)st->st_ino &&
            !r->map->detached)
            return r->map;
    }
    return NULL;
}

int vu_mem_add_region(struct vu_mem *mem, uint64_t gpa, uint64_t size,
                      uint64_t uva, uint64_t mmap_offset, int fd,
                      const struct vu_mem *reuse)
{
    if (size == 0 || gpa + size < gpa || uva + size < uva ||
        mmap_offset + size < mmap_offset || fd < 0)
        return -VU_ERR_INVAL;
    if (size > (uint64_t)SIZE_MAX / 2)
        return -VU_ERR_INVAL;
    for (uint32_t i = 0; i < mem->nregions; i++) {
        struct vu_region *r = &mem->regions[i];
        if (r->gpa == gpa && r->size == size && r->uva == uva && r->mmap_offset == mmap_offset) {
            r->refs++;
            return 0;
        }
        if (ranges_overlap(gpa, size, r->gpa, r->size) ||
            ranges_overlap(uva, size, r->uva, r->size))
            return -VU_ERR_REGION_OVERLAP;
    }
    if (mem->nregions >= VU_MAX_REGIONS)
        return -VU_ERR_TOO_MANY_REGIONS;

    /* A mapping past the end of a file is SIGBUS on first touch, not an
     * error we could return: refuse it now. */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -VU_ERR_INVAL;
    uint64_t fd_size;
    if (vu_fd_mappable_size(fd, &st, &fd_size) && mmap_offset + size > fd_size)
        return -VU_ERR_REGION_BEYOND_FD;

    /* mmap needs a page-aligned offset: map from the page holding
     * mmap_offset and remember the slack. */
    long page = sysconf(_SC_PAGESIZE);
    uint64_t slack = mmap_offset % (uint64_t)page;
    struct vu_map *map = find_reusable(reuse, gpa, size, uva, mmap_offset, &st);
    if (map) {
        vu_map_get(map);
    } else {
        size_t map_len = (size_t)(size + slack);
        void *base = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED,
                          fd, (off_t)(mmap_offset - slack));
        if (base == MAP_FAILED)
            return -VU_ERR_MMAP;
        /* Guest memory is not ours to dump. */
        madvise(base, map_len, MADV_DONTDUMP);
        map = map_new(base, map_len);
        if (!map) {
            munmap(base, map_len);
            return -VU_ERR_NOMEM;
        }
        map->file_dev = (uint64_t)st.st_dev;
        map->file_ino = (uint64_t)st.st_ino;
        map->file_off = mmap_offset - slack;
    }

    uint32_t pos = 0;
    while (pos < mem->nregions && mem->regions[pos].gpa < gpa)
        pos++;
    memmove(&mem->regions[pos + 1], &mem->regions[pos],
            (mem->nregions - pos) * sizeof(struct vu_region));
    mem->regions[pos] = (struct vu_region){
        .gpa = gpa, .size = size, .uva = uva, .mmap_offset = mmap_offset,
        .host = map->base + slack, .map = map, .refs = 1,
    };
    mem->nregions++;
    mem->last_hit = 0;
    return 0;
}

/* The region is named by its guest address, user address and size
 * (vhost-user.rst, REM_MEM_REG); its mmap offset is not part of the name. */
int vu_mem_remove_region(struct vu_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        struct vu_region *r = &mem->regions[i];
        if (r->gpa == gpa && r->size == size && r->uva == uva) {
            if (--r->refs > 0)
                return 0;
            vu_map_put(r->map);
            memmove(&mem->regions[i], &mem->regions[i + 1],
                    (mem->nregions - i - 1) * sizeof(struct vu_region));
            mem->nregions--;
            memset(&mem->regions[mem->nregions], 0, sizeof(struct vu_region));
            mem->last_hit = 0;
            return 0;
        }
    }
    return -VU_ERR_REGION_NOT_FOUND;
}

/* Translation ----------------------------------------------------------------- */

/* Region containing gpa, or NULL. */
static struct vu_region *find_gpa(struct vu_mem *mem, uint64_t gpa)
{
    uint32_t hit = mem->last_hit;
    if (hit < mem->nregions) {
        struct vu_region *r = &mem->regions[hit];
        if (gpa - r->gpa < r->size)
            return r;
    }
    uint32_t lo = 0, hi = mem->nregions;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        struct vu_region *r = &mem->regions[mid];
        if (gpa < r->gpa)
            hi = mid;
        else if (gpa - r->gpa >= r->size)
            lo = mid + 1;
        else {
            mem->last_hit = mid;
            return r;
        }
    }
    return NULL;
}

void *vu_gpa_to_hva(struct vu_mem *mem, uint64_t gpa, uint64_t len)
{
    struct vu_region *r = find_gpa(mem, gpa);
    if (!r)
        return NULL;
    uint64_t off = gpa - r->gpa;
    if (len > r->size - off)
        return NULL;
    return r->host + off;
}

void *vu_uva_to_hva(struct vu_mem *mem, uint64_t uva, uint64_t len)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        struct vu_region *r = &mem->regions[i];
        uint64_t off = uva - r->uva;
        if (uva >= r->uva && off < r->size && len <= r->size - off)
            return r->host + off;
    }
    return NULL;
}

int vu_gpa_to_iov(struct vu_mem *mem, uint64_t gpa, uint64_t len,
                  struct iovec *iov, uint32_t *n, uint32_t max)
{
    if (gpa + len < gpa)
        return -VU_ERR_ADDR_UNMAPPED;
    while (len > 0) {
        struct vu_region *r = find_gpa(mem, gpa);
        if (!r)
            return -VU_ERR_ADDR_UNMAPPED;
        if (*n >= max)
            return -VU_ERR_TOO_MANY_SEGMENTS;
        uint64_t off = gpa - r->gpa;
        uint64_t chunk = r->size - off;
        if (chunk > len)
            chunk = len;
        iov[*n].iov_base = r->host + off;
        iov[*n].iov_len = (size_t)chunk;
        (*n)++;
        gpa += chunk;
        len -= chunk;
    }
    return 0;
}

uint64_t vu_hva_to_gpa(struct vu_mem *mem, const void *hva)
{
    const uint8_t *p = hva;
    for (uint32_t i = 0; i < mem->nregions; i++) {
        struct vu_region *r = &mem->regions[i];
        if (p >= r->host && (uint64_t)(p - r->host) < r->size)
            return r->gpa + (uint64_t)(p - r->host);
    }
    return UINT64_MAX;
}

struct vu_map *vu_mem_map_of(struct vu_mem *mem, const void *hva, uint64_t len, uint64_t *off)
{
    const uint8_t *p = hva;
    for (uint32_t i = 0; i < mem->nregions; i++) {
        struct vu_map *map = mem->regions[i].map;
        if (p >= map->base && (uint64_t)(p - map->base) < map->len &&
            len <= map->len - (uint64_t)(p - map->base)) {
            *off = (uint64_t)(p - map->base);
            return map;
        }
    }
    return NULL;
}
