"""Mutations of a case, for feedback mode: a parent from the corpus becomes
a child that differs in a few places.

Every operator keeps a case runnable (fields stay within their wire widths,
ops stay known); whether it stays well-formed is up to chance, as in
generation. Fresh material comes from the generators in :mod:`.generate`,
so a mutated case can reach anything a generated one can.
"""
from __future__ import annotations

import copy
import random

from ..protocol import ProtocolFeature, Request
from . import generate, layout
from .case import STAGES, Case
from .source import RandomSource

# Wire widths of the integer fields each op carries.
BITS = {"msg": {"request": 32, "flags": 32, "size": 32},
        "desc": {"addr": 64, "len": 32, "flags": 16, "next": 16, "id": 16, "slot": 16},
        "poke": {"gpa": 64},
        "avail": {"advance": 16},
        "template": {"index": 32, "flags": 32, "desc": 64, "used": 64, "avail": 64, "log": 64}}
INTERESTING = sorted(set(generate.INTERESTING_NUMS) | set(generate.INTERESTING_U64)
                     | set(layout.INTERESTING_LENGTHS) | set(layout.interesting_addresses()))
# The ops each kind is made of: the oracle judges a kind by what it can
# contain (a message that closes the connection is a refusal in a messages
# case, but would read as a silent failure in a request case).
KIND_OPS = {"messages": {"msg"}, "unnegotiated": {"msg"}, "memory": {"msg", "kick"},
            "ring": {"poke", "desc", "avail", "kick"}, "request": {"poke", "chain", "kick"},
            "frame": {"poke", "chain", "kick"}}
# Guest addresses the case may write: its data window. The rings live below
# it, and a poke there would break a queue the oracle probes (a false WEDGED).
POKE_WINDOW = (layout.DATA, layout.DATA + layout.DATA_SIZE)
ADDRESS_KEYS = {("desc", "addr"), ("poke", "gpa")}
# Protocol features whose requests a case may send without them (issue 14).
WITHHOLDABLE = ("CONFIG", "CONFIGURE_MEM_SLOTS", "STATUS", "RESET_DEVICE")


