/* libFuzzer target: the region table and address translation.
 *
 * Input: a region table (count, then gpa/size/uva/offset per region, sizes
 * in pages of one memfd), then translation queries. Each result is checked
 * against the table: every iovec / pointer must lie inside one region's
 * mapping and map back to the gpa it came from, and a failure must really
 * be a range that is not wholly mapped. */
#include "vu_memory.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096u
#define FILE_PAGES 16u
#define MAX_TABLE 8
#define MAX_IOV 8

static int memfd = -1;

struct reader { const uint8_t *p; size_t left; };

static uint64_t take(struct reader *r, size_t n)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n && r->left; i++, r->left--)
        v |= (uint64_t)*r->p++ << (8 * i);
    return v;
}

static void fail(const char *what, uint64_t gpa, uint64_t len)
{
    fprintf(stderr, "mem_translate: %s (gpa %#llx len %#llx)\n", what,
            (unsigned long long)gpa, (unsigned long long)len);
    abort();
}

/* The region holding host pointer p (and n bytes after it), or NULL. */
static const struct vu_region *host_region(const struct vu_mem *mem, const uint8_t *p, size_t n)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vu_region *r = &mem->regions[i];
        if (p >= r->host && (uint64_t)(p - r->host) <= r->size &&
            n <= r->size - (uint64_t)(p - r->host))
            return r;
    }
    return NULL;
}

/* Whether [gpa, gpa+len) is wholly covered by the table (reference model). */
static bool covered(const struct vu_mem *mem, uint64_t gpa, uint64_t len)
{
    if (gpa + len < gpa)
        return false;
    while (len) {
        const struct vu_region *hit = NULL;
        for (uint32_t i = 0; i < mem->nregions; i++)
            if (gpa >= mem->regions[i].gpa && gpa - mem->regions[i].gpa < mem->regions[i].size)
                hit = &mem->regions[i];
        if (!hit)
            return false;
        uint64_t chunk = hit->size - (gpa - hit->gpa);
        if (chunk >= len)
            return true;
        gpa += chunk;
        len -= chunk;
    }
    return true;
}

static void check_iov(struct vu_mem *mem, uint64_t gpa, uint64_t len)
{
    struct iovec iov[MAX_IOV];
    uint32_t n = 0;
    int rc = vu_gpa_to_iov(mem, gpa, len, iov, &n, MAX_IOV);
    if (n > MAX_IOV)
        fail("more iovecs than allowed", gpa, len);
    if (rc == 0) {
        uint64_t at = gpa, total = 0;
        for (uint32_t i = 0; i < n; i++) {
            if (!host_region(mem, iov[i].iov_base, iov[i].iov_len))
                fail("iovec outside every region", gpa, len);
            if (vu_hva_to_gpa(mem, iov[i].iov_base) != at)
                fail("iovec maps back to another gpa", gpa, len);
            at += iov[i].iov_len;
            total += iov[i].iov_len;
        }
        if (total != len)
            fail("iovecs do not add up to the length", gpa, len);
    } else if (rc == -VU_ERR_ADDR_UNMAPPED) {
        if (covered(mem, gpa, len))
            fail("mapped range reported unmapped", gpa, len);
    } else if (rc != -VU_ERR_TOO_MANY_SEGMENTS) {
        fail("unexpected error", gpa, (uint64_t)-rc);
    }
}

/* The region holding gpa by a plain scan (reference model), or NULL. */
static const struct vu_region *gpa_region(const struct vu_mem *mem, uint64_t gpa)
{
    for (uint32_t i = 0; i < mem->nregions; i++)
        if (gpa >= mem->regions[i].gpa && gpa - mem->regions[i].gpa < mem->regions[i].size)
            return &mem->regions[i];
    return NULL;
}

static void check_hva(struct vu_mem *mem, uint64_t gpa, uint64_t len)
{
    uint8_t *p = vu_gpa_to_hva(mem, gpa, len);
    const struct vu_region *r = gpa_region(mem, gpa);
    bool fits = r && len <= r->size - (gpa - r->gpa);
    if (!fits) {
        if (p)
            fail("gpa_to_hva translated a range outside one region", gpa, len);
        return;
    }
    if (p != r->host + (gpa - r->gpa))
        fail("gpa_to_hva gave the wrong pointer (or none)", gpa, len);
}

static void check_uva(struct vu_mem *mem, uint64_t uva, uint64_t len)
{
    uint8_t *p = vu_uva_to_hva(mem, uva, len);
    if (p && !host_region(mem, p, len))
        fail("uva_to_hva outside every region", uva, len);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (memfd < 0) {
        memfd = memfd_create("fuzz-mem", MFD_CLOEXEC);
        if (memfd < 0 || ftruncate(memfd, FILE_PAGES * PAGE) < 0)
            abort();
    }
    struct reader in = {data, size};
    struct vu_mem *mem = vu_mem_new();
    uint32_t nregions = take(&in, 1) % (MAX_TABLE + 1);
    for (uint32_t i = 0; i < nregions; i++) {
        /* Small gpa/uva steps make overlaps and adjacency likely; the top
         * bit of each gives the far end of the address space too. */
        uint64_t gpa = take(&in, 2) * PAGE / 4;
        if (gpa & 0x2000)
            gpa = UINT64_MAX - gpa;
        uint64_t pages = take(&in, 1) % FILE_PAGES + 1;
        uint64_t uva = take(&in, 2) * PAGE;
        uint64_t off = (take(&in, 1) % FILE_PAGES) * PAGE + take(&in, 1) % 2 * 512;
        if (off + pages * PAGE > FILE_PAGES * PAGE)
            pages = (FILE_PAGES * PAGE - off) / PAGE;
        if (pages == 0)
            continue;
        vu_mem_add_region(mem, gpa, pages * PAGE, uva, off, memfd, NULL);
    }
    while (in.left >= 5) {
        uint8_t op = take(&in, 1);
        uint64_t addr = take(&in, 4) * 16;
        if (op & 0x80)
            addr = UINT64_MAX - addr;
        uint64_t len = take(&in, 3);
        if (op & 0x40)
            len = UINT64_MAX - len;
        switch (op % 4) {
        case 0: check_iov(mem, addr, len); break;
        case 1: check_hva(mem, addr, len); break;
        case 2: check_uva(mem, addr, len); break;
        default:
            if (mem->nregions) {
                struct vu_region *r = &mem->regions[addr % mem->nregions];
                vu_mem_remove_region(mem, r->gpa, r->size, r->uva);
            }
        }
    }
    vu_mem_unpin(mem);
    return 0;
}
