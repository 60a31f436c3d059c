/* What one 4 KiB read costs a back-end that copies from the page cache,
 * with no virtio in the way: random 4 KiB copies from a shared mapping of
 * an image file into 32 rotating 4 KiB buffers (a QD32 queue's), as the
 * mapped-read path does. Prints ns per copy for the first SPAN bytes.
 *
 *     gcc -O2 -o copy_cost bench/copy_cost.c
 *     taskset -c 0 ./copy_cost IMAGE SPAN_BYTES [COPIES]
 *
 * bench/pollprofile.py builds and runs it beside the polled benchmark. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define DEPTH 32

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s IMAGE SPAN_BYTES [COPIES]\n", argv[0]);
        return 2;
    }
    uint64_t span = strtoull(argv[2], NULL, 0);
    long copies = argc > 3 ? atol(argv[3]) : 2000000;
    if (span < BLOCK || copies < 1) {
        fprintf(stderr, "%s: SPAN must be at least %d bytes, COPIES at least 1\n", argv[0],
                BLOCK);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror(argv[1]);
        return 1;
    }
    if ((uint64_t)st.st_size < span) {   /* a copy past the end would die of SIGBUS */
        fprintf(stderr, "%s: %lld bytes, less than SPAN\n", argv[1], (long long)st.st_size);
        return 2;
    }
    const uint8_t *img = mmap(NULL, span, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (img == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    uint8_t *bufs = aligned_alloc(BLOCK, (size_t)DEPTH * BLOCK);
    memset(bufs, 0, (size_t)DEPTH * BLOCK);
    uint64_t blocks = span / BLOCK, x = 0x9E3779B97F4A7C15ull, sum = 0;
    double t0 = now_s();
    for (long i = 0; i < copies; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;          /* xorshift64 */
        uint8_t *dst = bufs + (size_t)(i % DEPTH) * BLOCK;
        memcpy(dst, img + (x % blocks) * BLOCK, BLOCK);
        sum += dst[i % BLOCK];                          /* keep the copy */
    }
    double ns = (now_s() - t0) / (double)copies * 1e9;
    printf("{\"span\": %llu, \"ns_per_copy\": %.1f, \"checksum\": %llu}\n",
           (unsigned long long)span, ns, (unsigned long long)sum);
    return 0;
}
