"""Summaries, the per-model tables, the issue's targets (PASS/MISS) and the machine-readable results.

Per variant and clock (wall, CPU of the training thread): the median and quartiles of the per-round block
means; the ratio to no agent and the added time per step, each the median over rounds of the pair measured in
the same round (variant vs. no agent), which cancels load that drifts between rounds; and, for gradwatch
variants, wandb.watch's added time divided by theirs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .models import ModelSpec
from .rounds import Blocks
from .variants import CADENCE

__all__ = ["BUDGET_TOLERANCE", "Summary", "render_model", "summarise", "targets"]

BASELINE = "none"
CLOCKS = ("wall", "cpu")
DEFAULT_LIMIT = 1.01  # issue 3: at default settings, for steps >= 10 ms
FULL_LIMIT = 1.05  # issue 3: with full statistics every step
WANDB_FACTOR = 10.0  # issue 3: at least 10x less added time than wandb.watch at the same cadence
WAIT_WARNING = 1.1  # wall / CPU time of the bare step above this: the training thread waited for a core
BUDGET_TOLERANCE = 1.5  # tiny model: measured added CPU share within 1.5x the agent's budget counts as held


Band = tuple[float, float]  # the interquartile range over rounds (q1, q3)


@dataclass(frozen=True)
class Summary:
    """One variant on one clock, in seconds per step (ratios and factors are plain numbers)."""

    median: float
    q1: float
    q3: float
    ratio: float | None  # vs. no agent, paired per round
    ratio_iqr: Band | None
    added: float | None  # seconds per step vs. no agent, paired per round
    added_iqr: Band | None
    wandb_factor: float | None  # wandb.watch's added time / this variant's added time

    def as_json(self) -> dict[str, Any]:
        ms = None if self.added_iqr is None else [self.added_iqr[0] * 1e3, self.added_iqr[1] * 1e3]
        return {
            "median_ms": self.median * 1e3,
            "q1_ms": self.q1 * 1e3,
            "q3_ms": self.q3 * 1e3,
            "ratio": self.ratio,
            "ratio_iqr": None if self.ratio_iqr is None else list(self.ratio_iqr),
            "added_ms": None if self.added is None else self.added * 1e3,
            "added_iqr_ms": ms,
            "wandb_factor": None if self.wandb_factor is None or math.isinf(self.wandb_factor) else self.wandb_factor,
        }


def _quartiles(values: list[float]) -> Band:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def summarise(results: Mapping[str, Blocks]) -> dict[str, dict[str, Summary]]:
    """{variant: {clock: Summary}} for one model."""
    series = {key: {"wall": b.wall_s, "cpu": b.cpu_s} for key, b in results.items()}
    out: dict[str, dict[str, Summary]] = {}
    for clock in CLOCKS:
        base = series[BASELINE][clock] if BASELINE in series else None
        added: dict[str, list[float]] = {}
        ratios: dict[str, list[float]] = {}
        if base is not None:
            for key, clocks in series.items():
                added[key] = [v - b for v, b in zip(clocks[clock], base, strict=True)]
                ratios[key] = [v / b for v, b in zip(clocks[clock], base, strict=True)]
        wandb_added = statistics.median(added["wandb"]) if "wandb" in added else None
        for key, clocks in series.items():
            values = clocks[clock]
            own = statistics.median(added[key]) if key in added else None
            factor = None
            if key.startswith("gradwatch") and wandb_added is not None and own is not None:
                factor = wandb_added / own if own > 0 else math.inf
            out.setdefault(key, {})[clock] = Summary(
                statistics.median(values),
                *_quartiles(values),
                ratio=statistics.median(ratios[key]) if key in ratios else None,
                ratio_iqr=_quartiles(ratios[key]) if key in ratios else None,
                added=own,
                added_iqr=_quartiles(added[key]) if key in added else None,
                wandb_factor=factor,
            )
    return out


@dataclass(frozen=True)
class Target:
    """One of the issue's targets on one clock. `within_noise`: the rounds' interquartile range of the measured
    quantity reaches across the limit (for the wandb factor: one of the two added times' range contains 0), so
    the verdict could flip on another run."""

    name: str
    clock: str
    value: float | None
    limit: float
    at_most: bool  # True: value <= limit passes; False: value >= limit passes
    within_noise: bool = False

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        ok = self.value <= self.limit if self.at_most else self.value >= self.limit
        return "PASS" if ok else "MISS"

    def as_json(self) -> dict[str, Any]:
        value = None if self.value is None or math.isinf(self.value) else self.value
        return {"name": self.name, "clock": self.clock, "value": value, "infinite": self.value == math.inf,
                "limit": self.limit, "at_most": self.at_most, "verdict": self.verdict,
                "within_noise": self.within_noise}  # fmt: skip


def _spans(band: Band | None, limit: float) -> bool:
    return band is not None and band[0] <= limit <= band[1]


def _ratio_target(name: str, clock: str, s: Summary, limit: float) -> Target:
    return Target(name, clock, s.ratio, limit, True, _spans(s.ratio_iqr, limit))


def targets(spec: ModelSpec, summary: Mapping[str, Mapping[str, Summary]],
            states: Mapping[str, list[dict[str, Any]]]) -> list[Target]:  # fmt: skip
    """The issue's targets that apply to this model and the variants that ran."""
    out: list[Target] = []
    for clock in CLOCKS:
        if spec.large:
            if "gradwatch" in summary:
                out.append(_ratio_target("ratio, defaults", clock, summary["gradwatch"][clock], DEFAULT_LIMIT))
            if "gradwatch-full" in summary:
                out.append(_ratio_target("ratio, full stats every step", clock, summary["gradwatch-full"][clock],
                                         FULL_LIMIT))  # fmt: skip
            for key in ("gradwatch", "gradwatch-fixed"):
                if key in summary and "wandb" in summary:
                    own, wandb = summary[key][clock], summary["wandb"][clock]
                    noisy = _spans(own.added_iqr, 0.0) or _spans(wandb.added_iqr, 0.0)
                    out.append(Target(f"wandb.watch added / {key} added", clock, own.wandb_factor, WANDB_FACTOR,
                                      False, noisy))  # fmt: skip
        elif "gradwatch" in summary and BASELINE in summary:
            s = summary["gradwatch"][clock]
            base = summary[BASELINE][clock].median
            budget = next((st["budget"] for st in states.get("gradwatch", []) if st.get("budget")), None)
            if budget and s.added is not None:
                limit = BUDGET_TOLERANCE * budget
                band = None if s.added_iqr is None else (s.added_iqr[0] / base, s.added_iqr[1] / base)
                out.append(Target(f"added share of step time <= {BUDGET_TOLERANCE}x budget {budget:.0%}", clock,
                                  s.added / base, limit, True, _spans(band, limit)))  # fmt: skip
    return out


# ---------------------------------------------------------------------- text


def _num(value: float | None, fmt: str, scale: float = 1.0, sign: bool = False) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return format(value * scale, ("+" if sign else "") + fmt)


def render_model(key: str, spec: ModelSpec, labels: Mapping[str, str], summary: Mapping[str, Mapping[str, Summary]],
                 states: Mapping[str, list[dict[str, Any]]], found: list[Target]) -> str:  # fmt: skip
    """The table, the agent's own budget view and the target lines for one model."""
    scale, unit = (1e3, "ms") if spec.large else (1e6, "us")
    cell = f"{'ms [IQR]':>21} {'ratio':>6} {'added ' + unit:>9} {'wandb/':>7}"
    lines = [
        f"{spec.label} ({key})",
        f"{'':<34}| {'wall time per step':^46} | {'training-thread CPU time per step':^46}",
        f"{'variant':<34}| {cell} | {cell}",
    ]
    for variant, clocks in summary.items():
        parts = []
        for clock in CLOCKS:
            s = clocks[clock]
            spread = f"{s.median * 1e3:.3f} [{s.q1 * 1e3:.3f}-{s.q3 * 1e3:.3f}]"
            added = _num(s.added, ".2f" if spec.large else ".0f", scale, sign=True)
            parts.append(f"{spread:>21} {_num(s.ratio, '.3f'):>6} {added:>9} {_num(s.wandb_factor, '.1f'):>7}")
        lines.append(f"{labels[variant]:<34}| {parts[0]} | {parts[1]}")
    for variant, blocks in states.items():
        if not blocks or blocks[-1].get("interval") is None:
            continue
        last = blocks[-1]
        measured = summary[variant]["cpu"].ratio
        if last["budget"]:
            view = (f"over budget: {'yes' if last['over_budget'] else 'no'}, its estimated share "
                    f"{_num(last.get('estimate'), '.2%')} of step time (budget {last['budget']:.0%}; measured here "
                    f"from CPU time: {_num(None if measured is None else measured - 1, '.2%')})")  # fmt: skip
        else:
            view = "budget controller off"
        lines.append(
            f"  {labels[variant]}: at the end of the last block full statistics every {last['interval']} steps, "
            f"{view}; all reports acknowledged in {sum(bool(b.get('acknowledged')) for b in blocks)}/{len(blocks)} "
            f"blocks, {sum(b.get('dropped', 0) for b in blocks)} dropped"
        )
    if BASELINE in summary:
        waited = summary[BASELINE]["wall"].median / summary[BASELINE]["cpu"].median
        if waited > WAIT_WARNING:
            lines.append(
                f"  note: without agent, wall time is {waited:.2f}x the training thread's CPU time: it waited for a "
                "core (shared machine); the CPU-time columns are the reliable ones here"
            )
    if spec.large and BASELINE in summary and summary[BASELINE]["cpu"].median < 0.010:
        lines.append("  note: the step without agent took < 10 ms of CPU here; the issue's targets assume >= 10 ms")
    for t in found:
        op = "<=" if t.at_most else ">="
        noise = " (within noise: the rounds' IQR reaches across it; another run may flip it)" if t.within_noise else ""
        lines.append(f"  target {t.name} ({t.clock}): {_num(t.value, '.3f')} {op} {t.limit:g}: {t.verdict}{noise}")
    if not found:
        lines.append("  (no target applies to the variants that ran)")
    return "\n".join(lines)


def model_json(spec: ModelSpec, results: Mapping[str, Blocks], summary: Mapping[str, Mapping[str, Summary]],
               found: list[Target]) -> dict[str, Any]:  # fmt: skip
    return {
        "label": spec.label,
        "large": spec.large,
        "cadence": CADENCE,
        "variants": {
            key: {
                "wall_ms_per_round": [v * 1e3 for v in results[key].wall_s],
                "cpu_ms_per_round": [v * 1e3 for v in results[key].cpu_s],
                "agent": results[key].states,
                **{clock: summary[key][clock].as_json() for clock in CLOCKS},
            }
            for key in summary
        },
        "targets": [t.as_json() for t in found],
    }
