#include "guest.h"
#include "vu_memory.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

static const uint64_t region_gpa[3] = {0x0, 0x4000, 0x10000};

uint8_t *guest_init(struct vu_mem *mem)
{
    int fd = memfd_create("fuzz-guest", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, GUEST_BYTES) < 0) {
        perror("memfd");
        abort();
    }
    uint8_t *view = mmap(NULL, GUEST_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (view == MAP_FAILED) {
        perror("mmap");
        abort();
    }
    for (int i = 0; i < 3; i++) {
        int rc = vu_mem_add_region(mem, region_gpa[i], GUEST_REGION,
                                   GUEST_UVA_BASE + region_gpa[i], (uint64_t)i * GUEST_REGION, fd, NULL);
        if (rc) {
            fprintf(stderr, "vu_mem_add_region: %d\n", rc);
            abort();
        }
    }
    close(fd);   /* the mappings keep the memory */
    return view;
}

uint64_t guest_gpa(size_t off)
{
    return region_gpa[off / GUEST_REGION] + off % GUEST_REGION;
}
