/* A device's data-plane state: memory, queues, dirty log, lock. */
#ifndef VU_DEV_H
#define VU_DEV_H

#include "vu_common.h"
#include "vu_memory.h"
#include "vu_queue.h"
#include <pthread.h>

struct vu_dev {
    /* Workers hold it for reading while they process a batch; the control
     * plane takes it for writing to change memory, the log or a queue's
     * configuration, so those never change under a running batch. A
     * waiting writer goes first: never take it for reading twice. */
    pthread_rwlock_t lock;
    struct vu_mem *mem;
    uint64_t features;
    /* dirty log (migration) */
    uint8_t *log;
    uint64_t log_size;
    void *log_map;
    size_t log_map_len;
    int log_call_fd;
    uint32_t nqueues;
    struct vu_vq **vqs;
    /* Closed by its owner while requests were still in flight: the last of
     * them to finish frees the device (vu_dev_close). */
    bool closing;
    uint32_t close_pending;     /* atomic */
};

struct vu_dev *vu_dev_new(uint32_t nqueues);
/* The owner is done with the device (workers joined). Requests still in
 * flight become orphans: their memory is detached (vu_memory.h), their
 * completions publish nothing, and the last one frees the device. Returns
 * how many were still in flight (0: freed now). */
uint32_t vu_dev_close(struct vu_dev *dev);
/* n orphans of the closed device finished; the last one frees it. Called
 * without any of its locks, by a thread done with its queues. */
void vu_dev_orphans_finished(struct vu_dev *dev, uint32_t n);
void vu_dev_destroy(struct vu_dev *dev);
void vu_dev_wrlock(struct vu_dev *dev);
void vu_dev_unlock(struct vu_dev *dev);
void vu_dev_rdlock(struct vu_dev *dev);
void vu_dev_set_features(struct vu_dev *dev, uint64_t features);
/* Installs `mem` (the device takes the caller's pin) and retires the old
 * table: requests in flight keep it, and what it maps that `mem` does not
 * is detached (vu_memory.h). Call with the device locked for writing, then
 * re-translate running rings. */
void vu_dev_install_mem(struct vu_dev *dev, struct vu_mem *mem);
/* Every request in flight becomes an orphan (vu_vq_orphan), and what they
 * hold is detached (vu_dev_detach_orphans). Device locked for writing.
 * Returns how many orphans still reached the guest's memory, or -vu_err
 * when reseating failed. */
int vu_dev_orphan_requests(struct vu_dev *dev);
/* Detaches what orphans hold from the guest's memory, reseating the
 * installed table for new requests. Only while no request in flight is
 * anything but an orphan or held (the others share the mappings; then
 * -VU_ERR_INFLIGHT_BUSY). Device locked for writing. Returns how many
 * orphans still reached the guest's memory, or -vu_err. */
int vu_dev_detach_orphans(struct vu_dev *dev);
/* Requests in flight on every queue. */
uint32_t vu_dev_inflight(struct vu_dev *dev);
/* Maps the dirty log; replaces the previous one. */
int vu_dev_set_log(struct vu_dev *dev, int fd, uint64_t size, uint64_t offset);
void vu_dev_clear_log(struct vu_dev *dev);
/* Marks [gpa, gpa+len) dirty if logging is on. */
void vu_log_write(struct vu_dev *dev, uint64_t gpa, uint64_t len);
bool vu_dev_logging(struct vu_dev *dev);

#endif
