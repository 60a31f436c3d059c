"""Bad requests get a precise error reply, the connection stays usable, and
nothing changes."""
import json
import os
import socket

import pytest

from vhostuser.manage import ControlError
from vhostuser.manage.control import MAX_LINE


@pytest.fixture
def populated(daemon, image):
    with daemon.client() as c:
        c.add_blk("d0", daemon.path("d0.sock"), ramdisk="4M")
        c.add_blk("d1", daemon.path("d1.sock"), blk_file=image, read_only=True)
        c.add_net("n0", daemon.path("n0.sock"), backend="null")
    return daemon


def _refused(client, cmd, args=None):
    with pytest.raises(ControlError) as info:
        client.call(cmd, args)
    return info.value.code, info.value.message


def test_bad_commands_are_refused_and_change_nothing(populated, image, workdir):
    d = populated
    with d.client() as c:
        before = c.list()
        described = {e["name"]: c.describe(e["name"]) for e in before}
        blk = {"type": "blk", "name": "new", "socket_path": d.path("new.sock"), "ramdisk": "1M"}
        cases = [
            (("bogus", None), "unknown-command"),
            (("describe", {}), "bad-args"),                       # missing name
            (("describe", {"name": "nope"}), "no-such-export"),
            (("describe", {"name": 7}), "bad-args"),
            (("remove", {"name": "nope"}), "no-such-export"),
            (("remove", {"name": "d0", "force": True}), "bad-args"),  # unknown argument
            (("add", {**blk, "name": "d0"}), "export-exists"),
            (("add", {**blk, "socket_path": d.path("d0.sock")}), "socket-in-use"),
            (("add", {**blk, "socket_path": d.path("./sub/../d0.sock")}), "socket-in-use"),
            (("add", {**blk, "socket_path": d.control}), "socket-in-use"),
            (("add", {**blk, "queues": "2"}), "bad-args"),
            (("add", {**blk, "queues": 0}), "bad-args"),
            (("add", {**blk, "read_only": "yes"}), "bad-args"),
            (("add", {**blk, "ramdisk": "1000"}), "bad-args"),     # not a multiple of 512
            (("add", {**blk, "ramdisk": "lots"}), "bad-args"),
            (("add", {**blk, "colour": "red"}), "bad-args"),
            (("add", {**blk, "aio": "sync"}), "bad-args"),         # aio is for files only
            (("add", {**blk, "qos": {"iops": -1}}), "bad-args"),
            (("add", {**blk, "blk_file": image}), "bad-args"),         # two sources
            (("add", {k: v for k, v in blk.items() if k != "ramdisk"}), "bad-args"),
            (("add", {"type": "blk", "name": "new", "socket_path": d.path("new.sock"),
                      "blk_file": os.path.join(workdir, "missing.img")}), "bad-args"),
            (("add", {"type": "blk", "name": "new", "socket_path": "rel.sock", "ramdisk": "1M"}),
             "bad-args"),
            (("add", {**blk, "socket_path": "/nonexistent-dir/x.sock"}), "bad-args"),
            (("add", {**blk, "name": "bad name!"}), "bad-args"),
            (("add", {**blk, "type": "scsi"}), "bad-args"),
            (("add", {"type": "net", "name": "n1", "socket_path": d.path("n1.sock"),
                      "backend": "null", "mac": "01:00:00:00:00:01"}), "bad-args"),
            (("add", {"type": "net", "name": "n1", "socket_path": d.path("n1.sock"),
                      "backend": "null", "queues": 17}), "bad-args"),
            (("add", {"type": "net", "name": "n1", "socket_path": d.path("n1.sock"),
                      "backend": "null", "in_order": 1}), "bad-args"),
            (("resize", {"name": "n0", "size": "8M"}), "not-supported"),
            (("resize", {"name": "d0", "size": 1000}), "bad-args"),
            (("resize", {"name": "d0", "size": True}), "bad-args"),
            (("set-read-only", {"name": "d0", "read_only": 1}), "bad-args"),
            (("set-read-only", {"name": "d1", "read_only": False}), "backend-error"),
            (("set-qos", {"name": "d0", "iops": "fast"}), "bad-args"),
            (("set-qos", {"name": "n0", "iops": 5}), "not-supported"),
            (("start", {"name": "d0"}), "bad-state"),
            (("stats", {"name": ["d0"]}), "bad-args"),
        ]
        for (cmd, args), code in cases:
            got, message = _refused(c, cmd, args)
            assert got == code, (cmd, args, message)
            assert message
        assert c.list() == before
        assert {e["name"]: c.describe(e["name"]) for e in before} == described
    for name in ("new.sock", "n1.sock", "rel.sock"):
        assert not os.path.exists(d.path(name))


