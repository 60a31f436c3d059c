/* Reads and writes an image through a mapping of its page cache; see vu_filemap.h. */
#include "vu_filemap.h"
#include "vu_qos.h"   /* vu_now_ns */

#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#define CHUNK ((uint64_t)1 << VU_FILEMAP_CHUNK_SHIFT)
#define PAGE 4096u

/* SIGBUS guard ------------------------------------------------------------ */

/* Set while this thread copies from a mapping: a fault, which can only be
 * the copy's own, jumps back. Any other SIGBUS (sent by kill, or raised
 * outside a copy) belongs to whoever handled it before us. */
static __thread sigjmp_buf *volatile guard;
static struct sigaction prev_sigbus;      /* written once, before ours is installed */
static int prev_reset;                    /* its SA_RESETHAND was used up: now SIG_DFL */
static pthread_once_t guard_once = PTHREAD_ONCE_INIT;
static int guard_installed;

/* A signal the kernel raised for an access (not kill/sigqueue/tgkill, and
 * not an asynchronous machine-check report): returning re-runs the access. */
static bool is_fault(const siginfo_t *si)
{
    return si && si->si_code > 0 && si->si_code != BUS_MCEERR_AO;
}

/* What the process would have done without us: the previous handler, with
 * the flags and mask it was installed with, or the default or ignore. */
static void chain(int sig, siginfo_t *si, void *uc)
{
    struct sigaction prev = prev_sigbus;
    if (__atomic_load_n(&prev_reset, __ATOMIC_ACQUIRE)) {
        prev.sa_handler = SIG_DFL;
        prev.sa_flags = 0;
    }
    bool info = prev.sa_flags & SA_SIGINFO;
    bool handler = info ? prev.sa_sigaction != NULL
                        : prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN;
    if (handler) {
        if (prev.sa_flags & SA_RESETHAND)
            __atomic_store_n(&prev_reset, 1, __ATOMIC_RELEASE);
        /* The kernel would have blocked its sa_mask, and the signal itself
         * unless SA_NODEFER, while it runs. */
        sigset_t mask = prev.sa_mask, old;
        if (!(prev.sa_flags & SA_NODEFER))
            sigaddset(&mask, sig);
        pthread_sigmask(SIG_BLOCK, &mask, &old);
        if (info)
            prev.sa_sigaction(sig, si, uc);
        else
            prev.sa_handler(sig);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        return;
    }
    /* Ignored: a sent signal is dropped. A fault can't be ignored: the
     * kernel would have applied the default action. */
    if (prev.sa_handler == SIG_IGN && !is_fault(si))
        return;
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    /* A fault re-runs its access on return and ends the process with the
     * default action; anything else must be delivered again. */
    if (!is_fault(si))
        raise(sig);
}

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    sigjmp_buf *env = guard;
    if (env && is_fault(si)) {
        guard = NULL;
        siglongjmp(*env, 1);
    }
    chain(sig, si, uc);
}

static void install_guard(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    /* NODEFER: siglongjmp leaves the handler without sigreturn, and
     * SIGBUS must not stay blocked in this thread afterwards. ONSTACK: a
     * handler we chain to may rely on the alternate stack it asked for. */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    guard_installed = sigaction(SIGBUS, &sa, &prev_sigbus) == 0;
}

/* Whether our handler still gets SIGBUS: a program may install its own
 * after ours, and a fault in a copy would then go to a handler that can't
 * jump back (a Python handler returns, and the access faults forever). */
static bool guard_in_place(void)
{
    struct sigaction cur;
    return guard_installed && sigaction(SIGBUS, NULL, &cur) == 0 &&
           (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus;
}

/* This thread's last "yes" from guard_in_place(), trusted until
 * vu_filemap_recheck_guard(): asking is a system call, which cost a quarter
 * of the worker's time per cached 4 KiB read (bench/pollprofile.py). */
static __thread bool guard_known;

void vu_filemap_recheck_guard(void)
{
    guard_known = false;
}

/* Copies len bytes between the mapping at file and iov: into the file when
 * to_file, out of it otherwise. */
__attribute__((noinline)) static void copy_iov(uint8_t *file, const struct iovec *iov,
                                              uint32_t niov, uint64_t len, bool to_file)
{
    for (uint32_t i = 0; i < niov && len > 0; i++) {
        size_t n = iov[i].iov_len < len ? iov[i].iov_len : (size_t)len;
        if (to_file)
            memcpy(file, iov[i].iov_base, n);
        else
            memcpy(iov[i].iov_base, file, n);
        file += n;
        len -= n;
    }
}

/* copy_iov under the guard; false if it faulted. A fault may come from
 * either side: the file's page (shrunk, evicted and unreadable, no space for
 * a hole: ENOSPC is a SIGBUS through a mapping) or the guest's. Nothing here
 * changes after sigsetjmp, so nothing is clobbered by the jump back. */
static bool guarded_copy(uint8_t *file, const struct iovec *iov, uint32_t niov, uint64_t len,
                         bool to_file)
{
    sigjmp_buf env;
    if (sigsetjmp(env, 0)) {
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        return false;
    }
    guard = &env;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);   /* armed before the first access */
    copy_iov(file, iov, niov, len, to_file);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);   /* disarmed after the last one */
    guard = NULL;
    return true;
}

