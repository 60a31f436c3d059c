/* virtio-blk device: request parsing separate from I/O, and the RAM and
 * file back-ends.
 *
 * Parsing trusts nothing in the chain: the header may be split across
 * buffers, lengths may overflow, data may point the wrong way. Every such
 * request gets IOERR or UNSUPP as the virtio spec says and the queue goes on;
 * only a chain without room for the status byte breaks the queue, since
 * there is no way to answer it. */
#include "vu_blk.h"
#include "vu_dev.h"
#include "vu_iov.h"
#include "vu_memory.h"
#include "vu_worker.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <unistd.h>

#define BLK_BATCH 4   /* small: the driver sees completions while the rest of its batch runs */
/* A Python back-end's batch: each call into Python costs microseconds, so
 * it takes more requests per call (vu_blk_dev.py_batch: fewer, for A/B). */
#define BLK_PY_BATCH 32
#define BLK_ROUNDS 16
#define HDR_LEN 16
#define SEG_LEN 16
#define MAX_SEGS 256

/* Defined by cffi (extern "Python+C"): runs n parsed requests in Python. */
int vu_blk_py_batch(void *ctx, struct vu_vq *vq, struct vu_blk_req **reqs, int n);

struct vu_blk_dev *vu_blk_new(int backend)
{
    struct vu_blk_dev *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->backend = backend;
    b->fd = -1;
    b->punch_hole = true;
    pthread_mutex_init(&b->async_lock, NULL);
    vu_qos_init(&b->qos);
    for (uint32_t q = 0; q < VU_BLK_MAX_QUEUES; q++)
        b->qos_timer[q] = -1;
    return b;
}

static void req_fini(void *user)
{
    struct vu_blk_req *r = user;
    free(r->iov);
    free(r->segs);
}

int vu_blk_prepare_queue(struct vu_vq *vq)
{
    return vu_vq_set_user(vq, sizeof(struct vu_blk_req), req_fini);
}

void vu_blk_free(struct vu_blk_dev *b)
{
    if (!b)
        return;
    vu_blk_quiesce(b);
    for (uint32_t q = 0; q < VU_BLK_MAX_QUEUES; q++) {
        if (b->rings[q])
            vu_uring_put(b->rings[q]);
        if (b->qos_timer[q] >= 0)
            close(b->qos_timer[q]);
    }
    if (b->ram)
        munmap(b->ram, b->ram_size);
    vu_filemap_close(&b->map);
    vu_qos_destroy(&b->qos);
    pthread_mutex_destroy(&b->async_lock);
    free(b);
}

/* A block device that takes BLKSECDISCARD: the kernel refuses an empty
 * range up front (EOPNOTSUPP) where the device can't erase securely. */
static bool probe_secure_erase(int fd)
{
    struct stat st;
    uint64_t range[2] = {0, 0};
    return fstat(fd, &st) == 0 && S_ISBLK(st.st_mode) && ioctl(fd, BLKSECDISCARD, range) == 0;
}

int vu_blk_set_file(struct vu_blk_dev *b, int fd, bool direct)
{
    b->fd = fd;
    b->direct = direct;
    b->secure_erase = probe_secure_erase(fd);
    vu_filemap_close(&b->map);
    /* O_DIRECT asks to bypass the cache: don't read it through a mapping. */
    int rc = direct ? 0 : vu_filemap_open(&b->map, fd);
    return rc < 0 ? rc : b->map.base != NULL;
}

/* Choosing the I/O path ---------------------------------------------------------
 *
 * Where the image lives decides what is fastest (bench/RESULTS.md has the
 * measurements behind each choice):
 *  - tmpfs/ramfs: the data is in memory and io_uring can't try it without
 *    blocking (no RWF_NOWAIT there), so it would hand every request to an
 *    io-wq thread: two context switches for a copy the worker does faster
 *    itself. Reads memcpy from a mapping of the page cache (vu_filemap.c),
 *    writes are pwritev in the worker: INLINE.
 *  - a local disk file system (ext4, XFS, btrfs): a read whose pages are in
 *    the page cache is copied from a mapping of it, like on tmpfs (no
 *    system call; vu_filemap.c forgets what it saw resident now and then,
 *    since the kernel may drop pages). Other reads are tried with
 *    preadv2(RWF_NOWAIT) in the worker, which answers page-cache hits at the
 *    cost of one system call; only misses go to io_uring. Writes likewise
 *    with pwritev2(RWF_NOWAIT) where the file system can (XFS, btrfs); ext4
 *    refuses buffered RWF_NOWAIT writes (EOPNOTSUPP), and there io_uring
 *    would punt every write to an io-wq thread, so the worker writes into
 *    the page cache itself (nowait_fallback). FLUSH and the write-through
 *    group's sync go through io_uring: they wait for the disk, and the
 *    worker serves the rest meanwhile.
 *  - O_DIRECT: every read and write waits for the device; io_uring keeps
 *    them in flight together (URING).
 * A file system that refuses RWF_NOWAIT for one direction only loses it for
 * that direction. */
int vu_blk_set_uring(struct vu_blk_dev *b, bool on)
{
    b->nowait_fallback[0] = VU_BLK_IO_URING;
    b->nowait_fallback[1] = VU_BLK_IO_URING;
    if (on && b->fd >= 0 && vu_filemap_memory_backed(b->fd)) {
        b->use_uring = false;
        b->read_io = b->write_io = VU_BLK_IO_INLINE;
        return 1;
    }
    if (on) {
        /* Probe once so the caller can fall back at start-up, not mid-I/O. */
        if (vu_uring_sealed()) {
            /* Sandboxed: only rings made before the filter exist. */
            if (vu_uring_pool_size() == 0)
                return -EPERM;
        } else {
            struct vu_uring probe;
            int rc = vu_uring_init(&probe, 4);
            if (rc)
                return rc;
            vu_uring_exit(&probe);
        }
    }
    b->use_uring = on;
    if (!on)
        b->read_io = b->write_io = VU_BLK_IO_INLINE;
    else if (b->direct)
        b->read_io = b->write_io = VU_BLK_IO_URING;
    else
        b->read_io = b->write_io = VU_BLK_IO_NOWAIT;
    return 0;
}

