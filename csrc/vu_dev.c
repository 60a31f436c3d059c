/* Device data-plane state and the dirty log used for live migration. */
#include "vu_dev.h"
#include "vu_ring_impl.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define VHOST_F_LOG_ALL 26
#define VU_LOG_PAGE 4096

struct vu_dev *vu_dev_new(uint32_t nqueues)
{
    struct vu_dev *dev = calloc(1, sizeof(*dev));
    if (!dev)
        return NULL;
    /* Writers first: busy workers whose rounds overlap would otherwise keep
     * the lock read-held for as long as the load lasts, and the control
     * plane (and the front-end waiting for its reply) with it. A waiting
     * writer holds up new readers, so nothing may take the read lock while
     * already holding it (none does: each takes it once per round and lets
     * go before calling out to Python or waiting for I/O). */
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&dev->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    dev->log_call_fd = -1;
    dev->mem = vu_mem_new();
    dev->vqs = calloc(nqueues ? nqueues : 1, sizeof(*dev->vqs));
    if (!dev->mem || !dev->vqs)
        goto fail;
    dev->nqueues = nqueues;
    for (uint32_t i = 0; i < nqueues; i++) {
        dev->vqs[i] = vu_vq_new(dev, i);
        if (!dev->vqs[i])
            goto fail;
    }
    return dev;
fail:
    vu_dev_destroy(dev);
    return NULL;
}

void vu_dev_destroy(struct vu_dev *dev)
{
    if (!dev)
        return;
    if (dev->vqs)
        for (uint32_t i = 0; i < dev->nqueues; i++)
            vu_vq_free(dev->vqs[i]);
    free(dev->vqs);
    vu_dev_clear_log(dev);
    vu_mem_unpin(dev->mem);
    pthread_rwlock_destroy(&dev->lock);
    free(dev);
}

/* Queue locks, all of them, in index order: completions take one at a time,
 * so this can't deadlock, and while they are held no element changes hands. */
static void lock_queues(struct vu_dev *dev)
{
    for (uint32_t i = 0; i < dev->nqueues; i++)
        pthread_mutex_lock(&dev->vqs[i]->lock);
}

static void unlock_queues(struct vu_dev *dev)
{
    for (uint32_t i = dev->nqueues; i-- > 0;)
        pthread_mutex_unlock(&dev->vqs[i]->lock);
}

/* In-flight elements translated with `mem` (queue locks held). */
static uint32_t elems_using(struct vu_dev *dev, const struct vu_mem *mem)
{
    uint32_t n = 0;
    for (uint32_t q = 0; q < dev->nqueues; q++) {
        struct vu_vq *vq = dev->vqs[q];
        for (uint32_t i = 0; vq->inflight && i < vq->pool_size; i++)
            n += vq->elems[i].in_flight && vq->elems[i].mem == mem;
    }
    return n;
}

/* What in-flight elements read (queue locks held): the data a late write
 * must still find once its mapping is detached. Every element's, whatever
 * table it was translated with: a table re-sent unchanged shares its
 * mappings with the one before, so retiring one detaches the other's too
 * (vu_mem_retire keeps only the buffers inside what it detaches). NULL with
 * *n 0 when there is none, or no memory for the list (the pages are then
 * zero, as they always were before). */
static struct iovec *readable_buffers(struct vu_dev *dev, uint32_t *n)
{
    uint32_t total = 0;
    *n = 0;
    for (uint32_t q = 0; q < dev->nqueues; q++) {
        struct vu_vq *vq = dev->vqs[q];
        for (uint32_t i = 0; vq->inflight && i < vq->pool_size; i++) {
            const struct vu_elem *e = &vq->elems[i];
            if (e->in_flight && !e->held)
                total += e->out_num;
        }
    }
    struct iovec *keep = total ? malloc(total * sizeof(*keep)) : NULL;
    if (!keep)
        return NULL;
    for (uint32_t q = 0; q < dev->nqueues; q++) {
        struct vu_vq *vq = dev->vqs[q];
        for (uint32_t i = 0; vq->inflight && i < vq->pool_size; i++) {
            const struct vu_elem *e = &vq->elems[i];
            if (e->in_flight && !e->held) {
                memcpy(&keep[*n], e->iov, e->out_num * sizeof(*keep));
                *n += e->out_num;
            }
        }
    }
    return keep;
}

