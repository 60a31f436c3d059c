/* Fault injection for tests: inert unless the environment variable
 * VHOSTUSER_FAULT names a fault when the process starts. */
#ifndef VU_FAULT_H
#define VU_FAULT_H

/* VHOSTUSER_FAULT=exit-before-notify:N: the Nth notification of the
 * process (counted from 1) _exits with status VU_FAULT_EXIT after its used
 * index is published and before the call eventfd is written: a back-end
 * dying at the worst moment for the guest. */
#define VU_FAULT_EXIT 86
void vu_fault_before_notify(void);

#endif