int vu_blk_set_io_path(struct vu_blk_dev *b, int read_io, int write_io)
{
    if (read_io < VU_BLK_IO_INLINE || read_io > VU_BLK_IO_URING ||
        write_io < VU_BLK_IO_INLINE || write_io > VU_BLK_IO_URING)
        return -EINVAL;
    /* RWF_NOWAIT on O_DIRECT still waits for the device. */
    if (b->direct && (read_io == VU_BLK_IO_NOWAIT || write_io == VU_BLK_IO_NOWAIT))
        return -EINVAL;
    if (!b->use_uring && (read_io != VU_BLK_IO_INLINE || write_io != VU_BLK_IO_INLINE)) {
        /* e.g. io_uring on tmpfs, to measure it against the default */
        struct vu_uring probe;
        if (b->backend != VU_BLK_BACKEND_FILE || b->fd < 0)
            return -EINVAL;
        int rc = vu_uring_init(&probe, 4);
        if (rc)
            return rc;
        vu_uring_exit(&probe);
        b->use_uring = true;
    }
    b->read_io = (uint8_t)read_io;
    b->write_io = (uint8_t)write_io;
    return 0;
}

int vu_blk_set_ram(struct vu_blk_dev *b, uint64_t size)
{
    if (size == 0 || size % VU_BLK_SECTOR)
        return -VU_ERR_INVAL;
    /* Anonymous and untouched: only written sectors cost memory. */
    void *p = b->ram ? mremap(b->ram, b->ram_size, size, MREMAP_MAYMOVE)
                     : mmap(NULL, size, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return -VU_ERR_NOMEM;
    b->ram = p;
    b->ram_size = size;
    return 0;
}

/* Request parsing ---------------------------------------------------------- */

/* r->iov = the bytes [skip, skip+len) of iov[0..n). */
static int slice_iov(struct vu_blk_req *r, const struct iovec *iov, uint32_t n,
                     uint64_t skip, uint64_t len)
{
    if (r->iov_cap < n) {
        struct iovec *p = realloc(r->iov, n * sizeof(*p));
        if (!p)
            return -VU_ERR_NOMEM;
        r->iov = p;
        r->iov_cap = n;
    }
    r->niov = vu_iov_slice(r->iov, iov, n, skip, len);
    return 0;
}

static int fail(struct vu_blk_req *r, uint8_t status, uint8_t reason)
{
    r->result = status;
    r->reason = reason;
    return 0;
}

/* sector + nsectors within capacity, without overflow. */
static bool in_range(const struct vu_blk_limits *lim, uint64_t sector, uint64_t nsectors)
{
    return sector <= lim->capacity && nsectors <= lim->capacity - sector;
}

static int parse_segments(struct vu_blk_dev *b, struct vu_elem *e, struct vu_blk_req *r)
{
    const struct vu_blk_limits *lim = &b->lim;
    uint32_t max_seg, max_sectors;
    uint32_t allowed_flags = 0;
    bool negotiated;
    switch (r->type) {
    case VU_BLK_T_DISCARD:
        negotiated = lim->discard;
        max_seg = lim->max_discard_seg;
        max_sectors = lim->max_discard_sectors;
        break;
    case VU_BLK_T_WRITE_ZEROES:
        negotiated = lim->write_zeroes;
        max_seg = lim->max_write_zeroes_seg;
        max_sectors = lim->max_write_zeroes_sectors;
        allowed_flags = 1;  /* VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP */
        break;
    default:
        negotiated = lim->secure_erase;
        max_seg = lim->max_secure_erase_seg;
        max_sectors = lim->max_secure_erase_sectors;
        break;
    }
    if (!negotiated)
        return fail(r, VU_BLK_S_UNSUPP, VU_BLK_R_NOT_NEGOTIATED);
    if (lim->read_only)
        return fail(r, VU_BLK_S_IOERR, VU_BLK_R_READ_ONLY);
    if (e->in_len != 1)
        return fail(r, VU_BLK_S_IOERR, VU_BLK_R_WRONG_DIRECTION);
    uint64_t data = e->out_len - HDR_LEN;
    if (data == 0 || data % SEG_LEN)
        return fail(r, VU_BLK_S_IOERR, VU_BLK_R_BAD_SEGMENTS);
    uint64_t nsegs = data / SEG_LEN;
    if (nsegs > max_seg || nsegs > MAX_SEGS)
        return fail(r, VU_BLK_S_IOERR, VU_BLK_R_TOO_MANY_SEGMENTS);
    if (r->segs_cap < nsegs) {
        struct vu_blk_seg *p = realloc(r->segs, nsegs * sizeof(*p));
        if (!p)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_IO_FAILED);
        r->segs = p;
        r->segs_cap = (uint32_t)nsegs;
    }
    r->nsegs = (uint32_t)nsegs;
    for (uint32_t i = 0; i < nsegs; i++) {
        struct vu_blk_seg *s = &r->segs[i];
        vu_iov_gather(e->iov, e->out_num, HDR_LEN + (uint64_t)i * SEG_LEN, s, SEG_LEN);
        if (s->flags & ~allowed_flags)
            return fail(r, VU_BLK_S_UNSUPP, VU_BLK_R_BAD_FLAGS);
        if (s->num_sectors > max_sectors)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_SEGMENT_TOO_LARGE);
        if (!in_range(lim, s->sector, s->num_sectors))
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_OUT_OF_RANGE);
    }
    return 0;
}

