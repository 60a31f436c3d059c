"""Network-storage disks as vhostuser-daemon exports: an NBD disk (nbdkit)
next to a local one, added and removed over the control socket, and a bad
remote spec refused without changing anything."""
import os

import pytest

from vhostuser.frontend import BlkClient, Frontend
from vhostuser_devkit.nbd import NbdServer, require_tools
from vhostuser_devkit.patterns import pattern

MIB = 1 << 20


def test_nbd_export_in_the_daemon(workdir, daemon):
    require_tools()
    with NbdServer.nbdkit(["memory", "16M"], unix=os.path.join(workdir, "nbdkit.sock")) as srv:
        got = daemon.call("add", type="blk", name="remote", socket_path=daemon.path("r.sock"),
                          nbd=srv.uri, remote_timeout=5)
        assert got["name"] == "remote"
        ram = daemon.call("add", type="blk", name="local", socket_path=daemon.path("l.sock"),
                          ramdisk="4M")
        assert ram["name"] == "local"
        with Frontend.connect(daemon.path("r.sock")) as fe:
            blk = BlkClient.setup(fe)
            assert blk.capacity == 16 * MIB // 512
            data = os.urandom(64 * 1024)
            blk.write(100, data)
            blk.flush()
            assert blk.read(100, len(data)) == data
        stats = daemon.call("stats", name="remote")
        assert stats["totals"]["writes"] >= 1 and stats["totals"]["bytes_read"] == len(data)
        daemon.call("remove", name="remote")
    names = [e["name"] for e in daemon.call("list")]
    assert names == ["local"]


@pytest.mark.parametrize("spec, code", [
    ({"nbd": "http://example.com/disk"}, "bad-args"),
    ({"nbd": "nbd://127.0.0.1:1/", "remote_timeout": -1}, "bad-args"),
    ({"rbd": "just-an-image"}, "bad-args"),
    ({"nbd": "nbd+unix:///?socket=/nonexistent/nbd.sock", "remote_timeout": 1}, None),
])
def test_bad_remote_specs_change_nothing(daemon, spec, code):
    before = daemon.call("list")
    with daemon.client() as c:
        with pytest.raises(Exception) as err:
            c.call("add", {"type": "blk", "name": "x", "socket_path": daemon.path("x.sock"),
                           **spec})
    if code:
        assert getattr(err.value, "code", None) == code, err.value
    assert daemon.call("list") == before
    assert not os.path.exists(daemon.path("x.sock"))


def test_nbd_export_added_with_vhostuser_ctl(workdir, daemon):
    """vhostuser-ctl add-blk --nbd, with vhostuser-blk's options of the same
    names; what the guest side wrote is in qemu-nbd's image."""
    require_tools()
    image = os.path.join(workdir, "nbd.img")
    with open(image, "wb") as f:
        f.truncate(8 * MIB)
    with NbdServer.qemu_nbd(image, unix=os.path.join(workdir, "qnbd.sock")) as srv:
        daemon.ctl("add-blk", "n0", "--socket-path", "n0.sock", "--nbd", srv.uri,
                   "--remote-timeout", "5", "--nbd-connections", "2", "--queues", "2")
        spec = daemon.call("describe", name="n0")["spec"]
        assert (spec["nbd"], spec["remote_timeout"], spec["nbd_connections"]) == \
            (srv.uri, 5.0, 2)
        with Frontend.connect(daemon.path("n0.sock")) as fe:
            blk = BlkClient.setup(fe, queues=2)
            assert blk.capacity == 8 * MIB // 512
            for q in (0, 1):
                blk.write(64 + q * 128, pattern(q, 65536), queue=q)
            blk.flush()
            assert blk.read(64, 65536, queue=1) == pattern(0, 65536)
        daemon.ctl("remove", "n0")
    with open(image, "rb") as f:
        data = f.read()
    for q in (0, 1):
        at = (64 + q * 128) * 512
        assert data[at:at + 65536] == pattern(q, 65536)
