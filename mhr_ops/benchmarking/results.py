"""What a case returns: its timing samples, their statistics, and derived metrics (ratios and
differences against a baseline, each with its spread and, where the team tracks one, a target)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .harness import Stat, per_rep_difference, per_rep_ratio


@dataclass
class Metric:
    """A derived number with its spread. ``unit`` is "x" (a ratio) or "us" (a difference);
    ``better`` says which direction is good; ``target`` is a bound in the good direction."""

    name: str
    stat: Stat
    unit: str = "x"
    better: str = "lower"
    target: float | None = None
    target_note: str = ""
    note: str = ""

    @property
    def status(self) -> str:
        if self.target is None:
            return ""
        ok = self.stat.median <= self.target if self.better == "lower" else self.stat.median >= self.target
        return "met" if ok else "NOT met"


@dataclass
class Result:
    """One case of a shape set: ``samples_us[impl]`` holds one time per rep, reps interleaved."""

    shape_set: str
    case: str
    shape: dict
    baseline: str  # the implementation the others are compared with (a bare layer, or PEFT)
    samples_us: dict[str, list[float]]
    metrics: list[Metric] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def times(self) -> dict[str, Stat]:
        return {name: Stat.of(s) for name, s in self.samples_us.items()}

    @property
    def reps(self) -> int:
        return len(next(iter(self.samples_us.values())))

    def ratio(self, num: str, den: str, **kw) -> Metric:
        """Add the per-rep ratio ``num / den`` (time over time: lower is better)."""
        m = Metric(f"{num} / {den}", per_rep_ratio(self.samples_us, num, den), "x", **kw)
        self.metrics.append(m)
        return m

    def difference(self, a: str, b: str, **kw) -> Metric:
        """Add the per-rep difference ``a - b`` in microseconds (an overhead: lower is better)."""
        m = Metric(f"{a} - {b}", per_rep_difference(self.samples_us, a, b), "us", **kw)
        self.metrics.append(m)
        return m
