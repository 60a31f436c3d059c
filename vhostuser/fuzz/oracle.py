"""The liveness oracle: after a malformed case, does the device still serve?

Steps, each taken only if the one before did not settle the verdict:

1. Same connection, no recovery: a well-formed request on a neighbour queue
   the case never touched, and on the fuzzed queue (directly when the case
   kept the ring well-formed, else after a queue restart: GET_VRING_BASE
   and a fresh ring at the returned base, as a driver recovers a queue).
2. Device reset (RESET_DEVICE on the same connection), full bring-up, probes.
3. Reconnect, full bring-up, probes.

PASS: the input was answered and step 1 succeeded. REJECT: the device
refused (stayed silent, broke the queue, signalled its error eventfd,
NACKed, or closed the connection) and steps 1-3 brought it back, a reset
being acceptable only when the case changed device configuration or the
device signalled the refusal. WEDGED: it stopped serving: a neighbour queue
stopped, or only a reset helped although the device never said anything
(``reset_clears`` True), or nothing helped (False). CRASHED: the process
died or its socket stopped accepting connections. A process we know of that
ends within ``Target.grace`` seconds of a failure (ASan writes its report
before it exits) is CRASHED, not WEDGED. TIMEOUT: a connection was accepted
but its first well-formed request was never answered, before the case ran.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, replace
from typing import Callable

from ..frontend import FeatureError, FrontendError, FrontendTimeout
from .case import Case, Outcome, Setup, Verdict
from .execute import CaseConnection, Executor, Observation, SetupFailed
from .profiles import Profile
from ..errors import VhostUserError

# Kinds whose actions change device configuration: a reset is their cure.
# "unnegotiated" too: its requests should be refused (a non-zero ack or a
# disconnect is correct behaviour), but one a back-end obeys anyway (say
# RESET_DEVICE) changes the device as asked. That is a conformance fault,
# counted per request in the summary ("accepted-without"), not a liveness one.
CONFIG_KINDS = ("messages", "memory", "unnegotiated")
# Kinds whose chains go through the driver's bookkeeping: the ring stays usable.
WELL_FORMED_RING_KINDS = ("request", "frame")


class CaseNotApplicable(VhostUserError):
    """The back-end does not offer what the case needs (e.g. packed rings)."""


@dataclass
class Target:
    """A back-end under test."""
    path: str
    profile: Profile
    timeout: float = 2.0          # per request / probe
    settle: float = 0.05          # how long a case's input may take to be answered
    alive: Callable[[], bool] | None = None    # the process, when we know it
    sibling: str | None = None    # another device of the same process
    grace: float = 3.0            # how long a dying process may take to end

    def is_alive(self) -> bool:
        return self.alive is None or self.alive()

    def dies_within(self, seconds: float) -> bool:
        """Whether the process we know of ends within ``seconds``."""
        if self.alive is None:
            return False
        deadline = time.monotonic() + seconds
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def _probe(conn: CaseConnection, q: int) -> None:
    vq = conn.fe.queues[q]
    conn.profile.probe(vq, conn.mem, conn.timeout)


def _probe_all(conn: CaseConnection) -> None:
    for q in range(conn.profile.queues):
        if q == conn.profile.fuzz_queue or q == conn.profile.neighbour:
            _probe(conn, q)


def _connection_lost(target: Target) -> bool:
    """True when nothing accepts on the socket any more, or the process died."""
    if not target.is_alive():
        return True
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(target.timeout)
        s.connect(target.path)
        return False
    except (FileNotFoundError, ConnectionRefusedError):
        return True
    except OSError:
        return False
    finally:
        s.close()


def _same_connection(conn: CaseConnection, case: Case, obs: Observation) -> tuple[bool, str, str]:
    """Step 1: (ok, recovery, what failed)."""
    p = conn.profile
    if p.neighbour is not None:
        try:
            _probe(conn, p.neighbour)
        except (FrontendError, OSError) as exc:
            return False, "none", f"neighbour queue {p.neighbour}: {exc}"
    recovery = "none"
    try:
        if case.kind in WELL_FORMED_RING_KINDS and not obs.error_signalled:
            try:
                _probe(conn, p.fuzz_queue)
                return True, recovery, ""
            except (FrontendError, OSError):
                pass
        recovery = "restart"
        conn.restart_queue(p.fuzz_queue, case.setup)
        _probe(conn, p.fuzz_queue)
        return True, recovery, ""
    except (FrontendError, OSError) as exc:
        return False, recovery, f"fuzzed queue {p.fuzz_queue} after restart: {exc}"


def _reset(conn: CaseConnection, setup: Setup) -> None:
    conn.fe.reset()
    conn.bring_up(setup, "queues")
    _probe_all(conn)


def _reconnect(conn: CaseConnection, setup: Setup) -> None:
    conn.open(setup, "queues")
    _probe_all(conn)


def _sibling_ok(target: Target) -> str:
    """'' if the sibling device serves, else why not."""
    conn = CaseConnection(target.sibling, target.profile, timeout=target.timeout)
    try:
        conn.open(Setup(), "queues")
        _probe_all(conn)
        return ""
    except (FrontendError, OSError) as exc:
        return f"sibling device {target.sibling}: {exc}"
    finally:
        conn.close()


def run_case(target: Target, case: Case) -> Outcome:
    """Runs one case on a fresh connection and judges it."""
    conn = CaseConnection(target.path, target.profile, timeout=target.timeout)
    try:
        outcome = _judge(target, conn, case)
    finally:
        conn.close()
    if outcome.verdict in (Verdict.WEDGED, Verdict.TIMEOUT) and target.dies_within(target.grace):
        outcome = replace(outcome, verdict=Verdict.CRASHED, reset_clears=None,
                          detail=f"process died after: {outcome.detail}")
    elif not outcome.verdict.failing and not target.is_alive():
        outcome = replace(outcome, verdict=Verdict.CRASHED, detail="process died after the case")
    outcome.events = outcome.events + [
        f"verdict:{case.kind}:{outcome.verdict.value}:{outcome.recovery}"]
    return outcome


def _judge(target: Target, conn: CaseConnection, case: Case) -> Outcome:
    try:
        conn.open(case.setup)
    except FeatureError as exc:
        raise CaseNotApplicable(str(exc)) from None
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        return Outcome(Verdict.CRASHED, f"socket does not accept before the case: {exc}")
    except FrontendTimeout as exc:
        if _connection_lost(target):
            return Outcome(Verdict.CRASHED, f"died before the case: {exc}")
        return Outcome(Verdict.TIMEOUT, f"connection accepted, first request unanswered: {exc}")
    except SetupFailed as exc:
        if _connection_lost(target):
            return Outcome(Verdict.CRASHED, f"died during bring-up: {exc}")
        return Outcome(Verdict.WEDGED, f"well-formed bring-up fails before the case: {exc}",
                       recovery="failed", reset_clears=False)

    obs = Executor(conn, settle=target.settle).run(case)
    base = dict(answered=obs.answered, closed=obs.closed, error_signalled=obs.error_signalled,
                events=obs.events)
    notes = "; ".join(obs.notes)
    if not target.is_alive():
        return Outcome(Verdict.CRASHED, "process died during the case " + notes, **base)

    failure = "connection closed by the back-end" if obs.closed else ""
    if not obs.closed and case.setup.stage == "queues" and case.kind not in CONFIG_KINDS:
        ok, recovery, failure = _same_connection(conn, case, obs)
        if ok:
            verdict = Verdict.PASS if obs.answered else Verdict.REJECT
            return _with_sibling(target, Outcome(verdict, notes, recovery=recovery, **base))
        if _connection_lost(target):
            return Outcome(Verdict.CRASHED, f"died while probing: {failure}", **base)

    # Steps 2 and 3.
    recovery = ""
    if not obs.closed and conn.fe is not None:
        try:
            _reset(conn, case.setup)
            recovery = "reset"
        except (FrontendError, OSError):
            pass
    if not recovery:
        try:
            _reconnect(conn, case.setup)
            recovery = "reconnect"
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            return Outcome(Verdict.CRASHED, f"socket stopped accepting: {exc}", **base)
        except (FrontendError, OSError) as exc:
            if _connection_lost(target):
                return Outcome(Verdict.CRASHED, f"died while recovering: {exc}", **base)
            return Outcome(Verdict.WEDGED, f"{failure}; reset and reconnect do not help: {exc}",
                           recovery="failed", reset_clears=False, **base)

    signalled = obs.closed or obs.error_signalled
    if case.kind in CONFIG_KINDS or signalled or case.setup.stage != "queues":
        return _with_sibling(target, Outcome(Verdict.REJECT, "; ".join(filter(None, [failure, notes])),
                                             recovery=recovery, **base))
    return Outcome(Verdict.WEDGED, f"{failure} (silently; {recovery} cleared it)",
                   recovery=recovery, reset_clears=True, **base)


def _with_sibling(target: Target, outcome: Outcome) -> Outcome:
    if target.sibling:
        why = _sibling_ok(target)
        if why:
            return replace(outcome, verdict=Verdict.WEDGED, detail=why, reset_clears=None)
    return outcome
