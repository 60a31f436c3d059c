"""Issue 20, point 3: triage. The spawned back-end's output is kept per
case, how it died is recorded, crashes are deduplicated by signature, the
shrinker keeps the signature, --replay waits for a dying process and cuts
the profile to the back-end's queues, start-up probes retry, and front-end
timeouts are a verdict of their own."""
import json
import os
import socket
import struct
import sys
import threading

import pytest

from vhostuser.cli.fuzz import main
from vhostuser.fuzz import profiles, triage
from vhostuser.fuzz.case import Case, Outcome, Setup, Verdict
from vhostuser.fuzz.harness import Harness
from vhostuser.fuzz.oracle import Target
from vhostuser.fuzz.replay import Reproducer
from vhostuser.fuzz.runner import Recorder, RunConfig, probe_backend
from vhostuser.fuzz.spawn import Spawner

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DATA = 0x80000


def read_sector(sector: int, noise: int = 0) -> Case:
    """A well-formed virtio-blk read of ``sector`` (after ``noise`` harmless pokes)."""
    pokes = [{"op": "poke", "gpa": DATA + 0x4000 + 64 * i, "data": "00" * 8} for i in range(noise)]
    return Case("blk", "request", Setup(), pokes + [
        {"op": "poke", "gpa": DATA, "data": struct.pack("<IIQ", 0, 0, sector).hex()},
        {"op": "chain", "buffers": [[DATA, 16, False], [DATA + 0x200, 512, True],
                                    [DATA + 0x1f00, 1, True]]},
        {"op": "kick"}])