/* Detaches every mapping the orphans' tables hold (queue locks held; none
 * is the installed table's): a table re-sent over the same pages left the
 * older one reaching the guest's memory. `keep` is readable_buffers(). */
static void detach_orphans_memory(struct vu_dev *dev, const struct iovec *keep, uint32_t nkeep)
{
    for (uint32_t q = 0; q < dev->nqueues; q++) {
        struct vu_vq *vq = dev->vqs[q];
        for (uint32_t i = 0; vq->norphans && i < vq->pool_size; i++) {
            struct vu_elem *e = &vq->elems[i];
            if (e->in_flight && e->orphan && vu_mem_reaches_guest(e->mem))
                vu_mem_detach_all(e->mem, keep, nkeep);
        }
    }
}

static void install_mem(struct vu_dev *dev, struct vu_mem *mem, bool orphaning)
{
    lock_queues(dev);
    struct vu_mem *old = dev->mem;
    uint32_t users = old ? elems_using(dev, old) : 0, nkeep = 0;
    if (users)
        __atomic_add_fetch(&old->pins, users, __ATOMIC_RELAXED);
    struct iovec *keep = old ? readable_buffers(dev, &nkeep) : NULL;
    dev->mem = mem;
    unlock_queues(dev);
    vu_mem_retire(old, mem, keep, nkeep, orphaning);
    free(keep);
}

void vu_dev_install_mem(struct vu_dev *dev, struct vu_mem *mem)
{
    install_mem(dev, mem, false);
}

uint32_t vu_dev_inflight(struct vu_dev *dev)
{
    uint32_t n = 0;
    for (uint32_t q = 0; q < dev->nqueues; q++)
        n += vu_vq_inflight(dev->vqs[q]);
    return n;
}

int vu_dev_orphan_requests(struct vu_dev *dev)
{
    lock_queues(dev);
    for (uint32_t q = 0; q < dev->nqueues; q++) {
        struct vu_vq *vq = dev->vqs[q];
        for (uint32_t i = 0; vq->inflight && i < vq->pool_size; i++) {
            struct vu_elem *e = &vq->elems[i];
            if (e->in_flight && !e->held)
                vu_vq_orphan(vq, e);
        }
    }
    unlock_queues(dev);
    return vu_dev_detach_orphans(dev);
}

int vu_dev_detach_orphans(struct vu_dev *dev)
{
    lock_queues(dev);
    uint32_t exposed = 0, live = 0;
    for (uint32_t q = 0; q < dev->nqueues; q++) {
        struct vu_vq *vq = dev->vqs[q];
        for (uint32_t i = 0; vq->inflight && i < vq->pool_size; i++) {
            const struct vu_elem *e = &vq->elems[i];
            if (!e->in_flight || e->held)
                continue;
            /* Not only through the installed table: one re-sent since may
             * map the same pages anew (regions split or merged), and the
             * one the orphan holds then still reaches them. */
            if (e->orphan)
                exposed += vu_mem_reaches_guest(e->mem);
            else
                live++;
        }
    }
    unlock_queues(dev);
    if (exposed == 0)
        return 0;
    if (live)
        return -VU_ERR_INFLIGHT_BUSY;
    /* New requests get the same guest memory through new mappings, so what
     * the orphans hold can all be detached. */
    if (dev->mem && dev->mem->nregions) {
        int err = 0;
        struct vu_mem *fresh = vu_mem_reseat(dev->mem, &err);
        if (!fresh)
            return err;
        install_mem(dev, fresh, true);
    }
    lock_queues(dev);
    uint32_t nkeep = 0;
    struct iovec *keep = readable_buffers(dev, &nkeep);
    detach_orphans_memory(dev, keep, nkeep);
    unlock_queues(dev);
    free(keep);
    return (int)exposed;
}