int vu_blk_parse(struct vu_blk_dev *b, struct vu_elem *e, struct vu_blk_req *r)
{
    const struct vu_blk_limits *lim = &b->lim;
    r->dev = b;
    r->start_ns = 0;
    r->elem = e;
    r->result = VU_BLK_S_PENDING;
    r->reason = VU_BLK_R_NONE;
    r->niov = 0;
    r->nsegs = 0;
    r->data_len = 0;
    r->type = UINT32_MAX;
    r->sector = 0;

    /* The status byte is the last byte the driver lets us write. */
    if (e->in_len == 0)
        return -VU_ERR_ZERO_CHAIN;
    struct iovec *last = &e->iov[e->out_num + e->in_num - 1];
    r->status = (uint8_t *)last->iov_base + last->iov_len - 1;

    uint8_t hdr[HDR_LEN];
    if (e->out_len < HDR_LEN || !vu_iov_gather(e->iov, e->out_num, 0, hdr, HDR_LEN))
        return fail(r, VU_BLK_S_IOERR, VU_BLK_R_SHORT_HEADER);
    memcpy(&r->type, hdr, 4);
    memcpy(&r->sector, hdr + 8, 8);

    uint64_t readable = e->out_len - HDR_LEN;   /* data the driver sent */
    uint64_t writable = e->in_len - 1;          /* room for data we return */
    struct iovec *in_iov = e->iov + e->out_num;

    switch (r->type) {
    case VU_BLK_T_IN:
        if (readable)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_WRONG_DIRECTION);
        if (writable % VU_BLK_SECTOR)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_UNALIGNED_LEN);
        if (!in_range(lim, r->sector, writable / VU_BLK_SECTOR))
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_OUT_OF_RANGE);
        r->data_len = writable;
        return slice_iov(r, in_iov, e->in_num, 0, writable) ? fail(r, VU_BLK_S_IOERR, VU_BLK_R_IO_FAILED) : 0;
    case VU_BLK_T_OUT:
        if (lim->read_only)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_READ_ONLY);
        if (writable)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_WRONG_DIRECTION);
        if (readable % VU_BLK_SECTOR)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_UNALIGNED_LEN);
        if (!in_range(lim, r->sector, readable / VU_BLK_SECTOR))
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_OUT_OF_RANGE);
        r->data_len = readable;
        return slice_iov(r, e->iov, e->out_num, HDR_LEN, readable) ? fail(r, VU_BLK_S_IOERR, VU_BLK_R_IO_FAILED) : 0;
    case VU_BLK_T_FLUSH:
        return 0;
    case VU_BLK_T_GET_ID:
        if (writable == 0)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_NO_ID_ROOM);
        r->data_len = writable < VU_BLK_ID_BYTES ? writable : VU_BLK_ID_BYTES;
        return slice_iov(r, in_iov, e->in_num, 0, r->data_len) ? fail(r, VU_BLK_S_IOERR, VU_BLK_R_IO_FAILED) : 0;
    case VU_BLK_T_DISCARD:
    case VU_BLK_T_WRITE_ZEROES:
    case VU_BLK_T_SECURE_ERASE:
        return parse_segments(b, e, r);
    case VU_BLK_T_GET_LIFETIME:
        /* Only a Python back-end can know lifetime metrics. */
        if (b->backend != VU_BLK_BACKEND_PYTHON)
            return fail(r, VU_BLK_S_UNSUPP, VU_BLK_R_NOT_NEGOTIATED);
        if (writable < 6)
            return fail(r, VU_BLK_S_IOERR, VU_BLK_R_NO_ID_ROOM);
        r->data_len = 6;
        return slice_iov(r, in_iov, e->in_num, 0, 6) ? fail(r, VU_BLK_S_IOERR, VU_BLK_R_IO_FAILED) : 0;
    default:
        return fail(r, VU_BLK_S_UNSUPP, VU_BLK_R_UNKNOWN_TYPE);
    }
}

/* I/O: RAM ------------------------------------------------------------------- */

static void copy_iov(struct vu_blk_req *r, uint8_t *disk, bool to_guest)
{
    for (uint32_t i = 0; i < r->niov; i++) {
        if (to_guest)
            memcpy(r->iov[i].iov_base, disk, r->iov[i].iov_len);
        else
            memcpy(disk, r->iov[i].iov_base, r->iov[i].iov_len);
        disk += r->iov[i].iov_len;
    }
}

static int ram_zero(struct vu_blk_dev *b, uint64_t off, uint64_t len)
{
    memset(b->ram + off, 0, len);
    return 0;
}

/* I/O: file ------------------------------------------------------------------ */

