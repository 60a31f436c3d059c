"""The Python API (Daemon) in-process, and the back-end registry hook that
new block back-end kinds (nbd, rbd) plug into."""
import asyncio
import contextlib
import os
import threading

import pytest

from vhostuser.blk import BlockBackend
from vhostuser.manage import Daemon
from vhostuser.manage import errors, specs
from vhostuser.manage.checks import as_str
from vhostuser.qos import QosLimits

from .conftest import MIB, blk_frontend


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_python_api_lifecycle(workdir):
    async def main():
        d = Daemon()
        sock = os.path.join(workdir, "d0.sock")
        await d.add_blk("d0", sock, ramdisk=4 * MIB, queues=2)
        assert os.path.exists(sock)
        with pytest.raises(errors.ExportExists):
            await d.add_blk("d0", os.path.join(workdir, "other.sock"), ramdisk="1M")
        with pytest.raises(errors.SocketInUse):
            await d.add_blk("d1", sock, ramdisk="1M")
        assert (await d.resize("d0", "8M"))["capacity_sectors"] == 8 * MIB // 512
        assert d.set_qos("d0", QosLimits(iops=500))["qos"]["iops"] == 500
        assert (await d.set_read_only("d0", True))["read_only"] is True
        assert d.describe("d0")["device"]["read_only"] is True
        assert [e["name"] for e in d.list()] == ["d0"]
        await d.stop("d0")
        assert not os.path.exists(sock) and d.describe("d0")["state"] == "stopped"
        await d.start("d0")
        assert os.path.exists(sock)
        await d.remove("d0")
        assert d.list() == [] and not os.path.exists(sock)
        with pytest.raises(errors.NoSuchExport):
            d.stats("d0")
        await d.close()
    run(main())


def test_device_that_cannot_be_built_leaves_nothing(workdir, tmp_path):
    unreadable = tmp_path / "dir.img"
    unreadable.mkdir()

    async def main():
        d = Daemon()
        with pytest.raises(errors.BadArgument, match="not a regular file"):
            await d.add_blk("d0", os.path.join(workdir, "d0.sock"), file=str(unreadable))
        with pytest.raises(errors.BadArgument, match="not an interface name"):
            await d.add_net("n0", os.path.join(workdir, "n0.sock"), tap="bad/name")
        assert d.list() == []
        assert os.listdir(workdir) == []
        await d.close()
    run(main())


class ZeroDisk(BlockBackend):
    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size

    def read(self, offset, bufs):
        for b in bufs:
            b[:] = bytes(len(b))

    def write(self, offset, bufs):
        raise OSError("read-only zeroes")


@pytest.fixture
def zero_source():
    """A block back-end kind registered the way nbd/rbd will be."""
    def check(value, spec):
        return as_str(value, "zero")

    source = specs.Source("zero", check, lambda v, settings: ZeroDisk(4 * MIB))
    specs.register_blk_source(source)
    yield source
    del specs.BLK_SOURCES["zero"]


def test_registered_blk_source_is_a_spec_key(workdir, zero_source):
    with pytest.raises(ValueError):
        specs.register_blk_source(zero_source)          # taken
    parsed = specs.parse_spec({"type": "blk", "name": "z", "socket_path": f"{workdir}/z.sock",
                               "zero": "anything"})
    assert parsed.source == "zero" and parsed.settings["zero"] == "anything"
    with pytest.raises(errors.BadArgument, match="exactly one of"):
        specs.parse_spec({"type": "blk", "name": "z", "socket_path": f"{workdir}/z.sock",
                          "zero": "x", "ramdisk": "1M"})

    async def main():
        d = Daemon()
        await d.add({"type": "blk", "name": "z", "socket_path": f"{workdir}/z.sock", "zero": "x"})

        def io():
            with blk_frontend(f"{workdir}/z.sock") as blk:
                return blk.read(0, 4096), blk.capacity
        data, capacity = await asyncio.get_running_loop().run_in_executor(None, io)
        assert data == bytes(4096) and capacity == 4 * MIB // 512
        assert d.describe("z")["device"]["backend"] == "ZeroDisk"
        with pytest.raises(errors.NotSupported):
            await d.resize("z", "8M")                   # a Python back-end resizes itself
        await d.close()
    run(main())


