"""Lesson 05 (05_anneal): schedules, i.e. functions of training progress ``pos`` in [0, 1].

``sched_lin(start, end)`` returns ``pos -> value``; the ``annealer`` decorator turns a plain
``f(start, end, pos)`` into that two-step form. ``combine_scheds`` glues schedules end to end
(warm-up then anneal: the one-cycle shape), ``cos_1cycle_anneal`` gives the lesson's two cosine halves.
``ParamScheduler`` (in ``minilib.callbacks``) evaluates one at ``n_epochs / epochs`` before each batch.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Sequence

from minilib import contract

__all__ = [
    "Schedule",
    "annealer",
    "sched_lin",
    "sched_cos",
    "sched_no",
    "sched_exp",
    "combine_scheds",
    "cos_1cycle_anneal",
]


class Schedule:
    """``f(start, end, pos)`` with ``start`` and ``end`` fixed: call it with ``pos`` in [0, 1], get a float.

    A small class rather than a closure so that a schedule has a readable repr and can be pickled.
    """

    def __init__(self, f: Callable, start, end, builder: Callable | None = None):
        name = getattr(f, "__name__", "schedule")
        self.f, self.name, self.builder = f, name, builder
        self.start = contract.finite_number(name, start=start)
        self.end = contract.finite_number(name, end=end)

    def __reduce__(self):
        # Pickle as "call the public builder again" (sched_cos(1, 2)): the raw f hides behind the decorator.
        if self.builder is None:
            return (Schedule, (self.f, self.start, self.end))
        return (self.builder, (self.start, self.end))

    def __call__(self, pos) -> float:
        return float(self.f(self.start, self.end, contract.finite_number(self.name, within=(0, 1), pos=pos)))

    def __repr__(self) -> str:
        return f"{self.name}({self.start:g}, {self.end:g})"


def annealer(f: Callable[[float, float, float], float]) -> Callable[[float, float], Schedule]:
    """Decorator: ``f(start, end, pos)`` becomes ``f(start, end)`` returning ``pos -> value``."""
    if not callable(f):
        contract.fail("annealer", "f", "a function f(start, end, pos)", f, TypeError)

    @functools.wraps(f)
    def _inner(start, end) -> Schedule:
        return Schedule(f, start, end, builder=_inner)

    return _inner


def _mix(start: float, end: float, w: float) -> float:
    """``start + w * (end - start)`` for a weight w in [0, 1], as ``start * (1 - w) + end * w``: the
    difference ``end - start`` overflows for finite ends of opposite signs (1e308 and -1e308), the
    weighted sum cannot, and it gives ``start`` at w = 0 and ``end`` at w = 1 exactly. Clamped to the
    two ends, which the result lies between mathematically (rounding could step a hair outside)."""
    lo, hi = min(start, end), max(start, end)
    return min(max(start * (1 - w) + end * w, lo), hi)


@annealer
def sched_lin(start: float, end: float, pos: float) -> float:
    """Straight line from ``start`` (pos 0) to ``end`` (pos 1): the lesson's ``start + pos*(end-start)``."""
    return _mix(start, end, pos)


@annealer
def sched_cos(start: float, end: float, pos: float) -> float:
    """Half a cosine from ``start`` to ``end``: flat at both ends, steepest in the middle.

    The lesson's ``start + (1 + cos(pi * (1 - pos))) * (end - start) / 2``, as a weighted mix."""
    return _mix(start, end, (1 + math.cos(math.pi * (1 - pos))) / 2)


@annealer
def sched_no(start: float, end: float, pos: float) -> float:
    """Constant ``start`` (``end`` is ignored): a schedule that does not schedule."""
    return start


def _exp(start: float, end: float, pos: float) -> float:
    # start * (end / start) ** pos, with the ratio taken in logs (end / start overflows for 1e-300 and 1e300):
    # the magnitude goes geometrically from |start| to |end|; the sign, the ends' own, stays.
    a, b = abs(start), abs(end)
    return math.copysign(min(max(math.exp(_mix(math.log(a), math.log(b), pos)), min(a, b)), max(a, b)), start)


_exp.__name__ = "sched_exp"  # what a Schedule's repr prints


