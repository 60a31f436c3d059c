"""The sandbox's helper on its own: it does what its policy allows, refuses
the rest with a reason, and takes its policy once."""
from __future__ import annotations

import errno
import os
import socket
import stat

import pytest

from vhostuser.sandbox.access import BrokerClient


@pytest.fixture
def broker():
    b = BrokerClient.spawn()
    yield b
    b.close()
    b.proc.wait(10)


@pytest.fixture
def dirs(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "disk.img").write_bytes(bytes(4096))
    (tmp_path / "secret").write_bytes(b"secret")
    os.symlink(tmp_path / "secret", allowed / "link.img")
    os.mkdir(allowed / "sub")
    os.symlink(tmp_path, allowed / "sub" / "up")
    return tmp_path, allowed


def refused(call, code=errno.EACCES) -> str:
    with pytest.raises(OSError) as err:
        call()
    assert err.value.errno == code, err.value
    return err.value.strerror


def test_open_stat_bind_only_under_the_allowed_directories(broker, dirs):
    tmp, allowed = dirs
    broker.set_policy(dirs=[str(allowed)], sockets={}, connect=[], taps=[])
    fd = broker._one_fd("open", path=str(allowed / "disk.img"), read_only=False, direct=False)
    try:
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 4096
        assert os.get_blocking(fd)
    finally:
        os.close(fd)
    for path in (tmp / "secret", allowed / "link.img", allowed / "sub" / "up" / "secret",
                 allowed / ".." / "secret"):
        why = refused(lambda: broker._one_fd("open", path=str(path), read_only=True,
                                             direct=False))
        assert "outside the directories" in why, why
    assert refused(lambda: broker.call("stat", path="/etc/shadow"))
    assert refused(lambda: broker.call("open", path="relative.img", read_only=True),
                   errno.EINVAL)
    reply, _ = broker.call("stat", path=str(allowed / "disk.img"))
    assert reply["size"] == 4096
    # a directory is no image
    assert "not a regular file" in refused(
        lambda: broker.call("open", path=str(allowed / "sub"), read_only=True), errno.EINVAL)
    sock_path = str(allowed / "s.sock")
    lst = socket.socket(fileno=broker._one_fd("bind", path=sock_path))
    try:
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        c = socket.socket(socket.AF_UNIX)
        c.connect(sock_path)                     # listening
        c.close()
        assert "another process" in refused(lambda: broker.call("bind", path=sock_path),
                                            errno.EADDRINUSE)
    finally:
        lst.close()
    assert broker.call("unlink", path=sock_path)[0]["removed"] is True
    assert not os.path.exists(sock_path)
    assert "outside" in refused(lambda: broker.call("bind", path=str(tmp / "x.sock")))


def test_unlink_only_what_it_was_given_and_only_while_it_is_that_socket(broker, tmp_path):
    mine = str(tmp_path / "mine.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(mine)
    st = os.lstat(mine)
    other = str(tmp_path / "other.sock")
    socket.socket(socket.AF_UNIX).bind(other)
    broker.set_policy(sockets={mine: [st.st_dev, st.st_ino]}, dirs=[], connect=[], taps=[])
    assert "not a socket this program made" in refused(lambda: broker.call("unlink",
                                                                           path=other))
    # replaced by someone else meanwhile: left alone
    os.unlink(mine)
    s2 = socket.socket(socket.AF_UNIX)
    s2.bind(mine)
    assert broker.call("unlink", path=mine)[0]["removed"] is False
    assert os.path.exists(mine) and os.path.exists(other)
    s.close()
    s2.close()


def test_connect_tun_policy_and_bad_requests(broker, tmp_path):
    path = str(tmp_path / "qemu.sock")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    lst.listen(1)
    assert "no policy yet" in refused(lambda: broker.call("connect", path=path), errno.EPERM)
    broker.set_policy(connect=[path], sockets={}, dirs=[], taps=["vm*"])
    conn = socket.socket(fileno=broker._one_fd("connect", path=path))
    peer, _ = lst.accept()
    conn.sendall(b"x")
    assert peer.recv(1) == b"x"
    for s in (conn, peer, lst):
        s.close()
    assert refused(lambda: broker.call("connect", path=str(tmp_path / "other.sock")))
    assert "--allow-tap" in refused(lambda: broker.call("tun", ifname="eth0", flags=0x5002))
    assert "flags" in refused(lambda: broker.call("tun", ifname="vm1", flags=0x0001),
                              errno.EINVAL)
    assert "once" in refused(lambda: broker.set_policy(dirs=["/"]), errno.EPERM)
    assert "unknown operation" in refused(lambda: broker.call("exec", argv=["sh"]),
                                          errno.EINVAL)
    # still serving after all that
    assert broker.proc.poll() is None


def test_the_helper_goes_when_the_program_does(tmp_path):
    b = BrokerClient.spawn()
    b.set_policy(sockets={}, dirs=[], connect=[], taps=[])
    b.close()
    assert b.proc.wait(10) == 0
