"""A throwaway one-node Ceph cluster for tests: one monitor and one OSD on a
sparse file, as root, without systemd, in a temporary directory.

Debian's ``ceph-mon`` and ``ceph-osd`` packages (which pull in ceph-common:
the ``ceph`` and ``rbd`` tools, librados, librbd) are all it needs::

    with CephCluster() as ceph:
        ceph.create_image("disk", 64 << 20)
        ... RbdBackend("disk", conf=ceph.conf_path) ...

Authentication is off (``auth_*_required = none``): the cluster listens on
127.0.0.1 only and lives as long as the test. Pools have one replica.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from vhostuser.errors import VhostUserError

#: Programs the cluster is made with.
TOOLS = ("ceph-mon", "ceph-osd", "monmaptool", "ceph", "rbd")
#: Debian packages that bring them.
PACKAGES = ("ceph-mon", "ceph-osd")
GIB = 1 << 30


class CephError(VhostUserError, RuntimeError):
    """The cluster could not be set up; the message quotes the daemons' logs."""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CephCluster:
    """Starts with :meth:`start` (or ``with``), stops and deletes everything
    with :meth:`stop`.

    ``objectstore``: ``bluestore`` (on a sparse file of ``block_size``
    bytes), ``memstore`` (in the OSD's RAM), or ``auto``: bluestore, and
    memstore if the OSD can't run bluestore here (``fallback_reason`` says
    why, e.g. a tmpfs without O_DIRECT).
    """

    def __init__(self, workdir: str | None = None, *, objectstore: str = "auto",
                 block_size: int = 2 * GIB, timeout: float = 90.0, pool: str = "rbd"):
        if objectstore not in ("auto", "bluestore", "memstore"):
            raise ValueError("objectstore must be auto, bluestore or memstore, "
                             f"not {objectstore!r}")
        self._own_dir = workdir is None
        self.dir = workdir or tempfile.mkdtemp(prefix="vhu-ceph-")
        self.objectstore = "bluestore" if objectstore == "auto" else objectstore
        self._may_fall_back = objectstore == "auto"
        self.fallback_reason: str | None = None
        self.block_size = block_size
        self.timeout = timeout
        self.pool = pool
        self.fsid = str(uuid.uuid4())
        self.port = 0
        self.mon: subprocess.Popen | None = None
        self.osd: subprocess.Popen | None = None
        self.osd_id: int | None = None
        self.startup_seconds: float | None = None
        self.conf_path = os.path.join(self.dir, "ceph.conf")

    # -- paths and commands ------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def mon_host(self) -> str:
        return f"v2:127.0.0.1:{self.port}"

    def _run(self, argv: list[str], timeout: float | None = None, input: bytes | None = None,
             what: str | None = None) -> bytes:
        try:
            r = subprocess.run(argv, input=input, capture_output=True,
                               timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired:
            raise CephError(f"{what or argv[0]}: no answer within {timeout or self.timeout}s"
                            f"{self._log_excerpt()}") from None
        if r.returncode != 0:
            raise CephError(f"{what or ' '.join(argv)}: exit {r.returncode}: "
                            f"{r.stderr.decode(errors='replace').strip()[-2000:]}"
                            f"{self._log_excerpt()}")
        return r.stdout

    def ceph(self, *args: str, timeout: float | None = None) -> str:
        """The ``ceph`` tool against this cluster; its output."""
        return self._run(["ceph", "-c", self.conf_path, "--connect-timeout", "20", *args],
                         timeout, what="ceph " + " ".join(args)).decode()

    def rbd(self, *args: str, timeout: float | None = None, input: bytes | None = None) -> bytes:
        return self._run(["rbd", "-c", self.conf_path, *args], timeout, input,
                         what="rbd " + " ".join(args))

    def create_image(self, name: str, size: int, pool: str | None = None) -> str:
        """Creates an image of ``size`` bytes; returns ``pool/name``."""
        spec = f"{pool or self.pool}/{name}"
        self.rbd("create", "--size", f"{size // 1024}K", spec)
        return spec

    def export(self, spec: str) -> bytes:
        """The whole image, read by the ``rbd`` tool (not our code)."""
        return self.rbd("export", "--no-progress", spec, "-")

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "CephCluster":
        missing = missing_tools()
        if missing:
            raise CephError(f"missing {', '.join(missing)} (Debian packages: "
                            f"{' '.join(PACKAGES)})")
        t0 = time.monotonic()
        try:
            self._start_mon()
            try:
                self._start_osd()
            except CephError as exc:
                if not self._may_fall_back or self.objectstore != "bluestore":
                    raise
                self.fallback_reason = str(exc)
                self._stop_osd()
                self.objectstore = "memstore"
                self._start_osd()
            self.ceph("osd", "pool", "create", self.pool, "8")
            self.rbd("pool", "init", self.pool)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _write_conf(self) -> None:
        d = self.dir
        osd_store = {
            "bluestore": [
                "osd_objectstore = bluestore",
                f"bluestore_block_path = {d}/osd.$id.block",
                "bluestore_block_create = true",
                f"bluestore_block_size = {self.block_size}",
                # The OSD sizes its caches from this (default 4 GiB).
                "osd_memory_target = 1073741824",
            ],
            "memstore": [
                "osd_objectstore = memstore",
                f"memstore_device_bytes = {self.block_size}",
            ],
        }[self.objectstore]
        lines = [
            "[global]",
            f"fsid = {self.fsid}",
            f"mon_host = [{self.mon_host}]",
            "public_addr = 127.0.0.1",
            "cluster_addr = 127.0.0.1",
            "ms_bind_msgr1 = false",
            "auth_cluster_required = none",
            "auth_service_required = none",
            "auth_client_required = none",
            # One OSD: pools of one replica, placed on that OSD itself
            # (the default rule would want distinct hosts).
            "osd_pool_default_size = 1",
            "osd_pool_default_min_size = 1",
            "mon_allow_pool_size_one = true",
            "mon_warn_on_pool_no_redundancy = false",
            "osd_crush_chooseleaf_type = 0",
            "osd_pool_default_pg_autoscale_mode = off",
            f"run_dir = {d}",
            f"log_file = {d}/$name.log",
            f"admin_socket = {d}/$name.asok",
            f"pid_file = {d}/$name.pid",
            "[mon]",
            f"mon_data = {d}/mon.$id",
            "[osd]",
            f"osd_data = {d}/osd.$id",
            *osd_store,
        ]
        with open(self.conf_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _start_mon(self) -> None:
        self.port = _free_port()
        self._write_conf()
        monmap = self.path("monmap")
        self._run(["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                   f"[{self.mon_host}]", monmap])
        self._run(["ceph-mon", "-c", self.conf_path, "-i", "a", "--mkfs", "--monmap", monmap],
                  what="ceph-mon --mkfs")
        self.mon = self._daemon("mon.a", ["ceph-mon", "-c", self.conf_path, "-i", "a", "-f"])
        self.ceph("mon", "stat")   # answers once the monitor is in quorum

    def _start_osd(self) -> None:
        self._write_conf()         # the objectstore may have changed
        osd_uuid = str(uuid.uuid4())
        self.osd_id = int(self.ceph("osd", "new", osd_uuid).strip())
        os.makedirs(self.path(f"osd.{self.osd_id}"), exist_ok=True)
        self._run(["ceph-osd", "-c", self.conf_path, "-i", str(self.osd_id), "--mkfs",
                   "--osd-uuid", osd_uuid], what="ceph-osd --mkfs")
        self.start_osd()

    def _daemon(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = open(self.path(f"{name}.out"), "ab")
        try:
            # A session of its own: the test's ^C or SIGSTOPs don't reach it.
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            out.close()

    def start_osd(self) -> None:
        """Starts the OSD (again) and waits until the monitor has it up."""
        before = self._osd_state()[1] if self.osd is not None else -1
        self.osd = self._daemon(f"osd.{self.osd_id}", [
            "ceph-osd", "-c", self.conf_path, "-i", str(self.osd_id), "-f"])
        self.wait_osd_up(after=before)

    def _osd_state(self) -> tuple[bool, int]:
        """(up, up_from epoch) of our OSD as the monitor sees it."""
        dump = json.loads(self.ceph("osd", "dump", "--format", "json"))
        for osd in dump["osds"]:
            if osd["osd"] == self.osd_id:
                return bool(osd["up"]), osd["up_from"]
        return False, -1

    def wait_osd_up(self, timeout: float | None = None, after: int = -1) -> None:
        """Waits for the OSD to be up; ``after``: in a map later than that
        epoch (a restarted OSD while the monitor still has the old one up)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            if self.osd.poll() is not None:
                raise CephError(f"ceph-osd exited {self.osd.returncode}{self._log_excerpt()}")
            up, up_from = self._osd_state()
            if up and up_from > after:
                return
            time.sleep(0.3)
        raise CephError(f"osd.{self.osd_id} not up within {timeout or self.timeout}s"
                        f"{self._log_excerpt()}")

    # -- failures, for tests --------------------------------------------------------
    def pause_osd(self) -> None:
        """Freezes the OSD: its sockets stay open but nothing answers."""
        self.osd.send_signal(signal.SIGSTOP)

    def resume_osd(self) -> None:
        self.osd.send_signal(signal.SIGCONT)

    def kill_osd(self) -> None:
        """The OSD dies at once (connections refused from now on)."""
        self.osd.kill()
        self.osd.wait()

    # -- teardown ----------------------------------------------------------------------
    def _stop_osd(self) -> None:
        if self.osd is not None:
            _terminate(self.osd)
            self.osd = None

    def stop(self) -> None:
        self._stop_osd()
        if self.mon is not None:
            _terminate(self.mon)
            self.mon = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "CephCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- diagnostics --------------------------------------------------------------
    def _log_excerpt(self, lines: int = 15) -> str:
        """The daemons' error lines (ceph logs them with level -1) and the
        tail of their output, for an exception message."""
        out = []
        for name in sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else ():
            if not name.endswith((".log", ".out")):
                continue
            try:
                with open(self.path(name), errors="replace") as f:
                    text = f.read().splitlines()
            except OSError:
                continue
            picked = [t for t in text if " -1 " in t or "ERROR" in t or "error" in t.lower()]
            picked = (picked or text)[-lines:]
            if picked:
                out.append(f"--- {name}\n" + "\n".join(picked))
        return ("\n" + "\n".join(out)) if out else ""


def _terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)    # a paused daemon can't act on SIGTERM
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