def test_python_backend_with_a_bad_size_is_a_backend_error(workdir):
    """size() is checked when the device is made: one line, nothing added."""
    async def main():
        d = Daemon()
        with pytest.raises(errors.BackendFailed) as info:
            await d.add({"type": "blk", "name": "s", "socket_path": f"{workdir}/s.sock",
                         "backend": "tests.manage.pybackends:StrSizeDisk",
                         "backend_opt": {"size": "1G"}})
        assert str(info.value) == ("s: StrSizeDisk.size() returned '1G'; it must return the "
                                   "size in bytes as an int")
        assert d.list() == [] and not os.path.exists(f"{workdir}/s.sock")
        await d.close()
    run(main())


def test_adding_a_remote_disk_whose_server_does_not_answer_leaves_the_loop_serving(workdir):
    """Opening an NBD (or RBD) disk waits for the network: up to its
    remote_timeout for a server that took the connection and says nothing.
    Meanwhile the event loop goes on (it serves every other export's
    front-end messages and remote completions, and the control socket)."""
    import socket
    import time

    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent_path = os.path.join(workdir, "silent-nbd.sock")
    silent.bind(silent_path)
    silent.listen(4)            # connections are queued, never answered

    async def main():
        d = Daemon()
        await d.add_blk("local", os.path.join(workdir, "l.sock"), ramdisk="1M")
        longest = 0.0
        ticking = True

        async def tick():
            nonlocal longest
            last = time.monotonic()
            while ticking:
                await asyncio.sleep(0.02)
                now = time.monotonic()
                longest = max(longest, now - last)
                last = now
        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(errors.BackendFailed):
            await d.add_blk("remote", os.path.join(workdir, "r.sock"),
                            nbd=f"nbd+unix:///?socket={silent_path}", remote_timeout=2)
        assert time.monotonic() - started >= 1.5       # it did wait for the server
        ticking = False
        await ticker
        assert longest < 0.5, f"the event loop stood still for {longest:.2f}s"
        assert [e["name"] for e in d.list()] == ["local"]
        assert not os.path.exists(os.path.join(workdir, "r.sock"))
        await d.close()
    try:
        run(main())
    finally:
        silent.close()


def test_an_add_cancelled_while_its_remote_disk_opens_closes_that_disk(workdir):
    """The daemon stopping (its control clients cancelled) while an add
    waits for a blocking source: the back-end opened after all is closed,
    not left connected, and nothing is added."""
    release, closed = threading.Event(), threading.Event()

    class SlowDisk(ZeroDisk):
        def close(self):
            closed.set()

    def open_slowly(value, settings):
        release.wait(10)
        return SlowDisk(MIB)
    source = specs.Source("slow", lambda v, spec: as_str(v, "slow"), open_slowly, blocking=True)
    specs.register_blk_source(source)

    async def main():
        d = Daemon()
        add = asyncio.create_task(d.add({"type": "blk", "name": "s", "slow": "x",
                                         "socket_path": f"{workdir}/s.sock"}))
        await asyncio.sleep(0.1)
        add.cancel()
        with pytest.raises(asyncio.CancelledError):
            await add
        release.set()
        for _ in range(200):
            if closed.is_set():
                break
            await asyncio.sleep(0.01)
        assert closed.is_set()
        assert d.list() == [] and not os.path.exists(f"{workdir}/s.sock")
        await d.close()
    try:
        run(main())
    finally:
        release.set()
        del specs.BLK_SOURCES["slow"]


def test_close_flushes_and_closes_every_disk_when_one_close_fails(workdir):
    """At exit a back-end whose close() raises is logged: the disks after
    it are still flushed (their acknowledged writes made stable) and closed."""
    done: list[str] = []

    class BadClose(ZeroDisk):
        def close(self):
            raise OSError(5, "store gone")

    class Recorded(ZeroDisk):
        def write(self, offset, bufs):
            pass

        async def flush(self):
            done.append("flush")

        def close(self):
            done.append("close")

    made = {"bad": BadClose, "good": Recorded}
    source = specs.Source("made", lambda v, spec: as_str(v, "made"),
                          lambda v, settings: made[v](MIB))
    specs.register_blk_source(source)

    async def main():
        d = Daemon()
        for name in ("bad", "good"):
            await d.add({"type": "blk", "name": name, "made": name,
                         "socket_path": f"{workdir}/{name}.sock"})
        await d.close()
        assert done == ["flush", "close"]
        assert d.list() == []
    try:
        run(main())
    finally:
        del specs.BLK_SOURCES["made"]


