/* Fault injection for tests (vu_fault.h). Parsed once; a process without
 * VHOSTUSER_FAULT pays one predictable branch per notification. */
#include "vu_fault.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <unistd.h>

void (*vu_fault_round_unlocked)(void);
int vu_fault_uring_enter_errno;

static pthread_once_t parsed = PTHREAD_ONCE_INIT;
static uint64_t exit_before_notify;   /* 0: off */
static uint64_t notifications;
static char escape[64];               /* sandbox-escape: what to try ("" off) */
static char escape_arg[256];
static int escape_tried;

static void parse(void)
{
    const char *spec = getenv("VHOSTUSER_FAULT");
    const char *name = "exit-before-notify:";
    if (spec && strncmp(spec, name, strlen(name)) == 0)
        exit_before_notify = strtoull(spec + strlen(name), NULL, 10);
    const char *esc = "sandbox-escape:";
    if (spec && strncmp(spec, esc, strlen(esc)) == 0) {
        const char *what = spec + strlen(esc);
        const char *colon = strchr(what, ':');
        size_t n = colon ? (size_t)(colon - what) : strlen(what);
        if (n < sizeof(escape)) {
            memcpy(escape, what, n);
            escape[n] = 0;
        }
        if (colon)
            snprintf(escape_arg, sizeof(escape_arg), "%s", colon + 1);
    }
}

static void report(const char *what, int rc, int err)
{
    char line[200];
    int n = rc < 0 ? snprintf(line, sizeof(line), "vhostuser-fault: sandbox-escape %s: refused (%s)\n",
                              what, strerrorname_np(err) ? strerrorname_np(err) : "?")
                   : snprintf(line, sizeof(line), "vhostuser-fault: sandbox-escape %s: DONE\n", what);
    ssize_t w = write(2, line, (size_t)n);
    (void)w;
}

void vu_fault_worker_start(void)
{
    pthread_once(&parsed, parse);
    if (__builtin_expect(escape[0] == 0, 1))
        return;
    if (__atomic_exchange_n(&escape_tried, 1, __ATOMIC_RELAXED))
        return;
    int rc = -1, err = 0;
    if (strcmp(escape, "exec") == 0) {
        char *argv[] = {"sh", "-c", escape_arg, NULL};
        char *envp[] = {"PATH=/usr/bin:/bin", NULL};
        execve("/bin/sh", argv, envp);
        err = errno;                  /* only returns on failure */
    } else if (strcmp(escape, "open") == 0) {
        int fd = open("/etc/shadow", O_RDONLY | O_CLOEXEC);
        err = errno;
        if (fd >= 0) {
            char c;
            rc = read(fd, &c, 1) == 1 ? 0 : -1;
            err = errno;
            close(fd);
        }
    } else if (strcmp(escape, "socket") == 0) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        err = errno;
        if (fd >= 0) {
            struct sockaddr_in sin = {.sin_family = AF_INET,
                                      .sin_port = htons((uint16_t)atoi(escape_arg))};
            sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            rc = connect(fd, (struct sockaddr *)&sin, sizeof(sin));
            err = errno;
            if (rc == 0) {
                ssize_t w = write(fd, "escaped\n", 8);
                (void)w;
            }
            close(fd);
        }
    } else if (strcmp(escape, "ptrace") == 0) {
        rc = (int)ptrace(PTRACE_ATTACH, (pid_t)atoi(escape_arg), NULL, NULL);
        err = errno;
        if (rc == 0)
            ptrace(PTRACE_DETACH, (pid_t)atoi(escape_arg), NULL, NULL);
    } else {
        err = EINVAL;
    }
    report(escape, rc, err);
}

void vu_fault_before_notify(void)
{
    pthread_once(&parsed, parse);
    if (__builtin_expect(exit_before_notify == 0, 1))
        return;
    if (__atomic_add_fetch(&notifications, 1, __ATOMIC_RELAXED) == exit_before_notify)
        _exit(VU_FAULT_EXIT);
}
