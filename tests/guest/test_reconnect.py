"""Back-end crashes and restarts under a real guest's write load (issue 7),
each test on QEMU 7.2 and on QEMU 10 (``[qemu-7.2]``, ``[qemu-10.0]``).

QEMU reconnects to a restarted vhost-user back-end only as a socket client
with ``reconnect=N``; vhost-user-blk then hands the restarted back-end the
inflight area it got with GET_INFLIGHT_FD (SET_INFLIGHT_FD), and the
back-end resubmits what was in flight when it died.

The guest runs four writers at once, each logging every write the disk
acknowledged to the serial console (the guest's journal):

* ``A``: 4 KiB records, each at its own offset (append-only);
* ``B``: 64 KiB records, append-only (multi-segment requests);
* ``C``: 4 KiB records over a ring of 8 slots (overwrites: a stale request
  resubmitted after a newer one completed would show);
* ``D``: like ``C`` with ``conv=fsync`` (a FLUSH after every record).

All with O_DIRECT (busybox ``dd oflag=direct``).  Afterwards every record the
guest saw acknowledged must be in the image (for C and D: the last record of
each slot), no ``dd`` may have failed, and the guest's kernel log must show
no I/O error.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhostuser_devkit import guest
from vhostuser_devkit.guest import MIB

REPO = Path(__file__).resolve().parents[2]
IMAGE_MB = 64
KIB4 = 4096
# writer -> (record size, first 4 KiB block, slots (None: append-only))
WRITERS = {
    "A": (4096, 0, None),
    "B": (65536, 4096, None),      # from 16 MiB
    "C": (4096, 12288, 8),         # at 48 MiB
    "D": (4096, 12544, 8),         # at 49 MiB
}


# --------------------------------------------------------------------------
# A slow back-end, so requests are in flight when the back-end dies
# --------------------------------------------------------------------------

try:
    from vhostuser.blk import BlockBackend
except ImportError:       # only the back-end process needs it
    BlockBackend = object


class SlowDisk(BlockBackend):
    """A raw image whose writes and flushes take 20-200 ms and complete out of
    order; half the writes reach the file before the wait, half after.

    ``vhostuser-blk --backend tests.guest.test_reconnect:SlowDisk
    --backend-opt image=PATH``
    """

    def __init__(self, image: str, seed: str = "0"):
        import random
        self.fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        self._size = os.lseek(self.fd, 0, os.SEEK_END)
        self._random = random.Random(int(seed) + os.getpid())

    def size(self) -> int:
        return self._size

    def read(self, offset, bufs):
        n = os.preadv(self.fd, bufs, offset)
        if n != sum(len(b) for b in bufs):
            raise OSError(f"short read at {offset}")

    async def write(self, offset, bufs):
        import asyncio
        early = self._random.random() < 0.5
        if early:
            self._pwrite(offset, bufs)
        await asyncio.sleep(self._random.uniform(0.02, 0.2))
        if not early:
            self._pwrite(offset, bufs)

    def _pwrite(self, offset, bufs):
        n = os.pwritev(self.fd, bufs, offset)
        if n != sum(len(b) for b in bufs):
            raise OSError(f"short write at {offset}")

    async def flush(self):
        import asyncio
        await asyncio.sleep(self._random.uniform(0.02, 0.1))
        os.fdatasync(self.fd)

    def close(self):
        os.close(self.fd)


BACKENDS = {
    # the C data plane with io_uring
    "file": lambda image: ["--blk-file", str(image)],
    # a Python back-end: many requests in flight at any time
    "slow": lambda image: ["--backend", "tests.guest.test_reconnect:SlowDisk",
                           "--backend-opt", f"image={image}"],
    # the same over packed rings (QueueRegionPacked inflight tracking)
    "slow-packed": lambda image: ["--backend", "tests.guest.test_reconnect:SlowDisk",
                                  "--backend-opt", f"image={image}"],
}
#: queues per kind: two for the slow ones, so two inflight regions are in use
QUEUES = {"file": 1, "slow": 2, "slow-packed": 2}
#: extra vhost-user-blk-pci properties per kind
DEVICE_PROPERTIES = {"slow-packed": {"packed": "on"}}


# --------------------------------------------------------------------------
# The back-end as a user runs it
# --------------------------------------------------------------------------


class Backend:
    """``python -m vhostuser.cli.<kind> --socket-path S -v ...`` that can be
    killed and started again on the same socket; all runs log to one file."""

    def __init__(self, sock: Path, args: list[str], *, kind: str = "blk",
                 prefix: list[str] | None = None, log: Path | None = None,
                 env: dict[str, str] | None = None):
        self.sock = sock
        self.env = env
        self.log = log or sock.with_suffix(".log")
        self.command = [*(prefix or []), sys.executable, "-m", f"vhostuser.cli.{kind}",
                        "--socket-path", str(sock), "-v", *args]
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 20.0) -> "Backend":
        try:
            st = os.lstat(self.sock)
            old = (st.st_ino, st.st_ctime_ns)
        except FileNotFoundError:
            old = None
        with open(self.log, "ab") as log:
            log.write(f"==== start {self.starts} ====\n".encode())
            log.flush()
            env = None if self.env is None else {**os.environ, **self.env}
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, cwd=REPO, env=env)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:      # listening once a new socket file replaced the stale one
            try:
                st = os.lstat(self.sock)
                if (st.st_ino, st.st_ctime_ns) != old:
                    return self
            except FileNotFoundError:
                pass
            if self.process.poll() is not None:
                pytest.fail(f"back-end exited with {self.process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"back-end did not listen within {timeout:.0f}s")
            time.sleep(0.02)

    def kill(self) -> None:
        """kill -9: no chance to finish anything."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM: finish what is in flight and exit 0."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9

    def keep_log(self, name: str) -> None:
        """$VHOSTUSER_KEEP_LOGS=DIR: keep the back-end log there (debugging)."""
        keep = os.environ.get("VHOSTUSER_KEEP_LOGS")
        if keep and self.log.exists():
            os.makedirs(keep, exist_ok=True)
            shutil.copy(self.log, Path(keep) / f"{name}.log")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def runs(self) -> list[str]:
        """The log split per start."""
        return re.split(r"^==== start \d+ ====\n", self.log_text(), flags=re.M)[1:]