def test_a_remove_cut_short_by_the_daemon_stopping_still_flushes_and_closes(workdir):
    """SIGTERM while a remove flushes the disk: the control socket closing
    cancels the remove's request, and the daemon's close must still see
    that flush to its end and close the back-end (acknowledged writes in
    its cache are made stable), though the export is no longer listed."""
    import json

    from vhostuser.manage.control import ControlServer

    done: list[str] = []

    class SlowFlush(ZeroDisk):
        def write(self, offset, bufs):
            pass

        async def flush(self):
            done.append("flush")
            await asyncio.sleep(0.5)
            done.append("flushed")

        def close(self):
            done.append("close")

    source = specs.Source("slowflush", lambda v, spec: as_str(v, "slowflush"),
                          lambda v, settings: SlowFlush(MIB))
    specs.register_blk_source(source)

    async def main():
        d = Daemon()
        control = ControlServer(d, os.path.join(workdir, "ctl.sock"))
        await control.start()
        await d.add({"type": "blk", "name": "s", "slowflush": "x",
                     "socket_path": f"{workdir}/s.sock"})
        reader, writer = await asyncio.open_unix_connection(os.path.join(workdir, "ctl.sock"))
        writer.write(json.dumps({"cmd": "remove", "args": {"name": "s"}}).encode() + b"\n")
        await writer.drain()
        for _ in range(200):
            if done:
                break
            await asyncio.sleep(0.01)
        assert done == ["flush"]
        await control.close()           # as serve() does on SIGTERM
        await d.close()
        writer.close()
        assert done == ["flush", "flushed", "close"]
    try:
        run(main())
    finally:
        del specs.BLK_SOURCES["slowflush"]


def held_ftruncate(monkeypatch) -> threading.Event:
    """os.ftruncate made to wait (10 s at most) until the returned event is
    set: a resize's ftruncate held while the test acts."""
    gate = threading.Event()
    real_ftruncate = os.ftruncate

    def slow_ftruncate(fd, size):
        gate.wait(10)
        real_ftruncate(fd, size)
    monkeypatch.setattr(os, "ftruncate", slow_ftruncate)
    return gate


def test_sighup_while_a_shrink_truncates_keeps_the_new_size(workdir, image, monkeypatch):
    """SIGHUP re-reads image sizes. Arriving while a resize's ftruncate
    runs (the image still at its old size), it must not give the guest the
    old size back: writes there would be acknowledged, then cut off by the
    truncate."""
    from vhostuser.cli.daemon import reread_sizes

    gate = held_ftruncate(monkeypatch)

    async def main():
        d = Daemon()
        await d.add_blk("f", os.path.join(workdir, "f.sock"), file=image)
        device = d.get("f").device
        assert device.capacity == 8 * MIB // 512
        resize = asyncio.create_task(d.resize("f", "4M"))
        await asyncio.sleep(0.1)
        assert device.capacity == 4 * MIB // 512      # in force before the file shrinks
        reread_sizes(d)                                 # SIGHUP: the file still has 8 MiB
        await asyncio.sleep(0.1)
        assert device.capacity == 4 * MIB // 512
        gate.set()
        assert (await resize)["capacity_sectors"] == 4 * MIB // 512
        assert os.path.getsize(image) == 4 * MIB
        # SIGHUP still follows a change made outside, after the resize.
        with open(image, "r+b") as f:
            f.truncate(6 * MIB)
        reread_sizes(d)
        for _ in range(100):
            if device.capacity == 6 * MIB // 512:
                break
            await asyncio.sleep(0.01)
        assert device.capacity == 6 * MIB // 512
        await d.close()
    try:
        run(main())
    finally:
        gate.set()


