"""Socket-level fuzzing of vhost-user back-ends (``vhostuser-fuzz``).

* :mod:`.case`: what a case is (plain data, JSON round-trip) and verdicts;
* :mod:`.source`, :mod:`.generate`: case generators, driven either by a
  seeded ``random.Random`` (the command) or by hypothesis (the strategies in
  :mod:`vhostuser.testing.strategies`);
* :mod:`.execute`: runs one case over a socket with the library's front-end;
* :mod:`.oracle`: the liveness oracle that turns what happened into a verdict;
* :mod:`.shrink`, :mod:`.replay`: smaller failing cases, reproducer files;
* :mod:`.runner`: the loop behind the command.
"""
from .case import Case, Outcome, Verdict

__all__ = ["Case", "Outcome", "Verdict"]