/* Mapping --------------------------------------------------------------------- */

bool vu_filemap_memory_backed(int fd)
{
    struct statfs fs;
    return fstatfs(fd, &fs) == 0 &&
           ((unsigned long)fs.f_type == TMPFS_MAGIC || (unsigned long)fs.f_type == RAMFS_MAGIC);
}

/* Local disk file systems whose page cache a mapping reads like preadv does
 * (not network or FUSE ones, where a fault may wait on a server). */
static bool local_disk_fs(int fd)
{
    struct statfs fs;
    if (fstatfs(fd, &fs) < 0)
        return false;
    unsigned long t = (unsigned long)fs.f_type;
    return t == EXT4_SUPER_MAGIC || t == XFS_SUPER_MAGIC || t == BTRFS_SUPER_MAGIC;
}

int vu_filemap_open(struct vu_filemap *m, int fd)
{
    memset(m, 0, sizeof(*m));
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (!S_ISREG(st.st_mode) || st.st_size <= 0)
        return 0;
    bool in_memory = vu_filemap_memory_backed(fd);
    if (!in_memory && !local_disk_fs(fd))
        return 0;
    /* Only O_RDONLY/O_RDWR descriptors can be mapped; O_DIRECT ones are not
     * mapped (they asked to bypass the cache). */
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_DIRECT))
        return 0;
    pthread_once(&guard_once, install_guard);
    if (!guard_installed)
        return 0;   /* without the guard a shrinking file would kill us: don't map */
    uint64_t len = ((uint64_t)st.st_size + PAGE - 1) & ~(uint64_t)(PAGE - 1);
    uint64_t nchunks = (len + CHUNK - 1) >> VU_FILEMAP_CHUNK_SHIFT;
    size_t words = (size_t)((nchunks + 63) / 64);
    uint64_t *resident = calloc(words, sizeof(uint64_t));
    uint64_t *sparse = calloc(words, sizeof(uint64_t));
    /* Writable when the descriptor is: writes of resident pages are then a
     * copy too. No MAP_POPULATE: faulting in holes is exactly what must not
     * happen. */
    bool writable = (fl & O_ACCMODE) == O_RDWR;
    void *p = resident && sparse ? mmap(NULL, len, PROT_READ | (writable ? PROT_WRITE : 0),
                                        MAP_SHARED, fd, 0)
                                 : MAP_FAILED;
    if (p == MAP_FAILED) {
        int err = resident && sparse ? errno : ENOMEM;
        free(resident);
        free(sparse);
        return -err;
    }
    m->base = p;
    m->writable = writable;
    m->len = len;
    m->nchunks = nchunks;
    m->resident = resident;
    m->sparse = sparse;
    m->recheck = !in_memory;
    m->in_memory = in_memory;
    m->checked_ns = vu_now_ns();
    return 0;
}

void vu_filemap_close(struct vu_filemap *m)
{
    if (m->base)
        munmap((void *)m->base, m->len);
    free(m->resident);
    free(m->sparse);
    memset(m, 0, sizeof(*m));
}

static bool test_bit(uint64_t *bits, uint64_t c)
{
    return __atomic_load_n(&bits[c >> 6], __ATOMIC_RELAXED) & (1ull << (c & 63));
}

static void set_bit(uint64_t *bits, uint64_t c)
{
    __atomic_fetch_or(&bits[c >> 6], 1ull << (c & 63), __ATOMIC_RELAXED);
}

static void clear_bit(uint64_t *bits, uint64_t c)
{
    if (test_bit(bits, c))   /* a plain load first: most writes find nothing to clear */
        __atomic_fetch_and(&bits[c >> 6], ~(1ull << (c & 63)), __ATOMIC_RELAXED);
}

/* True when every page of chunk c is in memory; asks the kernel once, then
 * remembers the answer until a write or a hole punch changes it. */