# --------------------------------------------------------------------------
# The guest's writers and the host-side check
# --------------------------------------------------------------------------


def record(tag: str, writer: str, index: int, size: int) -> bytes:
    """What the guest's printf writes for one record (the shell twin is below)."""
    line = f"{tag} w={writer} i={index}"
    return (line.ljust(size - 1) + "\n").encode()


def writer_script(tag: str, count: int) -> str:
    """Busybox sh: the four writers in the background, then the checks."""
    lines = [f"""
DEV=/dev/vda
TAG={tag}
writer() {{  # NAME SIZE FIRST_4K_BLOCK SLOTS(0: append) COUNT FLAGS
    name=$1 size=$2 first=$3 slots=$4 n=$5 flags=$6
    bs4=$((size / 4096)); i=0; fails=0
    while [ $i -lt $n ]; do
        if [ $slots -gt 0 ]; then slot=$((i % slots)); else slot=$i; fi
        printf "%-$((size - 1))s\\n" "$TAG w=$name i=$i" > /tmp/rec.$name
        if dd if=/tmp/rec.$name of=$DEV bs=$size seek=$((first / bs4 + slot)) count=1 \\
                oflag=direct conv=notrunc$flags 2>/tmp/err.$name; then
            echo "ACK $name $i"
        else
            rc=$?; fails=$((fails + 1))
            echo "WFAIL $name $i rc=$rc $(tr '\\n' ' ' < /tmp/err.$name)"
        fi
        i=$((i + 1))
    done
    echo "WDONE $name fails=$fails"
}}
echo "WRITERS-START"
"""]
    for name, (size, first, slots) in WRITERS.items():
        flags = ",fsync" if name == "D" else ""
        lines.append(f"writer {name} {size} {first} {slots or 0} {count} '{flags}' &\n")
    lines.append("""
wait
echo "WRITERS-DONE"
dmesg > /tmp/dmesg
echo "RESULT io_errors=$(grep -c -e 'I/O error' -e 'blk_update_request' -e 'critical' /tmp/dmesg)"
grep -e 'I/O error' -e 'blk_update_request' -e virtio /tmp/dmesg | head -20 | sed 's/^/DMESG /'
""")
    return "".join(lines)


ACK_RE = re.compile(r"^ACK ([A-D]) (\d+)$", re.M)


def acked(serial: str) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {name: [] for name in WRITERS}
    for name, index in ACK_RE.findall(serial):
        got[name].append(int(index))
    return got


