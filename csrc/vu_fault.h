/* Fault injection for tests: inert unless the environment variable
 * VHOSTUSER_FAULT names a fault when the process starts. */
#ifndef VU_FAULT_H
#define VU_FAULT_H

#include <stdint.h>

/* VHOSTUSER_FAULT=exit-before-notify:N: the Nth notification of the
 * process (counted from 1) _exits with status VU_FAULT_EXIT after its used
 * index is published and before the call eventfd is written: a back-end
 * dying at the worst moment for the guest. */
#define VU_FAULT_EXIT 86
void vu_fault_before_notify(void);

/* VHOSTUSER_FAULT=sandbox-escape:WHAT[:ARG]: the first queue worker thread
 * of the process, when it starts (a front-end connected and started a
 * ring, long after start-up), tries what a compromised back-end would and
 * writes one line to stderr, "vhostuser-fault: sandbox-escape WHAT: " and
 * "refused (ERRNO NAME)" or "DONE", for the test to check; under a
 * seccomp filter that kills, the line never comes. WHAT is one of
 *   exec    execve("/bin/sh", ["sh", "-c", ARG])
 *   open    open("/etc/shadow", O_RDONLY), then read a byte
 *   socket  socket(AF_INET, SOCK_STREAM), then connect to 127.0.0.1:ARG
 *   ptrace  ptrace(PTRACE_ATTACH, ARG) (a pid)
 * Tests only: nothing else sets the variable. */
void vu_fault_worker_start(void);

/* Tests only: when not NULL, called by a file engine's round once it
 * dropped the device lock and before it submits what it queued to io_uring,
 * where a control-plane thread may come in (reset a ring, end the session).
 * Nothing else sets it. */
extern void (*vu_fault_round_unlocked)(void);

/* Tests only: when not 0, every io_uring_enter fails with this errno, as
 * on a kernel that refuses the ring for good. */
extern int vu_fault_uring_enter_errno;

/* Tests only: two threads that hold dev's read lock in turn, each taking
 * it again before the other lets go, so the lock always has a reader (as
 * busy queue workers may have by chance), until vu_fault_readers_stop,
 * which returns how many times they took it again. One whose partner has
 * not got it back within 200 ms (held up by a waiting writer) lets go
 * anyway, as a worker ends its round. */
struct vu_dev;
struct vu_fault_readers;
struct vu_fault_readers *vu_fault_readers_start(struct vu_dev *dev);
uint64_t vu_fault_readers_taken(struct vu_fault_readers *r);
uint64_t vu_fault_readers_stop(struct vu_fault_readers *r);

/* Tests only: nthreads threads (at most 8) at once, each handing `each`
 * copies of a frame to vu_net_inject on queue pair qp, as the loop's
 * inject() and a worker's TAP or loopback deliveries do for one queue.
 * Returns how many were delivered, or -1 if a thread could not start. */
struct vu_net_dev;
int64_t vu_fault_net_inject_threads(struct vu_net_dev *n, uint32_t qp, const uint8_t *data,
                                    uint32_t len, int nthreads, uint64_t each);

#endif