/* Full preadv/pwritev: retries short transfers and EINTR. */
static int file_rw(int fd, struct iovec *iov, uint32_t niov, uint64_t off, bool write_op)
{
    while (niov > 0) {
        ssize_t n = write_op ? pwritev(fd, iov, (int)niov, (off_t)off)
                             : preadv(fd, iov, (int)niov, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;   /* past the end of the file: it shrank under us */
        off += (uint64_t)n;
        while (niov > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            niov--;
        }
        if (niov > 0 && n > 0) {
            /* iov belongs to the request, adjusting it in place is fine:
             * it is not used again after the transfer. */
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* O_DIRECT needs aligned buffers; guest buffers often are not. */
static int file_rw_bounce(int fd, struct vu_blk_req *r, uint64_t off, bool write_op)
{
    void *buf;
    if (posix_memalign(&buf, 4096, r->data_len ? r->data_len : 4096))
        return -ENOMEM;
    int rc = 0;
    struct iovec one = {buf, r->data_len};
    if (write_op) {
        uint8_t *p = buf;
        for (uint32_t i = 0; i < r->niov; i++) {
            memcpy(p, r->iov[i].iov_base, r->iov[i].iov_len);
            p += r->iov[i].iov_len;
        }
        rc = file_rw(fd, &one, 1, off, true);
    } else {
        rc = file_rw(fd, &one, 1, off, false);
        if (rc == 0)
            copy_iov(r, buf, true);
    }
    free(buf);
    return rc;
}

static bool iov_aligned(const struct vu_blk_req *r)
{
    for (uint32_t i = 0; i < r->niov; i++)
        if (((uintptr_t)r->iov[i].iov_base | r->iov[i].iov_len) & 511)
            return false;
    return true;
}

static int file_write_zeroes_slow(int fd, uint64_t off, uint64_t len)
{
    static const uint8_t zeroes[65536] __attribute__((aligned(4096)));
    while (len > 0) {
        size_t chunk = len < sizeof(zeroes) ? (size_t)len : sizeof(zeroes);
        struct iovec iov = {(void *)zeroes, chunk};
        int rc = file_rw(fd, &iov, 1, off, true);
        if (rc)
            return rc;
        off += chunk;
        len -= chunk;
    }
    return 0;
}

static int file_zero(struct vu_blk_dev *b, uint64_t off, uint64_t len, bool unmap)
{
    vu_filemap_punching(&b->map, off, len);
    vu_filemap_written(&b->map, off, len);
    if (unmap && b->punch_hole &&
        fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    if (fallocate(b->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    /* No zero-range support here (tmpfs, some block devices): write them. */
    return file_write_zeroes_slow(b->fd, off, len);
}

static int file_discard(struct vu_blk_dev *b, uint64_t off, uint64_t len)
{
    if (!b->punch_hole)
        return 0;
    vu_filemap_punching(&b->map, off, len);
    if (fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0) {
        if (errno == EOPNOTSUPP || errno == ENOSYS) {
            b->punch_hole = false;   /* discard is a hint: dropping it is allowed */
            return 0;
        }
        return -errno;
    }
    return 0;
}

/* Execution ------------------------------------------------------------------ */

static int do_segments(struct vu_blk_dev *b, struct vu_blk_req *r)
{
    for (uint32_t i = 0; i < r->nsegs; i++) {
        uint64_t off = r->segs[i].sector * VU_BLK_SECTOR;
        uint64_t len = (uint64_t)r->segs[i].num_sectors * VU_BLK_SECTOR;
        int rc = 0;
        if (len == 0)
            continue;
        if (b->backend == VU_BLK_BACKEND_RAM) {
            rc = ram_zero(b, off, len);
        } else if (r->type == VU_BLK_T_DISCARD) {
            rc = file_discard(b, off, len);
        } else if (r->type == VU_BLK_T_WRITE_ZEROES) {
            rc = file_zero(b, off, len, (r->segs[i].flags & 1) && b->lim.write_zeroes_unmap);
        } else {
            /* Only offered for block devices that erase for real. */
            uint64_t range[2] = {off, len};
            vu_filemap_written(&b->map, off, len);
            rc = ioctl(b->fd, BLKSECDISCARD, range) < 0 ? -errno : 0;
        }
        if (rc)
            return rc;
    }
    return 0;
}

/* A request that changes data and, in write-through mode, must be stable
 * before it completes (discard is a hint: dropping it is allowed). */
static bool needs_stable(const struct vu_blk_dev *b, const struct vu_blk_req *r)
{
    return !b->lim.writeback && b->backend == VU_BLK_BACKEND_FILE &&
           (r->type == VU_BLK_T_OUT || r->type == VU_BLK_T_WRITE_ZEROES);
}

/* The I/O of a request, without making it stable (the group commit does). */
static void execute_io(struct vu_blk_dev *b, struct vu_blk_req *r)
{
    uint64_t off = r->sector * VU_BLK_SECTOR;
    bool ram = b->backend == VU_BLK_BACKEND_RAM;
    int rc = 0;
    switch (r->type) {
    case VU_BLK_T_IN:
        if (ram)
            copy_iov(r, b->ram + off, true);
        else if (vu_filemap_read(&b->map, r->iov, r->niov, off, r->data_len) == 0)
            ;   /* copied from the page cache through the mapping */
        else if (b->direct && !iov_aligned(r))
            rc = file_rw_bounce(b->fd, r, off, false);
        else
            rc = file_rw(b->fd, r->iov, r->niov, off, false);
        break;
    case VU_BLK_T_OUT:
        if (ram)
            copy_iov(r, b->ram + off, false);
        else if (b->direct && !iov_aligned(r))
            rc = file_rw_bounce(b->fd, r, off, true);
        else
            rc = file_rw(b->fd, r->iov, r->niov, off, true);
        if (rc == 0 && !ram)
            vu_filemap_written(&b->map, off, r->data_len);
        break;
    case VU_BLK_T_FLUSH:
        if (!ram && fdatasync(b->fd) < 0)
            rc = -errno;
        break;
    case VU_BLK_T_GET_ID: {
        char id[VU_BLK_ID_BYTES];
        memcpy(id, b->lim.serial, sizeof(id));
        uint64_t left = r->data_len;
        for (uint32_t i = 0; i < r->niov && left; i++) {
            size_t n = r->iov[i].iov_len < left ? r->iov[i].iov_len : (size_t)left;
            memcpy(r->iov[i].iov_base, id + (r->data_len - left), n);
            left -= n;
        }
        break;
    }
    case VU_BLK_T_DISCARD:
    case VU_BLK_T_WRITE_ZEROES:
    case VU_BLK_T_SECURE_ERASE:
        rc = do_segments(b, r);
        break;
    default:
        r->result = VU_BLK_S_UNSUPP;
        return;
    }
    r->result = rc ? VU_BLK_S_IOERR : VU_BLK_S_OK;
    if (rc)
        r->reason = VU_BLK_R_IO_FAILED;
}

void vu_blk_execute(struct vu_blk_dev *b, struct vu_blk_req *r)
{
    execute_io(b, r);
    if (r->result == VU_BLK_S_OK && needs_stable(b, r) && fdatasync(b->fd) < 0) {
        r->result = VU_BLK_S_IOERR;
        r->reason = VU_BLK_R_IO_FAILED;
    }
}

void vu_blk_py_describe(struct vu_blk_req *const *reqs, int n, struct vu_blk_pydesc *out)
{
    for (int i = 0; i < n; i++) {
        const struct vu_blk_req *r = reqs[i];
        struct vu_blk_pydesc *d = &out[i];
        d->type = r->type;
        d->niov = r->niov;
        d->offset = r->sector * VU_BLK_SECTOR;
        d->map_id = d->map_off = d->len = 0;
        if (r->niov == 1 && r->elem && r->elem->mem) {
            uint64_t off;
            struct vu_map *m = vu_mem_map_of(r->elem->mem, r->iov[0].iov_base,
                                             r->iov[0].iov_len, &off);
            if (m) {
                d->map_id = m->id;
                d->map_off = off;
                d->len = r->iov[0].iov_len;
            }
        }
    }
}

void vu_blk_py_set_results(struct vu_blk_req *const *reqs, int n, const uint8_t *status)
{
    for (int i = 0; i < n; i++)
        if (status[i] != VU_BLK_S_PENDING)
            reqs[i]->result = status[i];
}

bool vu_blk_can_secure_erase(struct vu_blk_dev *b)
{
    return b->backend == VU_BLK_BACKEND_RAM ||
           (b->backend == VU_BLK_BACKEND_FILE && b->secure_erase);
}

static unsigned latency_bucket(uint64_t us)
{
    unsigned i = us ? 64u - (unsigned)__builtin_clzll(us) : 0;
    return i < VU_BLK_LAT_BUCKETS ? i : VU_BLK_LAT_BUCKETS - 1;
}

static void record_latency(struct vu_blk_stats *st, uint64_t ns, uint64_t count)
{
    st->latency_ns_sum += ns * count;
    st->latency_us[latency_bucket(ns / 1000)] += count;
}

/* now 0: the caller records the latency (for a whole batch at once). */
static void account(struct vu_blk_stats *st, const struct vu_blk_req *r, uint8_t status,
                    uint64_t now)
{
    bool ok = status == VU_BLK_S_OK;
    switch (r->type) {
    case VU_BLK_T_IN:
        st->reads++;
        st->bytes_read += ok ? r->data_len : 0;
        break;
    case VU_BLK_T_OUT:
        st->writes++;
        st->bytes_written += ok ? r->data_len : 0;
        break;
    case VU_BLK_T_FLUSH: st->flushes++; break;
    case VU_BLK_T_DISCARD: st->discards++; break;
    case VU_BLK_T_WRITE_ZEROES:
    case VU_BLK_T_SECURE_ERASE: st->write_zeroes++; break;
    default: st->others++; break;
    }
    if (status == VU_BLK_S_IOERR)
        st->errors++;
    else if (status == VU_BLK_S_UNSUPP)
        st->unsupported++;
    st->completed++;
    if (now && r->start_ns)
        record_latency(st, now > r->start_ns ? now - r->start_ns : 0, 1);
}

static int finish_at(struct vu_vq *vq, struct vu_blk_req *r, uint8_t status, bool notify,
                     uint64_t now)
{
    if (status == VU_BLK_S_PENDING)
        status = VU_BLK_S_IOERR;
    struct vu_blk_dev *b = r->dev;
    if (b) {
        uint32_t q = r->queue % VU_BLK_MAX_QUEUES;
        if (notify) {   /* not q's worker: the other set, under its lock */
            pthread_mutex_lock(&b->async_lock);
            account(&b->async_stats[q], r, status, now);
            pthread_mutex_unlock(&b->async_lock);
        } else {
            account(&b->stats[q], r, status, now);
        }
    }
    VU_WRITE_ONCE(*r->status, status);
    /* Like QEMU we report the whole writable length as used: the driver
     * ignores it and dirty logging then covers the status byte too. */
    uint32_t len = (uint32_t)r->elem->in_len;
    return notify ? vu_vq_complete(vq, r->elem, len) : vu_vq_push(vq, r->elem, len);
}

int vu_blk_finish(struct vu_vq *vq, struct vu_blk_req *r, uint8_t status, bool notify)
{
    return finish_at(vq, r, status, notify, r->start_ns ? vu_now_ns() : 0);
}

/* Asynchronous file I/O ---------------------------------------------------------- */

/* user_data of a group's sync: the group's address with this bit (requests
 * and groups are at least 8-byte aligned). */
#define TAG_GROUP 1u

static struct vu_uring *queue_ring(struct vu_blk_dev *b, struct vu_vq *vq)
{
    uint32_t q = vq->index;
    if (!b->use_uring || q >= VU_BLK_MAX_QUEUES)
        return NULL;
    if (!b->rings[q]) {
        struct vu_uring *u = vu_uring_get(vq->size);
        if (!u)
            return NULL;   /* fall back to synchronous I/O for this queue */
        b->rings[q] = u;
    }
    if (b->ring_worker[q] != vq->worker && vq->worker) {
        if (vu_worker_add_event_fd(vq->worker, vq, b->rings[q]->efd) == 0)
            b->ring_worker[q] = vq->worker;
    }
    return b->rings[q];
}

static bool async_type(uint32_t type)
{
    return type == VU_BLK_T_IN || type == VU_BLK_T_OUT || type == VU_BLK_T_FLUSH;
}

/* How r is done: VU_BLK_IO_* (flushes: through io_uring when there is one). */
static int io_mode(const struct vu_blk_dev *b, const struct vu_blk_req *r)
{
    if (r->type == VU_BLK_T_FLUSH)
        return VU_BLK_IO_URING;
    /* O_DIRECT with buffers it can't take: bounced, in the worker. */
    if (b->direct && !iov_aligned(r))
        return VU_BLK_IO_INLINE;
    /* Another queue's worker may have just turned NOWAIT off: any value
     * read is a valid mode. */
    return __atomic_load_n(r->type == VU_BLK_T_IN ? &b->read_io : &b->write_io,
                           __ATOMIC_RELAXED);
}

/* A read or write that can finish at once (page cache hit, no block) is
 * done here, a read through the mapping if it can: true with r->result set. Anything else, including a short
 * transfer, goes on untouched (RWF_NOWAIT transfers nothing or what it
 * could; a partial one is simply redone). */
static bool try_nowait(struct vu_blk_dev *b, struct vu_blk_req *r)
{
    if (r->niov == 0)
        return false;
    bool wr = r->type == VU_BLK_T_OUT;
    uint64_t off = r->sector * VU_BLK_SECTOR;
    if (!wr && vu_filemap_read(&b->map, r->iov, r->niov, off, r->data_len) == 0) {
        r->result = VU_BLK_S_OK;   /* copied from the page cache through the mapping */
        return true;
    }
    ssize_t n = wr ? pwritev2(b->fd, r->iov, (int)r->niov, (off_t)off, RWF_NOWAIT)
                   : preadv2(b->fd, r->iov, (int)r->niov, (off_t)off, RWF_NOWAIT);
    if (n < 0 && errno == EOPNOTSUPP) {
        /* The file system can't try this direction: stop asking (ext4
         * refuses buffered writes, and reads still work). */
        __atomic_store_n(wr ? &b->write_io : &b->read_io, b->nowait_fallback[wr],
                         __ATOMIC_RELAXED);
    }
    if (n < 0 || (uint64_t)n != r->data_len)
        return false;
    if (wr)
        vu_filemap_written(&b->map, off, r->data_len);
    r->result = VU_BLK_S_OK;
    return true;
}

/* Queues r on u; false when the ring is full (the caller runs it itself). */
static bool submit_async(struct vu_blk_dev *b, struct vu_uring *u, struct vu_blk_req *r)
{
    if (u->pending + u->queued + 1 > u->entries)
        return false;
    struct io_uring_sqe *sqe = vu_uring_sqe(u);
    r->reason = VU_BLK_R_NONE;
    sqe->fd = b->fd;
    sqe->user_data = (uint64_t)(uintptr_t)r;
    if (r->type == VU_BLK_T_FLUSH) {
        sqe->opcode = IORING_OP_FSYNC;
        sqe->fsync_flags = IORING_FSYNC_DATASYNC;
        return true;
    }
    sqe->opcode = r->type == VU_BLK_T_IN ? IORING_OP_READV : IORING_OP_WRITEV;
    sqe->addr = (uint64_t)(uintptr_t)r->iov;
    sqe->len = r->niov;
    sqe->off = r->sector * VU_BLK_SECTOR;
    return true;
}

/* Group commit ------------------------------------------------------------------ */

static void group_add(struct vu_blk_group *g, struct vu_blk_req *r)
{
    r->next = g->waiting;
    g->waiting = r;
}

/* Completes every request of `list` with the outcome of the sync that
 * covered them; returns how many. */
static int group_finish(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *list,
                        bool synced, uint64_t now)
{
    int n = 0;
    while (list) {
        struct vu_blk_req *r = list;
        list = r->next;
        r->next = NULL;
        if (!synced) {
            r->result = VU_BLK_S_IOERR;
            r->reason = VU_BLK_R_IO_FAILED;
        }
        finish_at(vq, r, r->result, false, now);
        n++;
    }
    b->stats[vq->index % VU_BLK_MAX_QUEUES].stable_writes += (uint64_t)n;
    return n;
}

/* Starts the sync that covers what waits, unless one is in flight (what
 * waits then gets the next one: data written after a sync started may not
 * be covered by it). With no io_uring the worker syncs itself. Returns how
 * many requests completed. */
static int group_commit(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_uring *u)
{
    struct vu_blk_group *g = &b->group[vq->index % VU_BLK_MAX_QUEUES];
    if (!g->waiting || g->sync_inflight)
        return 0;
    struct vu_blk_stats *st = &b->stats[vq->index % VU_BLK_MAX_QUEUES];
    if (!u) {
        struct vu_blk_req *list = g->waiting;
        g->waiting = NULL;
        bool synced = fdatasync(b->fd) == 0;
        st->stable_syncs++;
        return group_finish(b, vq, list, synced, vu_now_ns());
    }
    if (u->pending + u->queued + 1 > u->entries)
        return 0;       /* ring full: the next completion makes room and comes back here */
    struct io_uring_sqe *sqe = vu_uring_sqe(u);
    sqe->opcode = IORING_OP_FSYNC;
    sqe->fsync_flags = IORING_FSYNC_DATASYNC;
    sqe->fd = b->fd;
    sqe->user_data = (uint64_t)(uintptr_t)g | TAG_GROUP;
    g->syncing = g->waiting;
    g->waiting = NULL;
    g->sync_inflight = true;
    st->stable_syncs++;
    vu_uring_submit(u);
    return 0;
}

/* Finishes a request whose I/O is done: a write-through write joins the
 * group, anything else completes. Returns how many completed (0 or 1). */
static int io_done(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_blk_req *r, uint64_t now)
{
    if (r->result == VU_BLK_S_OK && needs_stable(b, r)) {
        group_add(&b->group[vq->index % VU_BLK_MAX_QUEUES], r);
        return 0;
    }
    finish_at(vq, r, r->result, false, now);
    return 1;
}

/* Applies one completion to its request (short transfers are finished
 * here, synchronously). */
static void apply_cqe(struct vu_blk_dev *b, struct io_uring_cqe *cqe, struct vu_blk_req *r)
{
    if (cqe->res < 0) {
        r->reason = VU_BLK_R_IO_FAILED;
    } else if (r->type != VU_BLK_T_FLUSH && (uint64_t)cqe->res < r->data_len) {
        uint64_t done = (uint64_t)cqe->res;
        if (slice_iov(r, r->iov, r->niov, done, r->data_len - done) ||
            file_rw(b->fd, r->iov, r->niov, r->sector * VU_BLK_SECTOR + done,
                    r->type == VU_BLK_T_OUT))
            r->reason = VU_BLK_R_IO_FAILED;
    }
    r->result = r->reason == VU_BLK_R_IO_FAILED ? VU_BLK_S_IOERR : VU_BLK_S_OK;
    if (r->result == VU_BLK_S_OK && r->type == VU_BLK_T_OUT)
        vu_filemap_written(&b->map, r->sector * VU_BLK_SECTOR, r->data_len);
}

/* Completes what io_uring finished; returns how many requests. */
static int reap(struct vu_blk_dev *b, struct vu_vq *vq, struct vu_uring *u, bool drain)
{
    if (drain) {
        uint64_t v;
        ssize_t rd = read(u->efd, &v, sizeof(v));   /* EFD_NONBLOCK */
        (void)rd;
    }
    int done = 0;
    uint64_t now = 0;   /* one clock read for what this call completes: it is flushed together */
    struct io_uring_cqe *cqe;
    while ((cqe = vu_uring_peek(u))) {
        uint64_t tag = cqe->user_data;
        int res = cqe->res;
        if (!now)
            now = vu_now_ns();
        if (tag & TAG_GROUP) {
            struct vu_blk_group *g = (struct vu_blk_group *)(uintptr_t)(tag & ~(uint64_t)TAG_GROUP);
            vu_uring_seen(u);
            struct vu_blk_req *list = g->syncing;
            g->syncing = NULL;
            g->sync_inflight = false;
            done += group_finish(b, vq, list, res >= 0, now);
            continue;
        }
        struct vu_blk_req *r = (struct vu_blk_req *)(uintptr_t)tag;
        apply_cqe(b, cqe, r);
        vu_uring_seen(u);
        done += io_done(b, vq, r, now);
    }
    return done + group_commit(b, vq, u);
}

static void drop_cqe(void *arg, struct io_uring_cqe *cqe)
{
    (void)arg;
    if (cqe->user_data & TAG_GROUP) {
        struct vu_blk_group *g =
            (struct vu_blk_group *)(uintptr_t)(cqe->user_data & ~(uint64_t)TAG_GROUP);
        struct vu_blk_req *list = g->syncing;
        g->syncing = NULL;
        g->sync_inflight = false;
        while (list) {
            struct vu_blk_req *r = list;
            list = r->next;
            vu_vq_discard(r->elem->vq, r->elem);
        }
        return;
    }
    struct vu_blk_req *r = (struct vu_blk_req *)(uintptr_t)cqe->user_data;
    vu_vq_discard(r->elem->vq, r->elem);
}

void vu_blk_quiesce(struct vu_blk_dev *b)
{
    for (uint32_t q = 0; q < VU_BLK_MAX_QUEUES; q++) {
        if (b->rings[q]) {
            vu_uring_drain(b->rings[q], drop_cqe, NULL);
            b->ring_worker[q] = NULL;   /* that worker and its epoll go away */
        }
        /* Written but never synced: not stable, so not answered (the
         * front-end resubmits them if it tracks inflight requests). */
        struct vu_blk_req *list = b->group[q].waiting;
        b->group[q].waiting = NULL;
        while (list) {
            struct vu_blk_req *r = list;
            list = r->next;
            vu_vq_discard(r->elem->vq, r->elem);
        }
    }
}

/* QoS ------------------------------------------------------------------------------ */

void vu_blk_set_qos(struct vu_blk_dev *b, uint64_t iops, uint64_t bps, uint64_t iops_burst,
                    uint64_t bps_burst)
{
    vu_qos_set(&b->qos, iops, bps, iops_burst, bps_burst);
    /* Queues asleep on the old limits look again now. */
    struct itimerspec soon = {.it_value = {.tv_nsec = 1}};
    for (uint32_t q = 0; q < VU_BLK_MAX_QUEUES; q++)
        if (b->qos_timer[q] >= 0)
            timerfd_settime(b->qos_timer[q], 0, &soon, NULL);
}

/* Puts the queue to sleep for wait_ns: its timerfd, in the worker's epoll,
 * runs the handler again. false when no timer can be had (the caller then
 * serves on rather than stall the queue forever). */
static bool sleep_queue(struct vu_blk_dev *b, struct vu_vq *vq, uint64_t wait_ns)
{
    uint32_t q = vq->index;
    if (q >= VU_BLK_MAX_QUEUES || !vq->worker)
        return false;
    if (b->qos_timer[q] < 0) {
        b->qos_timer[q] = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (b->qos_timer[q] < 0)
            return false;
    }
    if (b->timer_worker[q] != vq->worker) {
        if (vu_worker_add_event_fd(vq->worker, vq, b->qos_timer[q]) < 0)
            return false;
        b->timer_worker[q] = vq->worker;
    }
    struct itimerspec when = {.it_value = {.tv_sec = (time_t)(wait_ns / 1000000000ull),
                                           .tv_nsec = (long)(wait_ns % 1000000000ull)}};
    b->throttled[q]++;
    return timerfd_settime(b->qos_timer[q], 0, &when, NULL) == 0;
}

int vu_blk_handler(void *ctx, struct vu_vq *vq)
{
    struct vu_blk_dev *b = ctx;
    if (vq->user_size != sizeof(struct vu_blk_req)) {
        vu_vq_break(vq, VU_ERR_INVAL, vq->index);   /* vu_blk_prepare_queue was not called */
        return VU_HANDLED_NONE;
    }
    struct vu_uring *u = b->backend == VU_BLK_BACKEND_FILE ? queue_ring(b, vq) : NULL;
    uint32_t q = vq->index % VU_BLK_MAX_QUEUES;
    if (b->qos_timer[q] >= 0) {
        uint64_t expirations;
        ssize_t rd = read(b->qos_timer[q], &expirations, sizeof(expirations));  /* TFD_NONBLOCK */
        (void)rd;
    }
    bool did = false;
    if (u && reap(b, vq, u, true))
        did = true;
    /* A disabled or broken ring only finishes what it already started. */
    if (!vq->enabled || vq->broken) {
        if (did) {
            vu_vq_flush(vq);
            vu_vq_notify(vq);
        }
        return did ? VU_HANDLED_SOME : VU_HANDLED_NONE;
    }
    struct vu_blk_req *batch[BLK_PY_BATCH];
    int max_batch = BLK_BATCH;
    if (b->backend == VU_BLK_BACKEND_PYTHON)
        max_batch = b->py_batch >= 1 && b->py_batch <= BLK_PY_BATCH ? (int)b->py_batch
                                                                    : BLK_PY_BATCH;
    for (int round = 0; round < BLK_ROUNDS; round++) {
        vu_vq_set_notification(vq, false);
        int n = 0, nbatch = 0, rc = 0, completed = 0;
        bool throttled = false;
        /* One clock read per round: what is popped in it arrived by then. */
        uint64_t now = vu_now_ns();
        struct vu_elem *e;
        while (n < max_batch) {
            uint64_t wait = vu_qos_active(&b->qos) ? vu_qos_admit(&b->qos, now) : 0;
            if (wait && sleep_queue(b, vq, wait)) {
                throttled = true;
                break;
            }
            if ((rc = vu_vq_pop(vq, &e)) != 1) {
                if (!wait && vu_qos_active(&b->qos))
                    vu_qos_refund(&b->qos);
                break;
            }
            struct vu_blk_req *r = e->user;
            r->queue = (uint16_t)vq->index;
            n++;
            b->started[q]++;
            if (vu_blk_parse(b, e, r) < 0) {
                /* No status byte: nothing can answer this chain, and it must
                 * not stay in flight for GET_VRING_BASE to wait on. */
                vu_vq_break(vq, VU_ERR_ZERO_CHAIN, e->id);
                vu_vq_discard(vq, e);
                b->started[q]--;
                rc = -VU_ERR_ZERO_CHAIN;
                break;
            }
            r->start_ns = now;
            if (vu_qos_active(&b->qos))
                vu_qos_charge_bytes(&b->qos, r->data_len);
            if (r->result == VU_BLK_S_PENDING) {
                if (b->backend == VU_BLK_BACKEND_PYTHON) {
                    batch[nbatch++] = r;
                    continue;
                }
                int mode = u && async_type(r->type) ? io_mode(b, r) : VU_BLK_IO_INLINE;
                /* Data already in the page cache needs no trip through
                 * io_uring's worker threads: try it without blocking. */
                if (mode == VU_BLK_IO_NOWAIT && !try_nowait(b, r))
                    mode = io_mode(b, r);   /* a miss, or NOWAIT just turned out unsupported */
                if (mode != VU_BLK_IO_INLINE && r->result == VU_BLK_S_PENDING &&
                    submit_async(b, u, r))
                    continue;
                if (r->result == VU_BLK_S_PENDING)
                    execute_io(b, r);
                if (r->result == VU_BLK_S_OK && needs_stable(b, r)) {
                    group_add(&b->group[q], r);     /* completes after the group's sync */
                    continue;
                }
            }
            finish_at(vq, r, r->result, false, 0);
            completed++;
        }
        if (u && u->queued) {
            vu_uring_submit(u);
            /* What io_uring could do at once (page-cache hits) completed
             * inside that system call: answered in this round. Their
             * signals are drained first (a completion posted after that
             * signals again, so none is lost). */
            if (vu_uring_peek(u) && reap(b, vq, u, true))   /* latency recorded there */
                did = true;
        }
        /* One sync for the write-through writes of this round (and those
         * that waited for the previous sync): group commit. */
        if (group_commit(b, vq, u))
            did = true;
        if (nbatch) {
            vu_blk_py_batch(b->py_ctx, vq, batch, nbatch);
            /* What Python left PENDING it completes later itself, with
             * vu_blk_finish(notify): r->result stays PENDING then, so the
             * two never both complete a request. */
            for (int i = 0; i < nbatch; i++) {
                if (batch[i]->result != VU_BLK_S_PENDING) {
                    finish_at(vq, batch[i], batch[i]->result, false, 0);
                    completed++;
                }
            }
        }
        if (n)
            did = true;
        /* Everything completed in this round started at `now` and becomes
         * visible to the driver at this flush: one latency for all. */
        if (completed)
            record_latency(&b->stats[q], vu_now_ns() - now, (uint64_t)completed);
        if (completed || did) {
            vu_vq_flush(vq);
            vu_vq_notify(vq);
        }
        if (rc < 0)
            return VU_HANDLED_SOME;
        /* Throttled: notifications stay off, the timer wakes the queue. */
        if (throttled)
            return did ? VU_HANDLED_SOME : VU_HANDLED_NONE;
        if (n == max_batch)
            continue;
        if (!vu_vq_set_notification(vq, true))
            return did ? VU_HANDLED_SOME : VU_HANDLED_NONE;
    }
    return VU_HANDLED_MORE;
}
