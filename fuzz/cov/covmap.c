/* Coverage counters in shared memory, for vhostuser-fuzz's feedback mode.
 *
 * A back-end compiled with clang -fsanitize-coverage=trace-pc-guard calls
 * the two hooks below on every edge. Each edge gets an index at load time
 * (in load order, so the same binary gives the same indices run after run)
 * and bumps a byte counter at that index in a map the fuzzer shares: the
 * file named by VHOSTUSER_FUZZ_COVERAGE (in /dev/shm), as AFL's
 * shared-memory mode does with its own map. Without the variable the
 * counters go to a private map and nothing is exported.
 *
 * Edges use the lower half of the map; the upper half is left to the
 * fuzzer's Python line tracer (vhostuser.fuzz.pytrace), so one process
 * can report both.
 *
 * Build: fuzz/build_cov.sh (libcovmap.so, to LD_PRELOAD into the back-end
 * or to link into it). */
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAP_SIZE 65536u
#define EDGE_SLOTS (MAP_SIZE / 2)

static uint8_t private_map[MAP_SIZE];
static uint8_t *map = private_map;
static uint32_t next_index;

static void attach(void)
{
    static int attached;
    if (attached)
        return;
    attached = 1;
    const char *path = getenv("VHOSTUSER_FUZZ_COVERAGE");
    if (!path || !*path)
        return;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return;
    void *p = mmap(NULL, MAP_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p != MAP_FAILED)
        map = p;
}

__attribute__((visibility("default")))
void __sanitizer_cov_trace_pc_guard_init(uint32_t *start, uint32_t *stop)
{
    attach();
    if (start == stop || *start)
        return;     /* called again for a module already numbered */
    for (uint32_t *g = start; g < stop; g++)
        *g = ++next_index % EDGE_SLOTS ? next_index % EDGE_SLOTS : 1;
}

__attribute__((visibility("default")))
void __sanitizer_cov_trace_pc_guard(uint32_t *guard)
{
    uint8_t *c = &map[*guard];
    if (*c != 0xff)     /* saturate: a wrapped counter would read as "not hit" */
        (*c)++;
}
