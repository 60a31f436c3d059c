"""Socket modes (listen, inherited fd, connect) and several devices in one
process."""
import asyncio
import os
import socket
import stat
import struct
import time

import pytest

from vhostuser import protocol
from vhostuser.device import EchoDevice
from vhostuser.server import Server, SocketInUse, bind_unix
from vhostuser.testing.server import BackgroundServer


def get_queue_num(sock: socket.socket) -> int:
    sock.sendall(protocol.pack_header(protocol.Request.GET_QUEUE_NUM, protocol.VERSION, 0))
    header = sock.recv(12, socket.MSG_WAITALL)
    _, _, size = protocol.HEADER.unpack(header)
    return struct.unpack("<Q", sock.recv(size, socket.MSG_WAITALL))[0]


def test_listening_socket_is_private(tmp_path):
    path = str(tmp_path / "s.sock")
    sock = bind_unix(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        sock.close()


def test_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "s.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()          # the file stays, nobody listens: a crashed back-end
    sock = bind_unix(path)
    sock.close()


def test_live_socket_is_an_error(tmp_path):
    path = str(tmp_path / "s.sock")
    live = bind_unix(path)
    try:
        with pytest.raises(SocketInUse):
            bind_unix(path)
    finally:
        live.close()


def test_regular_file_in_the_way_is_an_error(tmp_path):
    path = tmp_path / "s.sock"
    path.write_text("not a socket")
    with pytest.raises(SocketInUse):
        bind_unix(str(path))


def run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_two_devices_on_two_sockets_in_one_loop_plus_inherited_fd(tmp_path):
    async def main():
        a = Server(EchoDevice(num_queues=1), path=str(tmp_path / "a.sock"))
        b = Server(EchoDevice(num_queues=3), path=str(tmp_path / "b.sock"))
        listener = bind_unix(str(tmp_path / "c.sock"))
        c = Server(EchoDevice(num_queues=5), fd=os.dup(listener.fileno()))
        listener.close()
        tasks = []
        for s in (a, b, c):
            s.open()
            tasks.append(asyncio.create_task(s.serve()))
        loop = asyncio.get_running_loop()
        results = []
        for name in ("a", "b", "c"):
            def client(name=name):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(tmp_path / f"{name}.sock"))
                    return get_queue_num(s)
            results.append(await loop.run_in_executor(None, client))
        for s in (a, b, c):
            s.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return results
    assert run_async(main()) == [1, 3, 5]


def test_connect_mode_reaches_a_listening_front_end_and_reconnects(tmp_path):
    path = str(tmp_path / "qemu.sock")
    front = socket.socket(socket.AF_UNIX)
    front.bind(path)
    front.listen(1)

    async def main():
        server = Server(EchoDevice(num_queues=2), connect=path, reconnect_delay=0.05)
        task = asyncio.create_task(server.serve())
        loop = asyncio.get_running_loop()

        def accept_and_ask():
            conn, _ = front.accept()
            with conn:
                return get_queue_num(conn)
        first = await loop.run_in_executor(None, accept_and_ask)
        second = await loop.run_in_executor(None, accept_and_ask)  # after our close
        server.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return first, second
    try:
        assert run_async(main()) == (2, 2)
    finally:
        front.close()


def test_background_server_raises_when_it_cannot_listen(tmp_path):
    # A socket another server is live on: start() must say so at once,
    # not return after a wait as if it were serving.
    path = str(tmp_path / "s.sock")
    live = bind_unix(path)
    try:
        started = time.monotonic()
        with pytest.raises(SocketInUse):
            with BackgroundServer(EchoDevice(), path):
                pass
        assert time.monotonic() - started < 5
    finally:
        live.close()


_FEW_FDS_SERVER = r'''
import asyncio, os, resource, sys
from vhostuser.device import EchoDevice
from vhostuser.testing import server as ts
if os.environ.get("PLAIN_ASYNCIO"):
    ts.new_event_loop = asyncio.new_event_loop      # the loop used where uvloop is absent
resource.setrlimit(resource.RLIMIT_NOFILE, (96, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
srv = ts.BackgroundServer(EchoDevice(num_queues=2), sys.argv[1]).start()
print("ready", flush=True)
sys.stdin.readline()
print("error:", repr(srv.error), flush=True)
'''


@pytest.mark.parametrize("plain_asyncio", [False, True])
def test_running_out_of_fds_in_accept_does_not_end_serving(tmp_path, plain_asyncio):
    """A burst of connections that uses up the back-end's fds (each waits
    up to RECONNECT_GRACE s for its turn) makes accept() fail with EMFILE;
    once they are gone, a front-end is served again. Before, the first
    EMFILE ended serve() for good: nobody accepted any more (the CLI exited,
    a daemon export went FAILED)."""
    import subprocess
    import sys
    path = str(tmp_path / "e.sock")
    env = dict(os.environ, **({"PLAIN_ASYNCIO": "1"} if plain_asyncio else {}))
    p = subprocess.Popen([sys.executable, "-c", _FEW_FDS_SERVER, path], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "ready"
        burst = []
        deadline = time.time() + 3
        while len(burst) < 150 and time.time() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:          # backlog full: let it accept
                s.close()
                time.sleep(0.01)
                continue
            burst.append(s)
        assert len(burst) > 96               # more than the back-end has fds for
        time.sleep(1.0)
        for s in burst:
            s.close()
        time.sleep(3.0)                      # every burst connection is gone
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(3)
        try:
            try:
                c.connect(path)
            except (BlockingIOError, socket.timeout):
                pytest.fail("nobody accepts any more: the listen backlog stays full")
            assert get_queue_num(c) == 2
        finally:
            c.close()
    finally:
        out, _ = p.communicate("\n", timeout=20)
    assert "error: None" in out, out
