/* Guest memory region table.
 *
 * Regions come from SET_MEM_TABLE / ADD_MEM_REG with an fd each. Every
 * translation checks the whole [addr, addr+len) range, so a descriptor can
 * never make us touch a byte outside what the front-end shared. */
#include "vu_memory.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct vu_mem *vu_mem_new(void)
{
    return calloc(1, sizeof(struct vu_mem));
}

static void unmap_region(struct vu_region *r)
{
    if (r->map_base)
        munmap(r->map_base, r->map_len);
    memset(r, 0, sizeof(*r));
}

void vu_mem_clear(struct vu_mem *mem)
{
    for (uint32_t i = 0; i < mem->nregions; i++)
        unmap_region(&mem->regions[i]);
    mem->nregions = 0;
    mem->last_hit = 0;
}

void vu_mem_free(struct vu_mem *mem)
{
    if (!mem)
        return;
    vu_mem_clear(mem);
    free(mem);
}

/* [a, a+alen) and [b, b+blen) intersect; lengths are non-zero and checked
 * for overflow by the caller. */
static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

int vu_mem_add_region(struct vu_mem *mem, uint64_t gpa, uint64_t size,
                      uint64_t uva, uint64_t mmap_offset, int fd)
{
    if (size == 0 || gpa + size < gpa || uva + size < uva ||
        mmap_offset + size < mmap_offset || fd < 0)
        return -VU_ERR_INVAL;
    if (size > (uint64_t)SIZE_MAX / 2)
        return -VU_ERR_INVAL;
    if (mem->nregions >= VU_MAX_REGIONS)
        return -VU_ERR_TOO_MANY_REGIONS;
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

    /* A mapping past the end of a file is SIGBUS on first touch, not an
     * error we could return: refuse it now. */
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        mmap_offset + size > (uint64_t)st.st_size)
        return -VU_ERR_REGION_BEYOND_FD;

    /* mmap needs a page-aligned offset: map from the page holding
     * mmap_offset and remember the slack. */
    long page = sysconf(_SC_PAGESIZE);
    uint64_t slack = mmap_offset % (uint64_t)page;
    size_t map_len = (size_t)(size + slack);
    void *base = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED,
                      fd, (off_t)(mmap_offset - slack));
    if (base == MAP_FAILED)
        return -VU_ERR_MMAP;
    /* Guest memory is not ours to dump. */
    madvise(base, map_len, MADV_DONTDUMP);

    uint32_t pos = 0;
    while (pos < mem->nregions && mem->regions[pos].gpa < gpa)
        pos++;
    memmove(&mem->regions[pos + 1], &mem->regions[pos],
            (mem->nregions - pos) * sizeof(struct vu_region));
    mem->regions[pos] = (struct vu_region){
        .gpa = gpa, .size = size, .uva = uva, .mmap_offset = mmap_offset,
        .host = (uint8_t *)base + slack, .map_base = base, .map_len = map_len,
        .refs = 1,
    };
    mem->nregions++;
    mem->last_hit = 0;
    return 0;
}

int vu_mem_remove_region(struct vu_mem *mem, uint64_t gpa, uint64_t size)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        struct vu_region *r = &mem->regions[i];
        if (r->gpa == gpa && r->size == size) {
            if (--r->refs > 0)
                return 0;
            unmap_region(r);
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