class Mutator:
    def __init__(self, rng: random.Random, *, allow_packed: bool):
        self.rng = rng
        self.src = RandomSource(rng)
        self.allow_packed = allow_packed

    def mutate(self, parent: Case, donor: Case | None = None) -> Case:
        child = parent.copy()
        child.seed = child.index = None
        for _ in range(self.rng.choice((1, 1, 2, 2, 3, 4))):
            op = self.rng.choice(self.OPS)
            op(self, child, donor)
        allowed = KIND_OPS[child.kind]
        child.actions = [a for a in child.actions if a["op"] in allowed]
        for a in child.actions:
            if a["op"] == "poke":
                a["gpa"] = self._in_window(a["gpa"], len(a["data"]) // 2)
        if not child.actions:
            child.actions = self._fresh(child)
        return child

    @staticmethod
    def _in_window(gpa: int, length: int) -> int:
        lo, hi = POKE_WINDOW
        if lo <= gpa and gpa + length <= hi:
            return gpa
        return lo + (gpa - lo) % max(hi - lo - length, 1)

    def _address(self, value: int) -> int:
        """Addresses move as generation places them, or a little: a random
        one could land on a ring the oracle probes."""
        r = self.rng.random()
        if r < 0.5:
            return generate._address(self.src)
        return (value + self.rng.choice((-16, -1, 1, 16, 512, -512, 4096))) % (1 << 64)

    # -- numbers -------------------------------------------------------------------
    def _number(self, value: int, bits: int) -> int:
        r = self.rng.random()
        if r < 0.3:
            new = self.rng.choice(INTERESTING)
        elif r < 0.55:
            new = value + self.rng.choice((-1, 1, -16, 16, 512, -512))
        elif r < 0.8:
            new = value ^ (1 << self.rng.randrange(bits))
        else:
            new = self.rng.getrandbits(bits)
        return new & ((1 << bits) - 1)

    @staticmethod
    def _int_fields(action: dict) -> list[tuple[object, object, int]]:
        """(container, key, bits) of every integer in the action."""
        widths = BITS.get(action["op"], {})
        out = [(action, k, b) for k, b in widths.items() if isinstance(action.get(k), int)]
        payload = action.get("payload")
        if isinstance(payload, dict):
            out += [(payload, k, b) for k, b in BITS["template"].items() if k in payload]
        for i in range(len(action.get("heads", ()))):
            out.append((action["heads"], i, 16))
        for buf in action.get("buffers", ()):
            out += [(buf, 0, 64), (buf, 1, 32)]
        return out

    # -- operators -----------------------------------------------------------------
    def tweak_number(self, case: Case, donor) -> None:
        fields = [f for a in case.actions for f in self._int_fields(a)]
        if fields:
            d, key, bits = self.rng.choice(fields)
            is_address = (isinstance(d, dict) and (d.get("op"), key) in ADDRESS_KEYS) or \
                (isinstance(d, list) and key == 0 and bits == 64)
            d[key] = self._address(d[key]) if is_address else self._number(d[key], bits)

    def tweak_bytes(self, case: Case, donor) -> None:
        """Flips, truncates or extends a hex payload or poke."""
        spots = [(a, k) for a in case.actions for k in ("payload", "data")
                 if isinstance(a.get(k), str)]
        if not spots:
            return
        a, key = self.rng.choice(spots)
        raw = bytearray(bytes.fromhex(a[key]))
        r = self.rng.random()
        if raw and r < 0.6:
            for _ in range(self.rng.randint(1, 4)):
                i = self.rng.randrange(len(raw))
                raw[i] = self.rng.choice((0, 0xff, 0x80, 1, raw[i] ^ (1 << self.rng.randrange(8))))
        elif raw and r < 0.8:
            del raw[self.rng.randrange(len(raw)):]
        else:
            raw += self.rng.randbytes(self.rng.randint(1, 16))
        a[key] = bytes(raw).hex()

    def tweak_message(self, case: Case, donor) -> None:
        msgs = [a for a in case.actions if a["op"] == "msg"]
        if not msgs:
            return self.tweak_number(case, donor)
        a = self.rng.choice(msgs)
        r = self.rng.random()
        if r < 0.3:
            a["request"] = int(self.rng.choice(list(Request)))
        elif r < 0.5:
            a["flags"] ^= self.rng.choice((generate.FLAG_NEED_REPLY, generate.FLAG_REPLY,
                                           1 << self.rng.randrange(4, 32)))
        elif r < 0.7:
            n = len(a["payload"]) // 2 if isinstance(a["payload"], str) else 40
            a["size"] = self.rng.choice((None, 0, max(n - 1, 0), n + 1, 4096, (1 << 32) - 1))
        else:
            fds = list(a.get("fds", ()))
            if fds and self.rng.random() < 0.5:
                del fds[self.rng.randrange(len(fds))]
            else:
                fds.append(self.rng.choice(("eventfd", "memfd:4096", "memfd:2097152")))
            a["fds"] = fds[:16]          # generation sends up to 16: more than any request takes

    def drop(self, case: Case, donor) -> None:
        if len(case.actions) > 1:
            del case.actions[self.rng.randrange(len(case.actions))]

    def duplicate(self, case: Case, donor) -> None:
        if case.actions and len(case.actions) < 24:
            i = self.rng.randrange(len(case.actions))
            case.actions.insert(self.rng.randrange(len(case.actions) + 1),
                                copy.deepcopy(case.actions[i]))

    def swap(self, case: Case, donor) -> None:
        if len(case.actions) > 1:
            i, j = self.rng.sample(range(len(case.actions)), 2)
            case.actions[i], case.actions[j] = case.actions[j], case.actions[i]

    def insert_fresh(self, case: Case, donor) -> None:
        fresh = self._fresh(case)
        at = self.rng.randrange(len(case.actions) + 1)
        case.actions[at:at] = fresh[:24 - len(case.actions)]

    def splice(self, case: Case, donor) -> None:
        if donor is None or not donor.actions:
            return self.insert_fresh(case, donor)
        i = self.rng.randrange(len(donor.actions))
        j = self.rng.randint(i + 1, min(len(donor.actions), i + 6))
        at = self.rng.randrange(len(case.actions) + 1)
        case.actions[at:at] = copy.deepcopy(donor.actions[i:j])[:24 - len(case.actions)]

    def tweak_setup(self, case: Case, donor) -> None:
        s = case.setup
        r = self.rng.random()
        if r < 0.2 and case.kind in ("messages", "unnegotiated"):
            s.stage = self.rng.choice(STAGES)
        elif r < 0.35 and self.allow_packed:
            s.packed = not s.packed
        elif r < 0.5:
            s.indirect = not s.indirect
        elif r < 0.65:
            s.event_idx = not s.event_idx
        elif r < 0.8:
            s.queue_size = self.rng.choice(generate.QUEUE_SIZES)
        else:
            name = self.rng.choice(WITHHOLDABLE)
            s.withhold = sorted(set(s.withhold) ^ {name})

    OPS = (tweak_number, tweak_number, tweak_bytes, tweak_message, drop, duplicate, swap,
           insert_fresh, splice, splice, tweak_setup)

    def _fresh(self, case: Case) -> list[dict]:
        src = self.src
        kind = case.kind
        if kind in ("messages", "unnegotiated"):
            return [generate.message(src)]
        if kind == "memory":
            return generate.memory_messages(src)[:1]
        if kind == "ring":
            return generate.ring_actions(src, case.setup, blk=case.profile == "blk")
        if kind == "request":
            return generate.blk_request(src, self.rng.randrange(3)) + [{"op": "kick"}]
        return generate.net_frame(src, self.rng.randrange(3)) + [{"op": "kick"}]


assert set(WITHHOLDABLE) <= set(ProtocolFeature.__members__)