def test_malformed_lines_get_error_replies_on_a_usable_connection(populated):
    d = populated
    before = d.call("list")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(d.control)
    replies = sock.makefile("rb")

    def send(data: bytes) -> dict:
        sock.sendall(data)
        return json.loads(replies.readline())

    assert send(b"this is not json\n")["error"]["code"] == "bad-json"
    assert send(b'{"id": 1, "cmd": "list"\n')["error"]["code"] == "bad-json"
    assert send(b"\xff\xfe\n")["error"]["code"] == "bad-json"
    assert send(b"[1, 2]\n")["error"]["code"] == "bad-request"
    r = send(b'{"id": "a", "cmd": 5}\n')
    assert (r["id"], r["ok"], r["error"]["code"]) == ("a", False, "bad-request")
    r = send(b'{"id": 2, "cmd": "list", "args": [1]}\n')
    assert (r["id"], r["error"]["code"]) == (2, "bad-request")
    r = send(b'{"id": 3, "cmd": "list", "extra": 1}\n')
    assert (r["id"], r["error"]["code"]) == (3, "bad-request")
    # a line over the cap, sent in pieces, then a good request on the same connection
    big = b'{"id": 4, "cmd": "add", "args": {"name": "' + b"x" * (MAX_LINE + 10) + b'"}}\n'
    sock.sendall(big[:MAX_LINE // 2])
    assert send(big[MAX_LINE // 2:])["error"]["code"] == "line-too-long"
    r = send(b'\n{"id": 5, "cmd": "list"}\n')        # the blank line gets no reply
    assert (r["id"], r["ok"], r["result"]) == (5, True, before)
    # two requests in one write: two replies, in order
    sock.sendall(b'{"id": 6, "cmd": "version"}\n{"id": 7, "cmd": "nope"}\n')
    first, second = json.loads(replies.readline()), json.loads(replies.readline())
    assert (first["id"], first["ok"], second["id"], second["ok"]) == (6, True, 7, False)
    sock.close()
    assert d.call("list") == before


def test_several_clients_at_once(populated):
    d = populated
    clients = [d.client() for _ in range(5)]
    try:
        # interleaved: each client has a request answered while others are open
        for i, c in enumerate(clients):
            c.add_blk(f"extra{i}", d.path(f"extra{i}.sock"), ramdisk="1M")
        for c in clients:
            assert len(c.list()) == 8
        for i, c in enumerate(reversed(clients)):
            c.remove(f"extra{i}")
    finally:
        for c in clients:
            c.close()
    assert [e["name"] for e in d.call("list")] == ["d0", "d1", "n0"]


def test_ctl_reports_refusals_with_exit_status_1(populated):
    d = populated
    r = d.ctl("describe", "nope", check=False)
    assert r.returncode == 1
    assert "no-such-export" in r.stderr and r.stdout == ""
    r = d.ctl("add-blk", "d0", "--socket-path", "other.sock", "--ramdisk", "1M", check=False)
    assert r.returncode == 1 and "export-exists" in r.stderr
    r = d.ctl("call", "list", "{not json", check=False)
    assert r.returncode == 1 and "not JSON" in r.stderr
    assert d.ctl_json("call", "describe", '{"name": "d0"}')["name"] == "d0"
