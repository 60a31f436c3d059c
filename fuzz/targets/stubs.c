/* Stand-ins for the callbacks cffi defines in the Python module
 * (extern "Python+C"): the harnesses only use the C back-ends, so these
 * must never run. Reaching one is a harness bug, hence abort(). */
#include <stdlib.h>

struct vu_vq;
struct vu_elem;
struct vu_blk_req;
struct vu_net_frame;

int vu_py_batch(void *ctx, struct vu_vq *vq, struct vu_elem **elems, int n)
{
    (void)ctx; (void)vq; (void)elems; (void)n;
    abort();
}

int vu_blk_py_batch(void *ctx, struct vu_vq *vq, struct vu_blk_req **reqs, int n)
{
    (void)ctx; (void)vq; (void)reqs; (void)n;
    abort();
}

int vu_blk_py_settle(void *ctx, struct vu_vq *vq, struct vu_blk_req **reqs, int n)
{
    (void)ctx; (void)vq; (void)reqs; (void)n;
    abort();
}

/* Weak: ring_net stands in for a Python network back-end with its own. */
__attribute__((weak)) int vu_net_py_tx(void *ctx, unsigned qp, struct vu_net_frame **frames, int n)
{
    (void)ctx; (void)qp; (void)frames; (void)n;
    abort();
}

/* vu_fault.c's test hook injects from threads through it; ring_blk links
 * no network code (ring_net links the real one, which wins). */
struct vu_net_dev;
__attribute__((weak)) int vu_net_inject(struct vu_net_dev *n, unsigned qp,
                                        const unsigned char *data, unsigned len)
{
    (void)n; (void)qp; (void)data; (void)len;
    abort();
}

struct vu_dev;

/* Breaking a queue is an expected outcome of fuzzing: nothing to report. */
void vu_on_queue_broken(struct vu_dev *dev, unsigned index, int err, unsigned long long detail)
{
    (void)dev; (void)index; (void)err; (void)detail;
}

/* A ring whose io_uring_enter failed for good: nothing to report either. */
void vu_on_uring_failed(struct vu_dev *dev, unsigned index, int err)
{
    (void)dev; (void)index; (void)err;
}
