/* Everything the cffi module sees. */
#include "vu_common.h"
#include "vu_memory.h"
#include "vu_queue.h"
#include "vu_dev.h"
#include "vu_worker.h"
#include "vu_blk.h"
#include "vu_net.h"
#include "vu_switch.h"
