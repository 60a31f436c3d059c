/* Fault injection for tests (vu_fault.h). Parsed once; a process without
 * VHOSTUSER_FAULT pays one predictable branch per notification. */
#include "vu_fault.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static pthread_once_t parsed = PTHREAD_ONCE_INIT;
static uint64_t exit_before_notify;   /* 0: off */
static uint64_t notifications;

static void parse(void)
{
    const char *spec = getenv("VHOSTUSER_FAULT");
    const char *name = "exit-before-notify:";
    if (spec && strncmp(spec, name, strlen(name)) == 0)
        exit_before_notify = strtoull(spec + strlen(name), NULL, 10);
}

void vu_fault_before_notify(void)
{
    pthread_once(&parsed, parse);
    if (__builtin_expect(exit_before_notify == 0, 1))
        return;
    if (__atomic_add_fetch(&notifications, 1, __ATOMIC_RELAXED) == exit_before_notify)
        _exit(VU_FAULT_EXIT);
}