def sched_exp(start, end) -> Schedule:
    """Geometric from ``start`` to ``end``: equal ratios in equal steps (a straight line on a log axis).

    ``(end / start) ** pos`` is a real number only for ends of one sign, neither of them zero: two
    learning rates, or two negative values (``sched_exp(-1, -3)`` is ``-1 * 3 ** pos``, as the notebook
    computes it). A zero or ends of opposite signs: ValueError naming the argument.
    """
    sched = Schedule(_exp, start, end, builder=sched_exp)  # checks that both are finite numbers
    if sched.start == 0:
        contract.fail("sched_exp", "start", "non-zero (end / start is the ratio)", start)
    if sched.end == 0 or (sched.end > 0) != (sched.start > 0):
        contract.fail("sched_exp", "end", f"non-zero and of start's sign (start is {sched.start:g})", end)
    return sched


class CombinedSchedule:
    """Schedules glued end to end; see ``combine_scheds``."""

    def __init__(self, pcts: list[float], scheds: list[Callable]):
        self.pcts, self.scheds = pcts, scheds
        bounds = [0.0]
        for p in pcts:
            bounds.append(bounds[-1] + p)
        bounds[-1] = 1.0  # the pcts sum to 1 within 1e-6: make the last bound exact so pos 1.0 is covered
        self.bounds = bounds
        # The last segment that is not empty: pos 1.0 ends there.
        self.last = max(i for i, p in enumerate(pcts) if bounds[i + 1] > bounds[i])

    def __call__(self, pos) -> float:
        pos = contract.finite_number("combine_scheds", within=(0, 1), pos=pos)
        # The segment i with bounds[i] <= pos < bounds[i+1]; bisect_right skips empty segments by itself.
        i = min(bisect.bisect_right(self.bounds, pos) - 1, self.last)
        lo, hi = self.bounds[i], self.bounds[i + 1]
        local = min(max((pos - lo) / (hi - lo), 0.0), 1.0)  # clamp rounding noise at the segment's ends
        return float(self.scheds[i](local))

    def __repr__(self) -> str:
        return f"combine_scheds({self.pcts}, {self.scheds})"


def combine_scheds(pcts: Sequence[float], scheds: Sequence[Callable]) -> CombinedSchedule:
    """One schedule made of several: ``scheds[i]`` runs over the fraction ``pcts[i]`` of training.

    Each piece sees its own pos from 0 to 1. ``pcts`` must be >= 0 and sum to 1 (within 1e-6), one per
    schedule. Unlike the lesson's version, the sum is not compared with ``==`` (0.1 + 0.2 + 0.7 is not
    exactly 1 in floating point) and pos = 1.0 is defined (the end of the last piece).
    """
    fname = "combine_scheds"
    if isinstance(pcts, (str, bytes)) or not isinstance(pcts, Sequence):
        contract.fail(fname, "pcts", "a list of fractions", pcts, TypeError)
    pcts = [contract.finite_number(fname, within=(0, 1), **{f"pcts[{i}]": p}) for i, p in enumerate(pcts)]
    if abs(sum(pcts) - 1.0) > 1e-6:  # not ==, as 0.1 + 0.2 + 0.7 is not exactly 1; no pcts at all sum to 0
        contract.fail(fname, "pcts", "fractions that sum to 1 (within 1e-6)", f"{pcts}, sum {sum(pcts)!r}")
    if len(scheds) != len(pcts):
        contract.fail(fname, "scheds", f"{len(pcts)} schedules, one per pct", f"{len(scheds)} schedules")
    for i, sched in enumerate(scheds):
        if not callable(sched):
            contract.fail(fname, f"scheds[{i}]", "a schedule, pos -> value", sched, TypeError)
    return CombinedSchedule(pcts, list(scheds))


def cos_1cycle_anneal(start: float, high: float, end: float) -> list[Schedule]:
    """The lesson's one-cycle halves: cosine up from ``start`` to ``high``, then down to ``end``.

    Give them to ``combine_scheds`` with the warm-up fraction, e.g. ``combine_scheds([0.3, 0.7], ...)``.
    """
    contract.finite_number("cos_1cycle_anneal", start=start, high=high, end=end)
    return [sched_cos(start, high), sched_cos(high, end)]