static bool chunk_resident(struct vu_filemap *m, uint64_t c)
{
    if (test_bit(m->resident, c))
        return true;
    if (test_bit(m->sparse, c))
        return false;
    uint64_t start = c << VU_FILEMAP_CHUNK_SHIFT;
    uint64_t n = m->len - start < CHUNK ? m->len - start : CHUNK;
    unsigned char vec[CHUNK / PAGE];
    bool all = mincore((void *)(m->base + start), (size_t)n, vec) == 0;
    for (uint64_t i = 0; all && i < (n + PAGE - 1) / PAGE; i++)
        all = vec[i] & 1;
    set_bit(all ? m->resident : m->sparse, c);
    return all;
}

/* Forgets what mincore() said about every chunk (any worker may do it;
 * one asking at the same time just asks the kernel again). */
static void forget_residency(struct vu_filemap *m)
{
    size_t words = (size_t)((m->nchunks + 63) / 64);
    for (size_t i = 0; i < words; i++) {
        __atomic_store_n(&m->resident[i], 0, __ATOMIC_RELAXED);
        __atomic_store_n(&m->sparse[i], 0, __ATOMIC_RELAXED);
    }
}

/* Whether [off, off + len) may be copied through the mapping now: inside
 * it, our guard in place, every chunk seen whole in memory. */
static bool usable(struct vu_filemap *m, uint64_t off, uint64_t len)
{
    if (!m->base || len == 0 || off >= m->len || len > m->len - off)
        return false;
    if (!guard_known) {
        if (!guard_in_place())
            return false;
        guard_known = true;
    }
    if (m->recheck &&
        __atomic_add_fetch(&m->uses, 1, __ATOMIC_RELAXED) % VU_FILEMAP_CLOCK_EVERY == 0) {
        uint64_t now = vu_now_ns();
        if (now - __atomic_load_n(&m->checked_ns, __ATOMIC_RELAXED) >= VU_FILEMAP_RECHECK_NS) {
            __atomic_store_n(&m->checked_ns, now, __ATOMIC_RELAXED);
            forget_residency(m);
        }
    }
    uint64_t last = (off + len - 1) >> VU_FILEMAP_CHUNK_SHIFT;
    for (uint64_t c = off >> VU_FILEMAP_CHUNK_SHIFT; c <= last; c++) {
        if (!chunk_resident(m, c))
            return false;
    }
    return true;
}

/* After a fault: shrunk, evicted or out of space under us; ask again next time. */
static void faulted(struct vu_filemap *m, uint64_t off, uint64_t len)
{
    __atomic_fetch_add(&m->faults, 1, __ATOMIC_RELAXED);
    uint64_t last = (off + len - 1) >> VU_FILEMAP_CHUNK_SHIFT;
    for (uint64_t c = off >> VU_FILEMAP_CHUNK_SHIFT; c <= last; c++)
        clear_bit(m->resident, c);
}

int vu_filemap_read(struct vu_filemap *m, const struct iovec *iov, uint32_t niov, uint64_t off,
                    uint64_t len)
{
    if (!usable(m, off, len)) {
        __atomic_fetch_add(&m->fallback_reads, 1, __ATOMIC_RELAXED);
        return -1;
    }
    if (!guarded_copy((uint8_t *)m->base + off, iov, niov, len, false)) {
        faulted(m, off, len);
        __atomic_fetch_add(&m->fallback_reads, 1, __ATOMIC_RELAXED);
        return -1;
    }
    __atomic_fetch_add(&m->mapped_reads, 1, __ATOMIC_RELAXED);
    return 0;
}

int vu_filemap_write(struct vu_filemap *m, const struct iovec *iov, uint32_t niov, uint64_t off,
                     uint64_t len)
{
    if (!m->writable || !usable(m, off, len))
        return -1;
    if (!guarded_copy((uint8_t *)m->base + off, iov, niov, len, true)) {
        faulted(m, off, len);
        return -1;
    }
    __atomic_fetch_add(&m->mapped_writes, 1, __ATOMIC_RELAXED);
    return 0;
}

static void clear_range(struct vu_filemap *m, uint64_t *bits, uint64_t off, uint64_t len)
{
    if (!m->base || len == 0 || off >= m->len)
        return;
    uint64_t end = len - 1 < m->len - 1 - off ? off + len - 1 : m->len - 1;   /* no overflow */
    for (uint64_t c = off >> VU_FILEMAP_CHUNK_SHIFT; c <= end >> VU_FILEMAP_CHUNK_SHIFT; c++)
        clear_bit(bits, c);
}

void vu_filemap_written(struct vu_filemap *m, uint64_t off, uint64_t len)
{
    clear_range(m, m->sparse, off, len);
}

void vu_filemap_punching(struct vu_filemap *m, uint64_t off, uint64_t len)
{
    clear_range(m, m->resident, off, len);
}