uint32_t vu_dev_close(struct vu_dev *dev)
{
    /* The write lock: a completion from another thread either finishes
     * before this or finds the device closing (vu_vq_complete_unlocked). */
    vu_dev_wrlock(dev);
    lock_queues(dev);
    uint32_t pending = 0;
    for (uint32_t q = 0; q < dev->nqueues; q++) {
        struct vu_vq *vq = dev->vqs[q];
        vq->started = false;
        for (uint32_t i = 0; vq->inflight && i < vq->pool_size; i++) {
            struct vu_elem *e = &vq->elems[i];
            if (!e->in_flight)
                continue;
            if (e->held) {
                /* Its answer is in; with the ring gone it only frees the slot. */
                e->held = 0;
                vq->nheld--;
                e->in_flight = 0;
                vq->inflight--;
                if (e->mem != dev->mem)
                    vu_mem_unpin(e->mem);
                e->mem = NULL;
                vu_elem_put(vq, e);
            } else {
                vu_vq_orphan(vq, e);
                pending++;
            }
        }
    }
    struct vu_mem *old = dev->mem;
    uint32_t users = old ? elems_using(dev, old) : 0, nkeep = 0;
    if (users)
        __atomic_add_fetch(&old->pins, users, __ATOMIC_RELAXED);
    /* One list serves both: the orphans' tables and the retired one. */
    struct iovec *keep = readable_buffers(dev, &nkeep);
    dev->mem = NULL;
    detach_orphans_memory(dev, keep, nkeep);
    dev->closing = pending > 0;
    __atomic_store_n(&dev->close_pending, pending, __ATOMIC_RELEASE);
    unlock_queues(dev);
    vu_dev_unlock(dev);
    vu_mem_retire(old, NULL, keep, nkeep, true);
    free(keep);
    if (!pending)
        vu_dev_destroy(dev);
    return pending;
}

void vu_dev_orphans_finished(struct vu_dev *dev, uint32_t n)
{
    if (n && __atomic_sub_fetch(&dev->close_pending, n, __ATOMIC_ACQ_REL) == 0)
        vu_dev_destroy(dev);
}

void vu_dev_wrlock(struct vu_dev *dev) { pthread_rwlock_wrlock(&dev->lock); }
void vu_dev_rdlock(struct vu_dev *dev) { pthread_rwlock_rdlock(&dev->lock); }
void vu_dev_unlock(struct vu_dev *dev) { pthread_rwlock_unlock(&dev->lock); }

void vu_dev_set_features(struct vu_dev *dev, uint64_t features)
{
    dev->features = features;
}

int vu_dev_set_log(struct vu_dev *dev, int fd, uint64_t size, uint64_t offset)
{
    if (size == 0 || size > (1ULL << 40) || offset + size < offset)
        return -VU_ERR_INVAL;
    /* A log past the end of its file is SIGBUS on the first dirty page. */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -VU_ERR_INVAL;
    uint64_t fd_size;
    if (vu_fd_mappable_size(fd, &st, &fd_size) && offset + size > fd_size)
        return -VU_ERR_REGION_BEYOND_FD;
    long page = sysconf(_SC_PAGESIZE);
    uint64_t slack = offset % (uint64_t)page;
    size_t len = (size_t)(size + slack);
    void *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                      (off_t)(offset - slack));
    if (base == MAP_FAILED)
        return -VU_ERR_MMAP;
    vu_dev_clear_log(dev);
    dev->log_map = base;
    dev->log_map_len = len;
    dev->log = (uint8_t *)base + slack;
    dev->log_size = size;
    return 0;
}