def check_image(image: Path, tag: str, acks: dict[str, list[int]]) -> int:
    """Every acknowledged record is in the image; returns how many were checked."""
    checked = 0
    data = image.read_bytes()
    bad = []
    for name, (size, first, slots) in WRITERS.items():
        indices = acks[name]
        # Each writer has one write at a time in flight: the record after its
        # last acknowledged one may have landed too (QEMU killed meanwhile).
        pending = max(indices, default=-1) + 1
        if slots:
            # the last acknowledged record of each slot is what the slot holds
            last: dict[int, int] = {}
            for i in indices:
                last[i % slots] = max(i, last.get(i % slots, -1))
            wanted = {slot: i for slot, i in last.items()}
        else:
            wanted = {i: i for i in indices}
        for slot, index in wanted.items():
            offset = first * KIB4 + slot * size
            found = data[offset:offset + size]
            if found != record(tag, name, index, size) and not (
                    slots and pending % slots == slot
                    and found == record(tag, name, pending, size)):
                bad.append((name, index, found[:40]))
            checked += 1
    assert not bad, f"{len(bad)} acknowledged records missing from the image: {bad[:10]}"
    return checked


def fresh_image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(IMAGE_MB * MIB)
    return path


def wait_acks(vm: guest.GuestProcess, total: int, timeout: float = 90.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = len(ACK_RE.findall(vm.serial))
        if n >= total:
            return n
        if not vm.running():
            raise AssertionError("QEMU ended while waiting for acknowledgements:\n"
                                 + "\n".join(vm.serial.splitlines()[-30:]) + vm.qemu_log)
        if time.monotonic() > deadline:
            raise AssertionError(f"only {n} of {total} acknowledgements after {timeout:.0f}s:\n"
                                 + "\n".join(vm.serial.splitlines()[-30:]))
        time.sleep(0.02)


def guest_outcome(result: guest.GuestResult) -> None:
    serial = result.serial
    fails = [line for line in serial.splitlines() if line.startswith("WFAIL")]
    assert not fails, f"writes failed in the guest: {fails[:10]}"
    assert result.results().get("io_errors") == "0", result.tail(40)
    assert len(re.findall(r"^WDONE [A-D] fails=0$", serial, re.M)) == len(WRITERS), result.tail()
    assert result.exit_code == 0, result.tail()


# --------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------

# The soak is the same test, longer: VHOSTUSER_SOAK_KILLS=20 VHOSTUSER_SOAK_RECORDS=400
RECORDS = int(os.environ.get("VHOSTUSER_SOAK_RECORDS", "60"))   # per writer
KILLS = int(os.environ.get("VHOSTUSER_SOAK_KILLS", "3"))


def inflight_report(backend: Backend) -> tuple[list[int], list[int]]:
    """Per back-end run: SET_INFLIGHT_FD messages, requests resubmitted."""
    runs = backend.runs()
    sets = [len(re.findall(r"inflight area of", run)) for run in runs]
    resubmitted = [sum(map(int, re.findall(r"resubmits (\d+) requests", run))) for run in runs]
    return sets, resubmitted


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_blk_survives_kill_9_under_write_load(guest_kit, sock_dir, tmp_path, capsys, kind, qemu):
    tag = f"kill9-{kind}"
    image = fresh_image(tmp_path)
    queues = QUEUES[kind]
    backend = Backend(sock_dir / "blk.sock", [*BACKENDS[kind](image), "--num-queues", str(queues)])
    backend.start()
    total = RECORDS * len(WRITERS)
    kills = []
    try:
        with guest.GuestProcess(guest_kit, writer_script(tag, RECORDS),
                                blk=[guest.QemuBlk(str(backend.sock), num_queues=queues,
                                                     reconnect=1,
                                                     properties=DEVICE_PROPERTIES.get(kind, {}))],
                                smp=2, pvh=True, qemu=qemu) as vm:
            vm.wait_for(r"^WRITERS-START", timeout=60)
            for k in range(KILLS):
                at = wait_acks(vm, total * (k + 1) // (KILLS + 2))
                backend.kill()
                t0 = time.monotonic()
                time.sleep(0.3)            # the guest keeps queueing meanwhile
                backend.start()
                seen = wait_acks(vm, at + len(WRITERS) * 2, timeout=60)
                assert "front-end connected" in backend.runs()[-1]
                kills.append((at, round(time.monotonic() - t0, 2), seen - at))
            result = vm.wait(timeout=240)
    finally:
        rc = backend.terminate()
        backend.keep_log(f"kill9-{kind}")
        assert rc == 0, backend.log_text()[-3000:]
    acks = acked(result.serial)
    sets, resubmitted = inflight_report(backend)
    with capsys.disabled():
        print(f"\n[{kind}, {queues} queues] kill -9 x{len(kills)} (acks at kill, seconds to the next ack, acks "
              f"by then): {kills}\n[{kind}] SET_INFLIGHT_FD per back-end run: {sets}; "
              f"requests resubmitted per run: {resubmitted}; "
              f"acks: { {k: len(v) for k, v in acks.items()} }")
    guest_outcome(result)
    assert sum(map(len, acks.values())) == total
    checked = check_image(image, tag, acks)
    with capsys.disabled():
        print(f"[{kind}] records verified in the image: {checked}")
    assert len(sets) == KILLS + 1
    # every restarted back-end got the inflight area back
    assert all(n >= 1 for n in sets[1:]), sets
    if kind.startswith("slow"):
        # requests were in flight at some kill, and were resubmitted
        assert sum(resubmitted) > 0, resubmitted
    assert "Traceback" not in backend.log_text(), backend.log_text()[-3000:]


def test_blk_sigterm_finishes_in_flight_requests_and_restarts(guest_kit, sock_dir, tmp_path,
                                                               capsys, qemu):
    """SIGTERM while the guest writes through a slow back-end: the back-end
    completes what it took before it exits 0; a restarted one resubmits
    nothing, and the guest goes on."""
    tag = "sigterm"
    image = fresh_image(tmp_path)
    backend = Backend(sock_dir / "blk.sock", BACKENDS["slow"](image))
    backend.start()
    total = RECORDS * len(WRITERS)
    stops = []
    try:
        with guest.GuestProcess(guest_kit, writer_script(tag, RECORDS),
                                blk=[guest.QemuBlk(str(backend.sock), reconnect=1)],
                                smp=2, pvh=True, qemu=qemu) as vm:
            vm.wait_for(r"^WRITERS-START", timeout=60)
            for k in range(2):
                at = wait_acks(vm, total * (k + 1) // 4)
                t0 = time.monotonic()
                rc = backend.terminate()
                stops.append((at, rc, round(time.monotonic() - t0, 2)))
                backend.start()
                # the guest goes on through the new back-end
                wait_acks(vm, len(ACK_RE.findall(vm.serial)) + len(WRITERS) * 2, timeout=60)
                assert "front-end connected" in backend.runs()[-1]
            result = vm.wait(timeout=240)
    finally:
        final_rc = backend.terminate()
        backend.keep_log("sigterm")
    acks = acked(result.serial)
    sets, resubmitted = inflight_report(backend)
    with capsys.disabled():
        print(f"\n[sigterm] stops (acks at stop, exit status, seconds to exit): {stops}; "
              f"SET_INFLIGHT_FD per run: {sets}; resubmitted per run: {resubmitted}")
    assert [rc for _, rc, _ in stops] == [0, 0] and final_rc == 0, backend.log_text()[-3000:]
    # the rings stop taking requests at once: the exit waits only for those in
    # flight (at most ~0.2 s each), not for a pause in the guest's writing
    assert all(seconds < 2.0 for _, _, seconds in stops), stops
    guest_outcome(result)
    check_image(image, tag, acks)
    # nothing was left in flight by a graceful stop
    assert resubmitted == [0, 0, 0], resubmitted
    assert "Traceback" not in backend.log_text(), backend.log_text()[-3000:]


def test_blk_backend_outlives_qemu_killed_with_requests_in_flight(guest_kit, sock_dir, tmp_path,
                                                                 capsys, qemu):
    """QEMU dies (kill -9) while the slow back-end works on requests: the
    back-end finishes them before it lets go of guest memory (it used to
    complete them into freed rings and die of SIGSEGV), then serves the next
    guest, which reads back what the first one was told was written."""
    tag = "qemu-kill"
    image = fresh_image(tmp_path)
    backend = Backend(sock_dir / "blk.sock", BACKENDS["slow"](image))
    backend.start()
    try:
        with guest.GuestProcess(guest_kit, writer_script(tag, 200),
                                blk=[guest.QemuBlk(str(backend.sock))], smp=2, pvh=True,
                                qemu=qemu) as vm:
            vm.wait_for(r"^WRITERS-START", timeout=60)
            wait_acks(vm, 40)
            vm.kill()
            serial = vm.serial
        time.sleep(1.0)
        assert backend.process.poll() is None, backend.log_text()[-3000:]
        acks = acked(serial)
        checked = check_image(image, tag, acks)
        # a second guest on the same back-end process
        result = guest.run_guest(guest_kit, "dd if=/dev/vda of=/dev/null bs=64k count=16 "
                                 "iflag=direct && echo RESULT read=ok\n",
                                 blk_sockets=[str(backend.sock)], timeout=60, pvh=True, qemu=qemu)
        assert result.results().get("read") == "ok", result.tail()
    finally:
        rc = backend.terminate()
        backend.keep_log("qemu-kill")
    with capsys.disabled():
        print(f"\n[qemu-kill] back-end alive after QEMU died; {checked} acknowledged records "
              f"verified; exit status {rc}")
    assert rc == 0
    assert "Traceback" not in backend.log_text(), backend.log_text()[-3000:]


# --------------------------------------------------------------------------
# A back-end that dies between publishing a completion and signalling it
# --------------------------------------------------------------------------

SYNC_RECORDS = int(os.environ.get("VHOSTUSER_SOAK_RECORDS", "120"))
FAULT_KILLS = 4


def sync_writer_script(tag: str, count: int) -> str:
    """One writer, one synchronous O_DIRECT write at a time: a completion the
    guest is never told about stops it dead (Linux's virtio-blk has no
    timeout), so a lost notification shows as a hang, not as a slow run."""
    return f"""
echo 5 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
DEV=/dev/vda
echo "WRITERS-START"
i=0; fails=0
while [ $i -lt {count} ]; do
    printf "%-4095s\\n" "{tag} w=A i=$i" > /tmp/rec
    if dd if=/tmp/rec of=$DEV bs=4096 seek=$i count=1 oflag=direct conv=notrunc 2>/tmp/err; then
        echo "ACK A $i"
    else
        fails=$((fails + 1)); echo "WFAIL A $i $(tr '\\n' ' ' < /tmp/err)"
    fi
    i=$((i + 1))
done
echo "WDONE A fails=$fails"
dmesg > /tmp/dmesg
echo "RESULT io_errors=$(grep -c -e 'I/O error' -e 'blk_update_request' /tmp/dmesg)"
echo "RESULT hung_tasks=$(grep -c 'blocked for more than' /tmp/dmesg)"
"""


def test_blk_completion_published_but_not_signalled_before_death(guest_kit, sock_dir, tmp_path,
                                                                  capsys):
    """VHOSTUSER_FAULT=exit-before-notify:N makes the back-end _exit right
    after it published the Nth completion and before it wrote the call
    eventfd. Restarted, it must signal every ring once (SET_VRING_CALL, ring
    start): otherwise the guest waits forever for a write that is done."""
    tag = "nonotify"
    image = fresh_image(tmp_path)
    sock = sock_dir / "blk.sock"
    deaths = []

    def backend_run(k: int) -> Backend:
        # Die at different depths of a run (notifications counted from 1);
        # the last run lives.
        env = {"VHOSTUSER_FAULT": f"exit-before-notify:{7 + 5 * k}"} if k < FAULT_KILLS else {}
        return Backend(sock, ["--blk-file", str(image)], env=env, log=tmp_path / "blk.log")

    backend = backend_run(0).start()
    try:
        with guest.GuestProcess(guest_kit, sync_writer_script(tag, SYNC_RECORDS),
                                blk=[guest.QemuBlk(str(sock), reconnect=1)],
                                smp=1, pvh=True) as vm:
            for k in range(1, FAULT_KILLS + 1):
                rc = backend.process.wait(timeout=120)
                deaths.append((rc, len(ACK_RE.findall(vm.serial))))
                backend = backend_run(k)
                backend.starts = k
                backend.start()
            result = vm.wait(timeout=240)
    finally:
        rc = backend.terminate()
        backend.keep_log("nonotify")
    acks = [int(i) for name, i in ACK_RE.findall(result.serial)]
    with capsys.disabled():
        print(f"\n[nonotify] back-end deaths (exit status, acks by then): {deaths}; "
              f"acks {len(acks)} of {SYNC_RECORDS}; hung tasks "
              f"{result.results().get('hung_tasks')}")
    # each death was at the injected point, after a completion was published
    assert [status for status, _ in deaths] == [86] * FAULT_KILLS, deaths
    assert rc == 0
    assert result.results().get("hung_tasks") == "0", result.tail(40)
    assert result.results().get("io_errors") == "0", result.tail(40)
    assert re.search(r"^WDONE A fails=0$", result.serial, re.M), result.tail()
    assert acks == list(range(SYNC_RECORDS))
    data = image.read_bytes()
    missing = [i for i in acks if data[i * KIB4:(i + 1) * KIB4] != record(tag, "A", i, KIB4)]
    assert not missing, f"acknowledged records not in the image: {missing[:10]}"
    with capsys.disabled():
        print(f"[nonotify] records verified in the image: {len(acks)}")


# --------------------------------------------------------------------------
# vhostuser-net: traffic resumes after the back-end restarts
# --------------------------------------------------------------------------

HOST_IP, GUEST_IP = "10.77.7.1", "10.77.7.2"
TAP = "vhu7"

# One ping a round; the host watches PONG/LOST lines and kills QEMU when done.
PING_LOOP = f"""
ip link set eth0 up || exit 10
ip addr add {GUEST_IP}/24 dev eth0 || exit 11
echo "NET-UP"
i=0
while [ $i -lt 600 ]; do
    if ping -c 1 -W 1 {HOST_IP} > /dev/null 2>&1; then echo "PONG $i"; else echo "LOST $i"; fi
    i=$((i + 1))
done
"""


def tap_up(ns: str) -> None:
    """The TAP goes away with the back-end that created it: configure it anew."""
    deadline = time.monotonic() + 15
    while subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", TAP],
                         capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise AssertionError(f"{TAP} did not appear")
        time.sleep(0.05)
    for cmd in (["ip", "addr", "replace", f"{HOST_IP}/24", "dev", TAP],
                ["ip", "link", "set", TAP, "up"]):
        subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)


def pongs(vm) -> list[int]:
    return [int(i) for i in re.findall(r"^PONG (\d+)$", vm.serial, re.M)]


def wait_pongs(vm, after: int, count: int = 3, timeout: float = 60.0) -> int:
    """Waits for `count` answered pings numbered above `after`; returns the last."""
    deadline = time.monotonic() + timeout
    while True:
        got = [i for i in pongs(vm) if i > after]
        if len(got) >= count:
            return got[-1]
        if not vm.running() or time.monotonic() > deadline:
            raise AssertionError("pings not answered:\n" + "\n".join(vm.serial.splitlines()[-20:]))
        time.sleep(0.05)


def test_net_traffic_resumes_after_backend_restarts(guest_kit, sock_dir, netns, capsys, qemu):
    sock = sock_dir / "net.sock"
    backend = Backend(sock, ["--tap", TAP], kind="net", prefix=["ip", "netns", "exec", netns])
    backend.start()
    tap_up(netns)
    outages = []
    try:
        with guest.GuestProcess(guest_kit, PING_LOOP, smp=1, pvh=True, qemu=qemu,
                                net=[guest.QemuNet(str(sock), reconnect=1)]) as vm:
            vm.wait_for(r"^NET-UP", timeout=60)
            wait_pongs(vm, -1)
            for how in ("kill", "term"):
                if how == "kill":
                    backend.kill()
                    rc = -9
                else:
                    rc = backend.terminate()
                    assert rc == 0, backend.log_text()[-3000:]
                t0 = time.monotonic()
                stopped_at = max(pongs(vm), default=-1)
                backend.start()
                tap_up(netns)
                wait_pongs(vm, stopped_at)
                lost = len(re.findall(r"^LOST \d+$", vm.serial, re.M))
                outages.append((how, rc, round(time.monotonic() - t0, 1), lost))
            total_pongs = len(pongs(vm))
    finally:
        rc = backend.terminate()
        backend.keep_log("net")
    with capsys.disabled():
        print(f"\n[net] restarts (how, exit status, seconds until pings answered again, pings "
              f"lost so far): {outages}; answered pings: {total_pongs}")
    assert rc == 0
    assert len(outages) == 2
    assert "Traceback" not in backend.log_text(), backend.log_text()[-3000:]
