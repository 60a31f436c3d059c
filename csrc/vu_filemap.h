/* Reads from an image file through a mapping of its page cache, and writes
 * to it the same way when it is open for writing: on tmpfs/ramfs, and on
 * local disk file systems (ext2/3/4, XFS, btrfs) for pages that are in the
 * page cache. A write through the mapping dirties the page as pwritev does
 * (the kernel marks it dirty when the mapping first writes to it after each
 * writeback), so fdatasync covers it the same way.
 *
 * A preadv costs a syscall and the kernel's page-by-page copy; a memcpy
 * from a mapping of the same page cache is 2-3x faster here. Three things
 * make a plain mapping unsafe or slow, and this module handles them:
 *  - a read fault on a hole allocates a tmpfs page, so reading a sparse
 *    image would fill it. Chunks are used through the mapping only once
 *    mincore() has seen every page of them resident; other reads go to
 *    preadv, which returns zeroes for holes without allocating.
 *  - a page past the end of a file that shrank, or one that can't be
 *    brought back (tmpfs full, swap), raises SIGBUS. The copy runs under a
 *    per-thread SIGBUS guard that turns the fault into "use preadv"; any
 *    other SIGBUS goes to the handler the program had before, and while a
 *    handler installed after ours is in place the mapping is not used.
 *  - on a disk file system the kernel may drop pages from the page cache;
 *    a copy from a dropped page would wait for the disk in the worker. So
 *    what mincore() said is forgotten every VU_FILEMAP_RECHECK_NS (the
 *    clock is looked at every VU_FILEMAP_CLOCK_EVERY reads or writes), and a chunk is
 *    used only while it was seen whole in memory since. Pages go with time,
 *    not with reads: by a count of reads a fast guest re-asked mincore()
 *    about a 1 GiB image every 14 ms (4% of a cached read's cost), a slow
 *    one trusted an answer for seconds. */
#ifndef VU_FILEMAP_H
#define VU_FILEMAP_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#define VU_FILEMAP_CHUNK_SHIFT 21   /* 2 MiB: one mincore() call decides for 512 pages */
#define VU_FILEMAP_RECHECK_NS 100000000ull  /* residency forgotten this often (disk file systems) */
#define VU_FILEMAP_CLOCK_EVERY 256          /* reads and writes between looks at the clock */

struct vu_filemap {
    const uint8_t *base;    /* NULL: not mapped, every read goes to preadv */
    uint64_t len;           /* bytes mapped: the file's size when mapped, whole chunks */
    uint64_t nchunks;
    uint64_t *resident;     /* bit per chunk: every page seen in memory, use the mapping */
    uint64_t *sparse;       /* bit per chunk: seen with a hole, don't ask again until written */
    uint64_t mapped_reads, fallback_reads;   /* for tests and metrics (racy counts) */
    uint64_t mapped_writes, faults;          /* the same; faults: copies cut short by SIGBUS */
    bool writable;          /* mapped PROT_WRITE: the descriptor is O_RDWR */
    bool recheck;           /* the kernel may drop pages: forget residency now and then */
    bool in_memory;         /* tmpfs or ramfs: a copy through it never waits for storage */
    uint64_t uses;          /* reads and writes tried, counts to VU_FILEMAP_CLOCK_EVERY */
    uint64_t checked_ns;    /* when residency was last forgotten (recheck) */
};

/* tmpfs or ramfs: the data is in memory, a read or write never waits. */
bool vu_filemap_memory_backed(int fd);
/* Maps fd (writable if it is O_RDWR) if it is a regular file on tmpfs, ramfs
 * or a local disk file system; 0 with m->base NULL when it is not, -errno on
 * failure. */
int vu_filemap_open(struct vu_filemap *m, int fd);
void vu_filemap_close(struct vu_filemap *m);
/* Copies len bytes at off into iov. 0 when done, -1 when the caller must
 * read them itself (outside the mapping, not known resident, or SIGBUS);
 * the iov contents are then undefined but the iov array is unchanged. */
int vu_filemap_read(struct vu_filemap *m, const struct iovec *iov, uint32_t niov, uint64_t off,
                    uint64_t len);
/* Copies len bytes from iov to the file at off through the mapping, as
 * pwritev would into the page cache (a FLUSH's fdatasync covers it alike).
 * 0 when done, -1 when the caller must write them itself (not writable,
 * outside the mapping, not known resident, or SIGBUS: a file that shrank, a
 * hole the file system has no room for, a guest buffer gone); part of the
 * data may then be written, and the caller's write covers it. */
int vu_filemap_write(struct vu_filemap *m, const struct iovec *iov, uint32_t niov, uint64_t off,
                     uint64_t len);
/* The next read of the calling thread asks the kernel again whether our
 * SIGBUS handler is still the one installed (a program may have put its own
 * after ours); reads in between trust the last answer. The blk handler
 * calls this each time it runs, so an answer is at most one run (16 rounds
 * of a few requests) old. */
void vu_filemap_recheck_guard(void);
/* Our write may have filled holes: let its chunks be checked again. */
void vu_filemap_written(struct vu_filemap *m, uint64_t off, uint64_t len);
/* Before punching a hole: its chunks are no longer known resident. */
void vu_filemap_punching(struct vu_filemap *m, uint64_t off, uint64_t len);

#endif