void vu_dev_clear_log(struct vu_dev *dev)
{
    if (dev->log_map)
        munmap(dev->log_map, dev->log_map_len);
    dev->log_map = NULL;
    dev->log = NULL;
    dev->log_size = 0;
}

bool vu_dev_logging(struct vu_dev *dev)
{
    return dev->log && (dev->features & (1ULL << VHOST_F_LOG_ALL));
}

void vu_log_write(struct vu_dev *dev, uint64_t gpa, uint64_t len)
{
    if (!vu_dev_logging(dev) || len == 0)
        return;
    uint64_t first = gpa / VU_LOG_PAGE;
    uint64_t last = (gpa + len - 1) / VU_LOG_PAGE;
    for (uint64_t page = first; page <= last; page++) {
        /* Pages past the log are not ours to mark: the front-end sized the
         * log to cover all its memory. */
        if (page / 8 >= dev->log_size)
            break;
        __atomic_fetch_or(&dev->log[page / 8], (uint8_t)(1u << (page % 8)),
                          __ATOMIC_RELAXED);
    }
    if (dev->log_call_fd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(dev->log_call_fd, &one, sizeof(one));
        (void)r;
    }
}

static const char *const err_names[VU_ERR__COUNT] = {
    [VU_OK] = "ok",
    [VU_ERR_NOMEM] = "out of memory",
    [VU_ERR_INVAL] = "invalid argument",
    [VU_ERR_MMAP] = "mmap of a memory region failed",
    [VU_ERR_REGION_OVERLAP] = "memory region overlaps an existing one",
    [VU_ERR_TOO_MANY_REGIONS] = "too many memory regions",
    [VU_ERR_REGION_NOT_FOUND] = "no such memory region",
    [VU_ERR_ADDR_UNMAPPED] = "address not in any memory region",
    [VU_ERR_RING_UNMAPPED] = "ring address not mapped or misaligned",
    [VU_ERR_BAD_QUEUE_SIZE] = "bad queue size",
    [VU_ERR_AVAIL_IDX_JUMP] = "avail index moved more than the queue size",
    [VU_ERR_DESC_INDEX] = "descriptor index out of range",
    [VU_ERR_CHAIN_LOOP] = "descriptor chain loops or exceeds the queue size",
    [VU_ERR_NESTED_INDIRECT] = "indirect descriptor inside an indirect table",
    [VU_ERR_INDIRECT_SIZE] = "bad indirect table length",
    [VU_ERR_INDIRECT_NEXT] = "indirect descriptor combined with NEXT",
    [VU_ERR_WRITE_BEFORE_READ] = "device-readable descriptor after a device-writable one",
    [VU_ERR_TOO_MANY_SEGMENTS] = "chain has more segments than the device takes",
    [VU_ERR_INDIRECT_NOT_NEGOTIATED] = "indirect descriptor without INDIRECT_DESC",
    [VU_ERR_BAD_USED_ID] = "completion of an element not in flight",
    [VU_ERR_QUEUE_BROKEN] = "queue is broken",
    [VU_ERR_QUEUE_NOT_READY] = "queue not configured",
    [VU_ERR_SYS] = "system call failed",
    [VU_ERR_LOG_RANGE] = "dirty log write out of range",
    [VU_ERR_BAD_HEAD] = "avail ring head out of range",
    [VU_ERR_INFLIGHT] = "malformed inflight region",
    [VU_ERR_ZERO_CHAIN] = "chain has no byte to answer in",
    [VU_ERR_BAD_BASE] = "ring index outside the ring",
    [VU_ERR_REGION_BEYOND_FD] = "memory region extends past the end of its file",
    [VU_ERR_INFLIGHT_BUSY] = "requests from before a reset are still in flight on this ring",
    [VU_ERR_KICK_FD] = "kick fd at end of file or unreadable (its writer is gone)",
};

const char *vu_strerror(int err)
{
    if (err < 0)
        err = -err;
    if (err >= VU_ERR__COUNT || !err_names[err])
        return "unknown error";
    return err_names[err];
}
