"""The device lock (csrc/vu_dev.c): queue workers hold it for reading, a
round at a time, and the control plane takes it for writing."""
import threading
import time

from vhostuser.dataplane import DataPlane
from vhostuser.native import lib


def test_the_control_plane_gets_the_lock_while_readers_hold_it_in_turn():
    """Busy workers whose rounds overlap leave the lock with a reader at
    every moment; a writer waiting must still get it (SET_MEM_TABLE,
    SET_VRING_*, GET_VRING_BASE answer QEMU only then). With readers
    preferred, as glibc's default rwlock does, it waited for as long as the
    load lasted. The readers (vu_fault_readers_start) keep going until the
    writer is done or 10 s have passed."""
    dp = DataPlane(2)
    readers = lib.vu_fault_readers_start(dp._dev)
    assert readers
    try:
        deadline = time.monotonic() + 10
        while lib.vu_fault_readers_taken(readers) < 1000 and time.monotonic() < deadline:
            time.sleep(0.001)
        before = lib.vu_fault_readers_taken(readers)
        assert before >= 1000, "the readers did not get going"
        done = threading.Event()

        def control_plane():
            dp.set_features(dp.features)   # under the write lock
            done.set()
        writer = threading.Thread(target=control_plane, daemon=True)
        writer.start()
        got_it = done.wait(10)
        # Still at it (they did not stop to let the writer in): they go on
        # once it is done, or went on all along.
        deadline = time.monotonic() + 10
        while lib.vu_fault_readers_taken(readers) == before and time.monotonic() < deadline:
            time.sleep(0.001)
        went_on = lib.vu_fault_readers_taken(readers) > before
    finally:
        lib.vu_fault_readers_stop(readers)
    writer.join(10)
    dp.close()
    assert went_on, "the readers stopped"
    assert got_it, "the write lock was not had within 10 s while readers held it in turn"
