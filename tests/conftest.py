"""Fixtures shared across test directories."""
import shutil
import tempfile

import pytest

from vhostuser_devkit.daemon import DaemonProcess


@pytest.fixture
def workdir():
    # Short: unix socket paths must fit in 108 bytes.
    d = tempfile.mkdtemp(prefix="vhm", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(workdir):
    """A vhostuser-daemon process in workdir; it must exit 0 on SIGTERM and
    log no traceback."""
    d = DaemonProcess(workdir)
    yield d
    rc = d.terminate()
    assert rc == 0, d.output()
    assert "Traceback" not in d.output(), d.output()