@pytest.fixture
def crashy(tmp_path):
    """(spawn command, environment) of our blk server over tests/fuzz/crashy.py."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, REPO])}
    cmd = (f"{sys.executable} -m vhostuser.cli.blk --socket-path {{socket}} "
           f"--backend crashy:CrashyDisk --num-queues 2")
    return cmd, env


def harness_for(tmp_path, cmd, env, grace=3.0):
    sock = str(tmp_path / "blk.sock")
    spawner = Spawner(cmd, sock, env=env)
    spawner.start()
    target = Target(sock, profiles.get("blk"), timeout=2.0, grace=grace)
    return Harness(target, spawner, log=lambda s: None), spawner


# -- signatures, without a back-end --------------------------------------------------

def test_normalise_masks_what_varies_between_runs():
    a = triage.normalise("queue 3: probe not completed in 1.0s at 0x7f00beef (/tmp/a/s.sock)",
                         "/tmp/a/s.sock")
    b = triage.normalise("queue 7: probe not completed in 2.5s at 0x55aa (/tmp/a/s.sock)",
                         "/tmp/a/s.sock")
    assert a == b == "queue N: probe not completed in Ns at 0x? ({socket})"


def test_crash_site_prefers_the_best_evidence():
    asan = ["noise", "==1==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x6",
            "    #0 0x55 in __interceptor_memcpy", "    #1 0x56 in vu_packed_pop csrc/vu_packed.c:85",
            "    #2 0x57 in vu_blk_handler csrc/vu_blk.c:1", "    #3 0x58 in worker_run x.c:2",
            "    #4 0x59 in start_thread"]
    assert triage.crash_site(asan) == ("AddressSanitizer heap-buffer-overflow in "
                                       "vu_packed_pop < vu_blk_handler < worker_run")
    ubsan = ["csrc/vu_split.c:120:9: runtime error: index 70000 out of bounds for type 'x[4]'"]
    assert triage.crash_site(ubsan) == "UBSan vu_split.c:120: index N out of bounds for type 'x[N]'"
    gdb = ["#0  0x00007f5c844c7712 in librte_vhost.so.23+0x3132 ()",
           "#1  0x00007f5c844f352a in translate_ring_addresses (dev=0x1) at vhost_user.c:9",
           "#2  0x00007f5c85ca71f5 in start_thread (arg=<optimized out>) at x.c:442"]
    assert triage.crash_site(["last words"], gdb) == ("in librte_vhost.so.23+0x3132 < "
                                                      "translate_ring_addresses")
    wild = ["#0  0x00007f2529b07b30 in ?? ()", "#1  0x0000000000000043 in ?? ()"]
    assert triage.crash_site(["x"], wild).startswith("pc outside any code")
    assert triage.crash_site(["x"], ["#0 0x1 in raise ()", "#1 0x2 in abort ()",
                                     "#2 0x3 in __assert_fail_base (x=1) at a.c:1",
                                     "#3 0x4 in vu_get_queue ()"]) == "in vu_get_queue"
    assert triage.crash_site(["vu_panic: region mmap error: Bad file descriptor", "bye"]) == \
        "vu_panic: region mmap error: Bad file descriptor"
    assert triage.crash_site(["ok", "VHOST_CONFIG: (/s) read message 5", ""], (), "/s") == \
        "last output: VHOST_CONFIG: ({socket}) read message N"


def test_signature_is_verdict_how_and_where():
    crash = Outcome(Verdict.CRASHED, "x", exit_status="signal 11 (SIGSEGV)")
    assert triage.signature(crash, ["vu_panic: oops 12"]) == "CRASHED SIGSEGV: vu_panic: oops N"
    wedged = Outcome(Verdict.WEDGED, "neighbour queue 1: probe not completed in 1.0s")
    assert triage.signature(wedged) == "WEDGED: neighbour queue N: probe not completed in Ns"
    assert triage.signature(Outcome(Verdict.PASS)) == ""


# -- against a back-end that crashes on purpose ----------------------------------------

def test_crash_keeps_output_exit_status_and_signature(tmp_path, crashy):
    harness, spawner = harness_for(tmp_path, *crashy)
    try:
        assert harness.run(read_sector(1)).verdict in (Verdict.PASS, Verdict.REJECT)
        first_pid = spawner.pid
        out = harness.run(read_sector(777))
        assert out.verdict is Verdict.CRASHED, out
        assert out.exit_status == "signal 6 (SIGABRT)"
        assert any("crashy: panic: read of sector 777" in line for line in out.log_tail)
        assert out.signature == "CRASHED SIGABRT: crashy: panic: read of sector N at offset 0x?"
        # The back-end was restarted for the next case, which passes on its own.
        assert spawner.pid != first_pid and spawner.alive()
        assert not harness.run(read_sector(2)).verdict.failing
    finally:
        spawner.stop()


def test_crashes_dedupe_by_signature_and_shrink_keeps_it(tmp_path, crashy):
    harness, spawner = harness_for(tmp_path, *crashy)
    out_dir = str(tmp_path / "out")
    rec = Recorder(harness, RunConfig(cases=None, seed=0, out_dir=out_dir, shrink_budget=40),
                   log=lambda s: None)
    try:
        rec.execute(read_sector(777, noise=3), "a")
        rec.execute(read_sector(3), "b")
        rec.execute(read_sector(777, noise=1), "c")     # the same bug again
        rec.execute(read_sector(778), "d")              # another one
    finally:
        spawner.stop()
    s = rec.finish()
    assert s.counts[Verdict.CRASHED] == 3
    assert sorted(e["count"] for e in s.signatures.values()) == [1, 2]
    assert {sig.split(":")[0] for sig in s.signatures} == {"CRASHED SIGABRT", "CRASHED SIGSEGV"}
    files = sorted(os.listdir(out_dir))
    assert len(files) == 2, files                       # one reproducer per signature
    sigabrt = next(e for sig, e in s.signatures.items() if "SIGABRT" in sig)
    rep = Reproducer.read(sigabrt["reproducer"])
    # Shrunk (the harmless pokes went) but still the same crash.
    assert len(rep.case.actions) < len(rep.original.actions)
    assert rep.outcome.signature.startswith("CRASHED SIGABRT: crashy: panic")
    assert rep.outcome.exit_status == "signal 6 (SIGABRT)" and rep.outcome.log_tail
    # And --replay gives it back, signature and all.
    cmd, env = crashy
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    try:
        rc = main(["--socket", str(tmp_path / "r.sock"), "--spawn", cmd, "--replay",
                   sigabrt["reproducer"], "--json"])
    finally:
        os.environ.pop("PYTHONPATH")
    assert rc == 1


def test_replay_waits_for_a_dying_process(tmp_path, crashy, capsys):
    """Sector 779 lingers 1.5 s before aborting, as a sanitizer report does:
    the probes fail first, and before the fix the verdict was WEDGED."""
    cmd, env = crashy
    path = str(tmp_path / "slow.json")
    Reproducer(read_sector(779), Outcome(Verdict.CRASHED, "recorded")).write(path)
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    try:
        rc = main(["--socket", str(tmp_path / "r.sock"), "--spawn", cmd, "--replay", path,
                   "--timeout", "0.5", "--json"])
    finally:
        os.environ.pop("PYTHONPATH")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1
    assert result["verdict"]["verdict"] == "CRASHED", result
    assert result["verdict"]["exit_status"] == "signal 6 (SIGABRT)"


def test_replay_cuts_the_profile_to_the_backends_queues(tmp_path, capsys):
    """A reproducer recorded with the blk profile's two queues, replayed
    against a one-queue back-end, runs as a campaign would run it there."""
    path = str(tmp_path / "two-queues.json")
    Reproducer(read_sector(5), Outcome(Verdict.PASS)).write(path)
    cmd = (f"{sys.executable} -m vhostuser.cli.blk --socket-path {{socket}} --ramdisk 8M "
           f"--num-queues 1")
    rc = main(["--socket", str(tmp_path / "one.sock"), "--spawn", cmd, "--replay", path,
               "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["verdict"]["verdict"] == "PASS", result
    assert rc == 0


def test_start_up_probe_waits_for_a_slow_backend(tmp_path):
    """The socket appears only after a second; the campaign's first probe
    retries instead of giving up."""
    sock = str(tmp_path / "slow.sock")
    cmd = (f"sh -c 'sleep 1; exec {sys.executable} -m vhostuser.cli.blk --socket-path {sock} "
           f"--ramdisk 8M --num-queues 2'")
    import subprocess
    import shlex
    proc = subprocess.Popen(shlex.split(cmd))
    try:
        packed, profile = probe_backend(sock, profiles.get("blk"), 1.0, wait=30)
        assert profile.queues == 2
    finally:
        proc.terminate()
        proc.wait(10)


class SilentBackend:
    """Accepts connections and never answers: what a hung back-end looks like."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_front_end_timeout_is_a_verdict_not_a_skip(tmp_path):
    from vhostuser.fuzz.runner import case_for
    sock = str(tmp_path / "silent.sock")
    silent = SilentBackend(sock)
    try:
        target = Target(sock, profiles.get("blk"), timeout=0.3)
        harness = Harness(target, log=lambda s: None, settle_wait=0.5)
        rec = Recorder(harness, RunConfig(cases=None, seed=0, out_dir=str(tmp_path / "o"),
                                          shrink_budget=0), log=lambda s: None)
        for i in range(3):
            rec.execute(case_for("blk", 1, i, allow_packed=False), str(i))
    finally:
        silent.close()
    s = rec.finish()
    assert s.counts[Verdict.TIMEOUT] == 3 and s.skipped == 0 and s.frontend_errors == 0
    assert list(s.signatures) == ["TIMEOUT: connection accepted, first request unanswered: "
                                  "no complete message within the timeout (N of N bytes)"]
