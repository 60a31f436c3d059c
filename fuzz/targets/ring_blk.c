/* libFuzzer target: split and packed ring walking plus virtio-blk request
 * parsing and execution (RAM back-end), through the production handler.
 *
 * Input: 4 bytes of configuration, then the guest memory image (rings,
 * indirect tables, request headers, data), which the fuzzer controls byte
 * for byte. Beyond the sanitizers, one invariant is checked: the RAM
 * back-end completes synchronously, so once the handler is done nothing
 * may stay in flight unless the queue was broken. */
#include "guest.h"
#include "vu_blk.h"
#include "vu_dev.h"

#include <linux/virtio_config.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DESC_OFF 0x000
#define DRIVER_OFF 0x800      /* split avail ring / packed driver event area */
#define DEVICE_OFF 0xc00      /* split used ring / packed device event area */
#define DISK_SECTORS 64

enum {
    CFG_PACKED = 1, CFG_INDIRECT = 2, CFG_EVENT_IDX = 4, CFG_READ_ONLY = 8,
    CFG_SEGMENTS = 16,  /* discard and write-zeroes negotiated */
};

static struct vu_dev *dev;
static struct vu_blk_dev *blk;
static uint8_t *view;

static void setup(void)
{
    dev = vu_dev_new(1);
    blk = vu_blk_new(VU_BLK_BACKEND_RAM);
    if (!dev || !blk || vu_blk_set_ram(blk, DISK_SECTORS * VU_BLK_SECTOR) ||
        vu_blk_prepare_queue(dev->vqs[0]))
        abort();
    view = guest_init(dev->mem);
    blk->lim.capacity = DISK_SECTORS;
    blk->lim.max_discard_sectors = blk->lim.max_write_zeroes_sectors = 16;
    blk->lim.max_discard_seg = blk->lim.max_write_zeroes_seg = 4;
    memcpy(blk->lim.serial, "fuzz-serial-0123456", 20);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!dev)
        setup();
    if (size < 4)
        return 0;
    uint8_t cfg = data[0];
    uint32_t qsize = 1u << (data[1] % 8);          /* 1..128: the rings fit in 4 KiB */
    uint32_t base = (uint32_t)data[2] | (uint32_t)data[3] << 8;
    data += 4;
    size -= 4;
    /* A packed SET_VRING_BASE index beyond the ring was once used as is to
     * index the descriptor ring (fuzz/reproducers/ring_blk-packed-base-out-
     * of-ring); the queue must now refuse to start with it. */
    bool base_outside = (cfg & CFG_PACKED) && (base & 0x7fff) >= qsize;

    memset(view, 0, GUEST_BYTES);
    memcpy(view, data, size < GUEST_BYTES ? size : GUEST_BYTES);

    uint64_t features = 1ULL << VIRTIO_F_VERSION_1;
    if (cfg & CFG_PACKED)
        features |= 1ULL << VIRTIO_F_RING_PACKED;
    if (cfg & CFG_INDIRECT)
        features |= 1ULL << VIRTIO_RING_F_INDIRECT_DESC;
    if (cfg & CFG_EVENT_IDX)
        features |= 1ULL << VIRTIO_RING_F_EVENT_IDX;
    blk->lim.read_only = cfg & CFG_READ_ONLY;
    blk->lim.discard = blk->lim.write_zeroes = cfg & CFG_SEGMENTS;

    struct vu_vq *vq = dev->vqs[0];
    vu_vq_reset(vq);
    vu_dev_set_features(dev, features);
    if (vu_vq_set_num(vq, qsize) || vu_vq_set_base(vq, base))
        abort();
    vu_vq_set_addr(vq, 0, GUEST_UVA_BASE + DESC_OFF, GUEST_UVA_BASE + DEVICE_OFF,
                   GUEST_UVA_BASE + DRIVER_OFF, 0);
    if (vu_vq_start(vq)) {
        if (base_outside)
            return 0;   /* refused, as it must be */
        abort();        /* the ring addresses above are always valid */
    }
    if (base_outside) {
        fprintf(stderr, "ring_blk: packed base %#x started a ring of %u\n", base, qsize);
        abort();
    }
    vq->enabled = true;

    /* As a worker runs it: with the device's read lock held. */
    vu_dev_rdlock(dev);
    for (int i = 0; i < 4; i++)
        if (vu_blk_handler(blk, vq) != VU_HANDLED_MORE)
            break;
    vu_dev_unlock(dev);

    if (!vq->broken && vq->inflight != 0) {
        fprintf(stderr, "ring_blk: %u chains left in flight on a healthy queue\n", vq->inflight);
        abort();
    }
    return 0;
}
