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
     * configuration, so those never change under a running batch. */
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
};

struct vu_dev *vu_dev_new(uint32_t nqueues);
void vu_dev_free(struct vu_dev *dev);
void vu_dev_wrlock(struct vu_dev *dev);
void vu_dev_unlock(struct vu_dev *dev);
void vu_dev_rdlock(struct vu_dev *dev);
void vu_dev_set_features(struct vu_dev *dev, uint64_t features);
/* Installs a new region table and returns the old one (call with the device
 * locked for writing, then re-translate running rings). */
struct vu_mem *vu_dev_swap_mem(struct vu_dev *dev, struct vu_mem *mem);
/* Maps the dirty log; replaces the previous one. */
int vu_dev_set_log(struct vu_dev *dev, int fd, uint64_t size, uint64_t offset);
void vu_dev_clear_log(struct vu_dev *dev);
/* Marks [gpa, gpa+len) dirty if logging is on. */
void vu_log_write(struct vu_dev *dev, uint64_t gpa, uint64_t len);
bool vu_dev_logging(struct vu_dev *dev);

#endif
