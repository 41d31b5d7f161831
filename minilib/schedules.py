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
import numbers
from collections.abc import Callable, Sequence

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


def _check_number(x, fname: str, arg: str) -> float:
    # Tensors of one element are fine (the lesson plots schedules over torch.linspace), bools are not.
    if isinstance(x, bool) or not (isinstance(x, numbers.Real) or _is_scalar_tensor(x)):
        raise TypeError(f"{fname}: {arg} must be a real number, got {type(x).__name__} {x!r}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{fname}: {arg} must be finite, got {x}")
    return x


def _is_scalar_tensor(x) -> bool:
    return hasattr(x, "numel") and hasattr(x, "item") and x.numel() == 1


def _check_pos(pos, fname: str) -> float:
    pos = _check_number(pos, fname, "pos")
    if not 0.0 <= pos <= 1.0:
        raise ValueError(f"{fname}: pos is the fraction of training done and must lie in [0, 1], got {pos}")
    return pos


class Schedule:
    """``f(start, end, pos)`` with ``start`` and ``end`` fixed: call it with ``pos`` in [0, 1], get a float.

    A small class rather than a closure so that a schedule has a readable repr and can be pickled.
    """

    def __init__(self, f: Callable, start, end, builder: Callable | None = None):
        name = getattr(f, "__name__", "schedule")
        self.f, self.name, self.builder = f, name, builder
        self.start, self.end = _check_number(start, name, "start"), _check_number(end, name, "end")

    def __reduce__(self):
        # Pickle as "call the public builder again" (sched_cos(1, 2)): the raw f hides behind the decorator.
        if self.builder is None:
            return (Schedule, (self.f, self.start, self.end))
        return (self.builder, (self.start, self.end))

    def __call__(self, pos) -> float:
        return float(self.f(self.start, self.end, _check_pos(pos, self.name)))

    def __repr__(self) -> str:
        return f"{self.name}({self.start:g}, {self.end:g})"


def annealer(f: Callable[[float, float, float], float]) -> Callable[[float, float], Schedule]:
    """Decorator: ``f(start, end, pos)`` becomes ``f(start, end)`` returning ``pos -> value``."""

    @functools.wraps(f)
    def _inner(start, end) -> Schedule:
        return Schedule(f, start, end, builder=_inner)

    return _inner


@annealer
def sched_lin(start: float, end: float, pos: float) -> float:
    """Straight line from ``start`` (pos 0) to ``end`` (pos 1)."""
    return start + pos * (end - start)


@annealer
def sched_cos(start: float, end: float, pos: float) -> float:
    """Half a cosine from ``start`` to ``end``: flat at both ends, steepest in the middle."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


@annealer
def sched_no(start: float, end: float, pos: float) -> float:
    """Constant ``start`` (``end`` is ignored): a schedule that does not schedule."""
    return start


def _exp(start: float, end: float, pos: float) -> float:
    return start * (end / start) ** pos


_exp.__name__ = "sched_exp"  # what a Schedule's repr prints


def sched_exp(start, end) -> Schedule:
    """Geometric from ``start`` to ``end``: equal ratios in equal steps (a straight line on a log axis).

    ``start`` and ``end`` must be non-zero with the same sign, else ``(end / start) ** pos`` is undefined,
    so this one checks its arguments before it becomes a Schedule.
    """
    s, e = _check_number(start, "sched_exp", "start"), _check_number(end, "sched_exp", "end")
    if s == 0 or e == 0 or (s < 0) != (e < 0):
        raise ValueError(
            f"sched_exp: start and end must be non-zero and of the same sign, got start={s:g}, end={e:g}"
        )
    return Schedule(_exp, s, e, builder=sched_exp)


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
        pos = _check_pos(pos, "combine_scheds")
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
    if isinstance(pcts, (str, bytes)) or not isinstance(pcts, Sequence):
        raise TypeError(f"combine_scheds: pcts must be a list of fractions, got {type(pcts).__name__}")
    if isinstance(scheds, (str, bytes)) or not isinstance(scheds, Sequence):
        raise TypeError(f"combine_scheds: scheds must be a list of schedules, got {type(scheds).__name__}")
    if len(pcts) == 0 or len(pcts) != len(scheds):
        raise ValueError(
            f"combine_scheds: pcts and scheds must be non-empty and of the same length (one fraction per "
            f"schedule), got {len(pcts)} pcts and {len(scheds)} scheds"
        )
    pcts = [_check_number(p, "combine_scheds", f"pcts[{i}]") for i, p in enumerate(pcts)]
    if any(p < 0 for p in pcts):
        raise ValueError(f"combine_scheds: pcts must all be >= 0, got {pcts}")
    if abs(sum(pcts) - 1.0) > 1e-6:
        raise ValueError(
            f"combine_scheds: pcts must sum to 1 (within 1e-6), got {pcts} summing to {sum(pcts)!r}"
        )
    for i, s in enumerate(scheds):
        if not callable(s):
            raise TypeError(f"combine_scheds: scheds[{i}] must be callable pos -> value, got {s!r}")
    return CombinedSchedule(pcts, list(scheds))


def cos_1cycle_anneal(start: float, high: float, end: float) -> list[Schedule]:
    """The lesson's one-cycle halves: cosine up from ``start`` to ``high``, then down to ``end``.

    Give them to ``combine_scheds`` with the warm-up fraction, e.g. ``combine_scheds([0.3, 0.7], ...)``.
    """
    return [sched_cos(start, high), sched_cos(high, end)]
