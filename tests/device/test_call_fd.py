"""SET_VRING_CALL for a ring that already runs: the new call fd gets one
notification of its own.

QEMU starts a ring with SET_VRING_KICK while the ring's call fd is still
the "masked notifier" it gave at initialisation, sends the real call fd
with SET_VRING_CALL right after, and clears what the masked notifier got in
between. A completion signalled in that window is lost; with EVENT_IDX the
back-end signals again only once the driver moves used_event, which it does
only after an interrupt. A receive queue with its own MSI-X vector then
stalls for good: QEMU 10's net tests (MSI-X) found it after a back-end
restart and after live migration, when frames wait on the TAP while QEMU
starts the rings. Like libvhost-user, the back-end signals every new call fd
once; a spurious interrupt costs the driver a look at its used ring.
"""
import os
import select

from vhostuser.blk import BlkDevice, RamBackend

MIB = 1 << 20


def test_a_completion_signalled_before_set_vring_call_still_reaches_the_driver(blk_client):
    with blk_client(BlkDevice(RamBackend(MIB))) as (srv, blk):
        vq = blk.queues[0]
        own = vq.call_fd
        masked = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            blk.fe.set_vring_call(0, masked)      # the fd the front-end will not watch
            vq.call_fd = masked
            blk.write(0, b"x" * 512)              # completed, and signalled on `masked`
            vq.call_fd = own
            vq.take_calls()                       # nothing older counts
            blk.fe.set_vring_call(0, own)         # the real one, after the completion
            assert select.select([own], [], [], 5.0)[0], "the new call fd was never signalled"
            assert os.eventfd_read(own) == 1
            # and the ring goes on as before
            assert blk.read(0, 512) == b"x" * 512
        finally:
            os.close(masked)
