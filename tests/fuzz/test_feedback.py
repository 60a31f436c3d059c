"""Issue 20, point 4: feedback mode. Mutations stay runnable and inside
their kind, the corpus grows from cases that reached new behaviour and
starts from earlier reproducers, coverage arrives through the shared map
from our own back-end built with trace-pc-guard, workers' results merge,
and feedback reaches more distinct behaviours than generation alone."""
import json
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest

from vhostuser.cli.fuzz import main
from vhostuser.fuzz import coverage, profiles
from vhostuser.fuzz.campaign import merge
from vhostuser.fuzz.case import Case, Outcome, Verdict
from vhostuser.fuzz.feedback import Behaviours
from vhostuser.fuzz.harness import Harness
from vhostuser.fuzz.mutate import KIND_OPS, POKE_WINDOW, Mutator
from vhostuser.fuzz.oracle import Target
from vhostuser.fuzz.replay import Reproducer
from vhostuser.fuzz.runner import case_for
from vhostuser.fuzz.spawn import Spawner

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_widths(a: dict) -> None:
    """Raises struct.error if a field would not fit the wire."""
    if a["op"] == "desc":
        struct.pack("<QIHHH", a["addr"], a["len"], a["flags"], a.get("next", 0) & 0xffff,
                    a.get("id", 0))
        assert 0 <= a.get("next", 0) < 1 << 16 and 0 <= a["slot"] < 1 << 16
    elif a["op"] == "msg":
        struct.pack("<II", a["request"], a["flags"])
        assert a["size"] is None or 0 <= a["size"] < 1 << 32
        assert len(a["fds"]) <= 16
    elif a["op"] == "chain":
        for gpa, length, writable in a["buffers"]:
            struct.pack("<QI?", gpa, length, writable)
    elif a["op"] == "avail":
        struct.pack(f"<{len(a['heads'])}HH", *a["heads"], a["advance"])


def test_mutations_stay_runnable_and_inside_their_kind():
    rng = random.Random(7)
    mutator = Mutator(rng, allow_packed=True)
    parents = [case_for(p, 3, i, allow_packed=True) for p in ("blk", "net") for i in range(150)]
    kinds = set()
    for parent in parents:
        before = parent.dumps()
        child = parent
        for _ in range(6):
            child = mutator.mutate(child, rng.choice(parents))
            assert child.actions and child.kind == parent.kind
            assert {a["op"] for a in child.actions} <= KIND_OPS[child.kind]
            for a in child.actions:
                check_widths(a)
                if a["op"] == "poke":
                    assert POKE_WINDOW[0] <= a["gpa"]
                    assert a["gpa"] + len(a["data"]) // 2 <= POKE_WINDOW[1]
            assert Case.from_json(json.loads(child.dumps())) == child
        assert parent.dumps() == before          # parents are never changed in place
        kinds.add(child.kind)
    assert kinds == {"messages", "memory", "ring", "request", "frame", "unnegotiated"}


def test_behaviours_count_what_is_new_and_how_rare():
    seen = Behaviours()
    case = Case("blk", "request")
    a = Outcome(Verdict.PASS, events=["msg:GET_FEATURES:x", "cov:5:1"])
    b = Outcome(Verdict.PASS, events=["msg:GET_FEATURES:x", "cov:5:2", "cov:9:1"])
    assert len(seen.add(case, a)) == 3       # two events + kind/verdict
    assert seen.add(case, b) == {"cov:5:2", "cov:9:1"}
    assert seen.edges() == 2
    assert seen.rarity({"cov:9:1"}) > seen.rarity({"msg:GET_FEATURES:x"})


def test_merge_dedupes_signatures_across_workers(tmp_path):
    files = []
    for w in range(2):
        path = tmp_path / f"w{w}.json"
        path.write_text("{}")
        files.append(str(path))
    part = lambda w, n: {"verdicts": {"PASS": 5, "REJECT": 0, "WEDGED": 0, "CRASHED": n,
                                      "TIMEOUT": 0},
                         "skipped": 0, "frontend_errors": 0, "wedged_cleared_by_reset": 0,
                         "elapsed": 3.0 + w, "restarts": n, "corpus": 2, "unnegotiated": {},
                         "signatures": {"CRASHED SIGSEGV: x": {"count": n, "verdict": "CRASHED",
                                                               "case": f"w{w}",
                                                               "reproducer": files[w]}},
                         "reproducers": [files[w]]}
    seen = Behaviours()
    seen.seen = {"a", "b", "cov:1:1"}
    total = merge([part(0, 2), part(1, 3)], seen)
    assert total.counts[Verdict.CRASHED] == 5 and total.cases == 15
    assert total.signatures["CRASHED SIGSEGV: x"]["count"] == 5
    assert os.path.exists(files[0]) and not os.path.exists(files[1])
    assert total.reproducers == [files[0]]
    assert total.behaviours == 3 and total.edges == 1 and total.elapsed == 4.0


