"""Shrinking and reproducer files, without a back-end."""
import pytest

from vhostuser.fuzz.case import Case, Outcome, Setup, Verdict
from vhostuser.fuzz.replay import Reproducer, ReproducerError
from vhostuser.fuzz.shrink import shrink


def test_shrink_keeps_the_one_action_that_matters():
    noise = [{"op": "poke", "gpa": 4096 * i, "data": "00" * 16} for i in range(10)]
    culprit = {"op": "desc", "slot": 3, "addr": 1 << 40, "len": 4096, "flags": 1, "next": 3}
    case = Case("blk", "ring", Setup(queue_size=64), noise[:5] + [culprit] + noise[5:])

    def run(c: Case) -> Outcome:
        bad = any(a["op"] == "desc" and a["next"] == 3 and a["flags"] & 1 for a in c.actions)
        return Outcome(Verdict.WEDGED if bad else Verdict.PASS)

    small, outcome, tries = shrink(case, run(case), run, budget=500)
    assert outcome.verdict is Verdict.WEDGED
    assert len(small.actions) == 1
    assert small.actions[0]["next"] == 3 and small.actions[0]["flags"] & 1
    assert small.actions[0]["addr"] == 0 and small.actions[0]["len"] == 0   # simplified too
    assert tries < 500


def test_reproducer_round_trip(tmp_path):
    case = Case("net", "frame", Setup(), [{"op": "kick"}], seed=7, index=3)
    path = str(tmp_path / "r.json")
    Reproducer(case, Outcome(Verdict.REJECT, "x", closed=True), command="c").write(path)
    back = Reproducer.read(path)
    assert back.case == case and back.outcome.verdict is Verdict.REJECT and back.outcome.closed


def test_reproducer_rejects_other_files(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"tool": "other"}')
    with pytest.raises(ReproducerError):
        Reproducer.read(str(path))
