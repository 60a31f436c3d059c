"""Rate-limited log messages, for failures that a misbehaving guest or store
repeats at request rate (a store that is down fails every request).

Per key (one kind of failure, e.g. a request failing with ECONNRESET): the
first occurrence is logged in full, traceback included. Later ones are held
back until ``interval`` seconds have passed since that key's last line; the
next one is then logged as a single line saying how many were held back
meanwhile. Held-back messages are counted per source (a queue: the
devices' ``log_suppressed`` counters) and still reach the DEBUG level when
it is enabled (``-vv``), one line each. :meth:`LogLimiter.flush` reports
what is still held back (at close). ``VHOSTUSER_LOG_INTERVAL=SECONDS`` in
the environment sets the interval (0: every occurrence is logged, the
first in full, the others as one line each).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Hashable

#: Seconds between two lines of one key, unless VHOSTUSER_LOG_INTERVAL says.
INTERVAL = 10.0
#: Keys remembered; beyond that, new kinds of failure share one key.
MAX_KEYS = 64
_OVERFLOW = object()


def default_interval() -> float:
    value = os.environ.get("VHOSTUSER_LOG_INTERVAL")
    try:
        return max(0.0, float(value)) if value else INTERVAL
    except ValueError:
        logging.getLogger(__name__).warning(
            "VHOSTUSER_LOG_INTERVAL=%r is not a number; using %gs", value, INTERVAL)
        return INTERVAL


class LogLimiter:
    """Logs through ``logger``, at most one line per key and ``interval``.
    Safe from any thread."""

    def __init__(self, logger: logging.Logger, interval: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval = default_interval() if interval is None else interval
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [time of its last line, held back since, last message and args]
        self._keys: dict[Hashable, list] = {}
        #: messages held back so far, by the source given with them
        self.suppressed: dict[Hashable, int] = {}
        self._once: set[Hashable] = set()

    def log(self, key: Hashable, level: int, msg: str, *args, exc_info=None,
            source: Hashable = None) -> bool:
        """Logs ``msg % args`` unless ``key`` was logged less than ``interval``
        seconds ago; returns False when it was held back (and counted in
        ``suppressed[source]``)."""
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is None and len(self._keys) >= MAX_KEYS:
                self._forget_quiet(now)
                if len(self._keys) >= MAX_KEYS:
                    key = _OVERFLOW
                    entry = self._keys.get(key)
            if entry is None:
                self._keys[key] = [now, 0, None]
                held = None
            elif now - entry[0] < self.interval:
                entry[1] += 1
                # Strings, not the objects: an exception kept here would keep
                # its traceback's frames, and the guest buffers they hold.
                entry[2] = (level, msg, tuple(a if isinstance(a, (int, float, str)) else str(a)
                                              for a in args))
                self.suppressed[source] = self.suppressed.get(source, 0) + 1
                held = -1
            else:
                held, since = entry[1], now - entry[0]
                entry[0], entry[1], entry[2] = now, 0, None
        if held is None:
            self.logger.log(level, msg, *args, exc_info=exc_info)
            return True
        if held < 0:
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug(msg + " (rate-limited)", *args)
            return False
        # Later occurrences: one line each, never the traceback again.
        if held:
            self.logger.log(level, msg + " (and %d like it not logged in the last %.0fs)", *args,
                            held, since)
        else:
            self.logger.log(level, msg, *args)
        return True

    def once(self, key: Hashable, level: int, msg: str, *args) -> bool:
        """Logs ``msg % args`` the first time ``key`` comes, never again."""
        with self._lock:
            if key in self._once:
                return False
            self._once.add(key)
        self.logger.log(level, msg, *args)
        return True

    def flush(self) -> None:
        """One line per key for what is held back and not yet reported."""
        with self._lock:
            pending = [(e[1], e[2]) for e in self._keys.values() if e[1]]
            for e in self._keys.values():
                e[1], e[2] = 0, None
        for held, (level, msg, args) in pending:
            self.logger.log(level, msg + " (the last of %d like it not logged)", *args, held)

    def _forget_quiet(self, now: float) -> None:
        # Keys with nothing held back whose interval is over: a new line of
        # theirs would be logged anyway, so they can go.
        for key in [k for k, e in self._keys.items()
                    if not e[1] and now - e[0] >= self.interval]:
            del self._keys[key]