def test_image_key_names_the_storage_two_exports_could_share(workdir, image):
    from vhostuser.manage.daemon import _image_key

    link = os.path.join(workdir, "link.img")
    os.symlink(image, link)

    def key(**spec):
        return _image_key(specs.parse_spec({"type": "blk", "name": "x",
                                            "socket_path": f"{workdir}/x.sock", **spec}))
    assert key(file=image) == key(file=link) == ("blk_file", os.path.realpath(image))
    assert key(rbd="pool/img") == ("rbd", "pool/img")
    assert key(ramdisk="1M") is None


def test_an_export_removed_while_it_resizes_answers_the_resize_plainly(workdir, image,
                                                                         monkeypatch):
    """remove while a resize's ftruncate runs (it is not held up by it):
    the resize is then answered no-such-export, not an internal error
    from reading the size of a closed device."""
    gate = held_ftruncate(monkeypatch)

    async def main():
        d = Daemon()
        await d.add_blk("f", os.path.join(workdir, "f.sock"), file=image)
        first = asyncio.create_task(d.resize("f", "12M"))
        second = asyncio.create_task(d.resize("f", "4M"))     # waits for the first
        await asyncio.sleep(0.1)
        await d.remove("f")
        gate.set()
        for resize in (first, second):
            with pytest.raises(errors.NoSuchExport, match="removed"):
                await resize
        await d.close()
    try:
        run(main())
    finally:
        gate.set()


def test_other_lifecycle_commands_go_on_while_a_remote_disk_connects(workdir):
    """An add waiting for its NBD or RBD server (up to remote_timeout, an
    hour at most) holds up no remove, stop or add of another export; its
    own name and socket stay taken meanwhile, and a daemon closed
    meanwhile adds nothing afterwards."""
    release = threading.Event()
    closed: list[str] = []

    class SlowDisk(ZeroDisk):
        def close(self):
            closed.append("closed")

    def open_slowly(value, settings):
        release.wait(10)
        return SlowDisk(MIB)
    source = specs.Source("slow2", lambda v, spec: as_str(v, "slow2"), open_slowly,
                          blocking=True)
    specs.register_blk_source(source)
    slow = {"type": "blk", "name": "s", "slow2": "x", "socket_path": f"{workdir}/s.sock"}

    async def main():
        d = Daemon()
        await d.add_blk("a", f"{workdir}/a.sock", ramdisk="1M")
        adding = asyncio.create_task(d.add(slow))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(d.stop("a"), 2)
        await asyncio.wait_for(d.remove("a"), 2)
        await asyncio.wait_for(d.add_blk("b", f"{workdir}/b.sock", ramdisk="1M"), 2)
        with pytest.raises(errors.ExportExists):
            await asyncio.wait_for(d.add_blk("s", f"{workdir}/other.sock", ramdisk="1M"), 2)
        with pytest.raises(errors.SocketInUse):
            await asyncio.wait_for(d.add_blk("c", f"{workdir}/s.sock", ramdisk="1M"), 2)
        release.set()
        assert (await adding)["state"] == "running"
        assert [e["name"] for e in d.list()] == ["b", "s"]

        # closed while an add connects: that add ends refused, its disk closed
        release.clear()
        adding = asyncio.create_task(d.add({**slow, "name": "t",
                                            "socket_path": f"{workdir}/t.sock"}))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(d.close(), 5)
        release.set()
        with pytest.raises(errors.BadState, match="closed"):
            await adding
        assert d.list() == [] and not os.path.exists(f"{workdir}/t.sock")
        assert closed == ["closed", "closed"]          # s at close, t refused
    try:
        run(main())
    finally:
        release.set()
        del specs.BLK_SOURCES["slow2"]


@contextlib.contextmanager
def held_write_disk():
    """A registered block back-end kind ("heldwrite"): its async write()
    waits, on the daemon's loop, until the test sets the asyncio.Event
    yielded with the list of what happened ("write started", "write
    ended")."""
    events: list[str] = []
    release = asyncio.Event()

    class HeldWriteDisk(ZeroDisk):
        async def write(self, offset, bufs):
            events.append("write started")
            await release.wait()
            events.append("write ended")

    specs.register_blk_source(specs.Source("heldwrite", lambda v, spec: as_str(v, "heldwrite"),
                                           lambda v, settings: HeldWriteDisk(4 * MIB)))
    try:
        yield release, events
    finally:
        del specs.BLK_SOURCES["heldwrite"]


