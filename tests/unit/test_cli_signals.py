"""The back-end programs' signal handling, as a service manager uses it."""
import os
import signal
import subprocess
import sys
import time


def test_sighup_does_not_end_vhostuser_net(tmp_path):
    """vhostuser-net has nothing to reload, but a SIGHUP (a service manager's
    reload) must not take the interface down: it is logged and ignored."""
    sock = tmp_path / "net.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vhostuser.cli.net", "--socket-path",
                             str(sock), "--sink"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no socket"
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None, "SIGHUP ended vhostuser-net"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "SIGHUP" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(sock)
