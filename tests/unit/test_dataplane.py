"""DataPlane construction when the system refuses part of it."""
import subprocess
import sys

MAKE_WITH_FEW_FDS = """
import os, resource
from vhostuser.dataplane import DataPlane
DataPlane(1).close()          # imports and first-use allocations done
n = len(os.listdir('/proc/self/fd'))
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 4, n + 4))
try:
    DataPlane(8)              # a worker each: an epoll fd and an eventfd
except OSError as exc:
    print("OSError:", exc)
"""


def test_a_worker_that_cannot_be_made_is_an_oserror():
    """Out of fds at the third worker: the OSError that says so, not an
    error from cleaning up what was made (the review of 00ef964 found
    close() reading state set only after the workers)."""
    out = subprocess.run([sys.executable, "-c", MAKE_WITH_FEW_FDS], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OSError: could not create a worker (epoll/eventfd)", out.stderr