async def until(condition, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached in time")


def test_set_read_only_answers_once_the_writes_taken_before_have_ended(workdir):
    """set-read-only on while a write the back-end took before still runs
    (a Python back-end's, or one in io_uring): it used to answer at once,
    and the write reached the store afterwards, so an image copied once
    the disk was read-only was not what the guest wrote. It now answers
    once that write has ended; writes after it fail."""
    from vhostuser.frontend import BlkRequest, BlkStatus
    from vhostuser.manage import control

    with held_write_disk() as (release, events):
        async def main():
            d = Daemon()
            sock = f"{workdir}/h.sock"
            await d.add({"type": "blk", "name": "h", "socket_path": sock, "heldwrite": "x"})
            reap = threading.Event()

            def io():
                with blk_frontend(sock) as blk:
                    blk.submit([BlkRequest.write(0, b"w" * 4096)])
                    reap.wait(10)
                    (first,) = blk.reap(1)
                    (second,) = blk.execute([BlkRequest.write(8, b"v" * 4096)])
                    return first.status, second.status
            guest = asyncio.get_running_loop().run_in_executor(None, io)
            await until(lambda: events == ["write started"])
            answer = asyncio.create_task(control.execute(d, "set-read-only",
                                                         {"name": "h", "read_only": True}))
            await asyncio.sleep(0.3)
            assert not answer.done(), "answered with a write taken before still running"
            release.set()
            assert await answer == {"name": "h", "read_only": True}
            assert events == ["write started", "write ended"]
            reap.set()
            assert await guest == (BlkStatus.OK, BlkStatus.IOERR)
            assert events == ["write started", "write ended"]
            await d.close()
        run(main())


def test_an_export_removed_while_set_read_only_waits_answers_it_plainly(workdir, image):
    """remove while set-read-only waits for the writes taken before: it
    answered a success naming an export that no longer exists; it is now
    answered no-such-export, as resize is."""
    async def main():
        d = Daemon()
        await d.add_blk("f", os.path.join(workdir, "f.sock"), file=image)
        device = d.get("f").device
        gate = asyncio.Event()
        waiting = device.aset_read_only

        async def held(read_only, timeout=None):
            await gate.wait()               # the writes taken before, still running
            await waiting(read_only, timeout)
        device.aset_read_only = held
        answer = asyncio.create_task(d.set_read_only("f", True))
        await asyncio.sleep(0.1)
        await d.remove("f")
        gate.set()
        with pytest.raises(errors.NoSuchExport, match="removed"):
            await answer
        await d.close()
    run(main())


def test_set_read_only_that_times_out_with_a_write_in_flight_says_so(workdir):
    """A write still running after the drain timeout, even one whose front-end
    is gone (an orphan): set-read-only answers in-flight, naming it, rather
    than a success; the disk is read-only all the same. Once the write
    ended, set-read-only answers at once."""
    from vhostuser.frontend import BlkRequest
    from vhostuser.manage import control

    with held_write_disk() as (release, events):
        async def main():
            d = Daemon()
            sock = f"{workdir}/h.sock"
            await d.add({"type": "blk", "name": "h", "socket_path": sock, "heldwrite": "x"})
            device = d.get("h").device
            device.drain_timeout = 0.3

            def io():
                with blk_frontend(sock) as blk:
                    blk.submit([BlkRequest.write(0, b"w" * 4096)])
                    for _ in range(1000):
                        if events:
                            break
                        threading.Event().wait(0.01)
                # gone with its write in flight: an orphan
            await asyncio.get_running_loop().run_in_executor(None, io)
            await until(lambda: not d.describe("h")["connected"])
            assert events == ["write started"]
            with pytest.raises(errors.StillInFlight) as info:
                await control.execute(d, "set-read-only", {"name": "h", "read_only": True})
            assert info.value.code == "in-flight"
            assert str(info.value) == ("set-read-only h: read-only now, but read-only: 1 request "
                                       "taken before still in flight after 0.3s; it may still "
                                       "reach the storage")
            assert device.read_only
            release.set()
            await until(lambda: events == ["write started", "write ended"])
            assert await d.set_read_only("h", True) == {"name": "h", "read_only": True}
            await d.close()
        run(main())