def blk_spawn(extra=""):
    return (f"{sys.executable} -m vhostuser.cli.blk --socket-path {{socket}} --ramdisk 16M "
            f"--num-queues 2{extra}")


def test_feedback_starts_from_reproducers_and_keeps_a_corpus(tmp_path, capsys):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    seed = case_for("blk", 99, 3, allow_packed=True, kinds=("request",))
    Reproducer(seed, Outcome(Verdict.PASS)).write(str(seeds / "earlier.json"))
    out = tmp_path / "out"
    rc = main(["--socket", str(tmp_path / "b.sock"), "--profile", "blk", "--feedback",
               "--cases", "200", "--seed", "4", "--timeout", "1", "--out", str(out),
               "--seed-corpus", str(seeds), "--spawn", blk_spawn(), "--json"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert rc == 0, summary
    assert summary["cases"] == 200 and summary["verdicts"]["WEDGED"] == 0
    assert "case w0-seed0:" not in captured.err       # (only failures are logged)
    corpus = sorted(os.listdir(out / "corpus"))
    assert summary["corpus"] == len(corpus) > 5
    # The earlier reproducer ran first and, being new then, entered the corpus.
    first = Case.from_json(json.loads((out / "corpus" / corpus[0]).read_text()))
    assert first.actions == seed.actions
    assert any(json.loads((out / "corpus" / n).read_text()).get("index") is None
               for n in corpus)                      # mutated entries (no seed index)


@pytest.fixture(scope="module")
def cov_build(tmp_path_factory):
    if shutil.which("clang") is None:
        pytest.skip("clang not installed")
    out = tmp_path_factory.mktemp("cov")
    subprocess.run([os.path.join(REPO, "fuzz", "build_cov.sh")], check=True, capture_output=True,
                   timeout=600, env={**os.environ, "FUZZ_COV_DIR": str(out)})
    return out


def cov_spawn(build) -> str:
    return (f"env PYTHON={sys.executable} {build}/run -m vhostuser.cli.blk "
            f"--socket-path {{socket}} --ramdisk 16M --num-queues 2")


def test_coverage_of_c_and_python_reaches_the_map(tmp_path, cov_build):
    cov = coverage.CoverageMap("-test")
    sp = Spawner(cov_spawn(cov_build), str(tmp_path / "c.sock"),
                 env={**os.environ, **cov.env()})
    try:
        sp.start()
        harness = Harness(Target(sp.socket_path, profiles.get("blk"), timeout=2.0), sp,
                          coverage=cov, log=lambda s: None)
        ring = harness.run(case_for("blk", 1, 0, allow_packed=True, kinds=("request",)))
        msgs = harness.run(case_for("blk", 1, 1, allow_packed=True, kinds=("messages",)))
    finally:
        sp.stop()
        cov.close()
    for out in (ring, msgs):
        idx = {int(f.split(":")[1]) for f in out.events if f.startswith("cov:")}
        assert any(i < coverage.MAP_SIZE // 2 for i in idx)       # C edges (data plane)
        assert any(i >= coverage.MAP_SIZE // 2 for i in idx)      # Python lines (handler)


def test_feedback_reaches_more_behaviours_than_generation(tmp_path, capsys, cov_build):
    """Same target, seed and number of cases (a time budget would depend on
    the machine's load): feedback's corpus and mutation reach more distinct
    behaviours (coverage included) than generation alone."""
    got = {}
    cases = os.environ.get("FUZZ_FEEDBACK_CASES", "1200")
    for mode in ("generation", "feedback"):
        rc = main(["--socket", str(tmp_path / f"{mode}.sock"), "--profile", "blk", "--cases", cases,
                   "--seed", "11", "--timeout", "1", "--coverage", "--out", str(tmp_path / mode),
                   "--spawn", cov_spawn(cov_build), "--json"]
                  + (["--feedback"] if mode == "feedback" else []))
        got[mode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert rc == 0, got[mode]
        assert got[mode]["edges"] > 100
    assert got["feedback"]["behaviours"] > got["generation"]["behaviours"], got


@pytest.mark.parametrize("mode", ["generation", "feedback"])
def test_parallel_workers_split_the_work_and_merge(tmp_path, capsys, mode):
    out = tmp_path / "out"
    rc = main(["--socket", str(tmp_path / "p.sock"), "--profile", "blk", "--cases", "40",
               "--seed", "5", "--timeout", "1", "--out", str(out), "--workers", "2",
               "--spawn", blk_spawn(), "--json"] + (["--feedback"] if mode == "feedback" else []))
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert rc == 0 and summary["cases"] == 40, summary
    assert summary["behaviours"] > 20
    if mode == "feedback":      # both workers kept entries in the shared corpus
        tags = {name.split("-")[0] for name in os.listdir(out / "corpus")}
        assert tags == {"w0", "w1"} and summary["corpus"] == len(os.listdir(out / "corpus"))
