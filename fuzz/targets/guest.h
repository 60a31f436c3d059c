/* A small guest memory shared by the ring harnesses: one memfd mapped once
 * by the harness (to write the fuzz input into) and once more per region by
 * the data plane, exactly as a front-end's memory table would be.
 *
 * Layout (guest-physical):
 *   [0x0000, 0x4000)   region 0: the rings live at its start
 *   [0x4000, 0x8000)   region 1: adjacent to 0, so buffers can straddle
 *   [0x8000, 0x10000)  hole: nothing mapped
 *   [0x10000, 0x14000) region 2: after the hole
 * User addresses are the gpa plus GUEST_UVA_BASE. */
#ifndef FUZZ_GUEST_H
#define FUZZ_GUEST_H

#include <stddef.h>
#include <stdint.h>

#define GUEST_REGION 0x4000u
#define GUEST_BYTES (3 * GUEST_REGION)      /* bytes of the memfd */
#define GUEST_UVA_BASE 0x7f0000000000ull

struct vu_mem;

/* Maps the memfd (first call only); returns the harness's view of it. */
uint8_t *guest_init(struct vu_mem *mem);
/* Guest-physical address of byte `off` of the harness's view. */
uint64_t guest_gpa(size_t off);

#endif
