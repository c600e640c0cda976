"""The generated scenario matrix's report for bench/detection_quality.py --matrix (see its docstring)."""

from __future__ import annotations

import collections
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Iterable

import torch

from gradwatch.scenarios.matrix import ALLOW, VISIBLE, MatrixResult, MatrixRun, draw, run_matrix


def _median(values: list[float], unit: str = "") -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.3g}{unit} ({min(values):.3g}–{max(values):.3g})"


def _miss(r: MatrixResult) -> str:
    if r.effect is None:
        effect = ""
    elif r.run.fault == "corrupt_rank":
        effect = f" ({r.effect:.2f}× the other ranks' loss)"
    else:
        effect = f" ({r.effect:.2f}× the clean loss)"
    extra = "x" if r.run.extra else ""
    return f"{r.run.seed}{extra}:{r.run.family}/{r.run.fault}/w{r.run.world_size}{effect}"


def report_matrix(seeds: Iterable[int], max_world: int, record: str | None = None, *,
                  extra_bad_batch: bool = False) -> int:  # fmt: skip
    """Run every seed's matrix run (its extra bad-batch draw with `extra_bad_batch`) and print Markdown tables;
    returns 0. With `record`, each run is also appended to that file as one JSON line as soon as it ends (so a
    matrix run in chunks can be reported whole)."""
    results: list[MatrixResult] = []
    started = time.perf_counter()
    for seed in seeds:
        run = draw(seed, max_world=max_world, extra_bad_batch=extra_bad_batch)
        result = run_matrix(run)
        results.append(result)
        caught = "healthy" if run.healthy else ("caught" if result.caught() else "MISSED")
        print(f"  seed {seed} {run.name} ({run.where}): {caught}, {result.seconds:.1f} s", file=sys.stderr)
        if record:
            with open(record, "a") as f:
                f.write(json.dumps(dataclasses.asdict(result)) + "\n")
    print_report(results, time.perf_counter() - started)
    return 0


def report_recorded(paths: Iterable[str]) -> int:
    """Print the tables for runs recorded by `report_matrix(record=...)` (the wall time: the runs' own, summed)."""
    results = []
    for path in paths:
        with open(path) as f:
            for line in f:
                fields = json.loads(line)
                fields["run"] = MatrixRun(**fields["run"])
                results.append(MatrixResult(**fields))
    print_report(results, sum(r.seconds for r in results))
    return 0


def print_report(results: list[MatrixResult], elapsed: float) -> None:
    """The Markdown tables of the module docstring of bench/detection_quality.py."""
    healthy = [r for r in results if r.run.healthy]
    faulty = [r for r in results if not r.run.healthy]
    worlds = collections.Counter(r.run.world_size for r in results)
    print(
        f"\n{len(results)} matrix runs ({len(healthy)} healthy; world sizes {dict(sorted(worlds.items()))}) in "
        f"{elapsed:.0f} s (torch {torch.__version__}, 1 thread per rank)\n"
    )
    print("| detector | runs | recall | top-1 localisation | onset → alert (steps) | onset → alert (s) | misses |")
    print("|---|---|---|---|---|---|---|")
    by_detector: dict[str, list[MatrixResult]] = collections.defaultdict(list)
    for r in faulty:
        if r.visible:  # bad batches that raised the loss less than VISIBLE×: reported below, apart
            by_detector[str(r.run.expect)].append(r)
    for detector in sorted(by_detector):
        runs = by_detector[detector]
        hits = [r for r in runs if r.caught()]
        located = [r.localised() for r in hits]
        judged = [x for x in located if x is not None]
        steps, seconds = [], []
        for r in hits:
            alert = r.first(detector)
            assert alert is not None and r.run.onset is not None
            steps.append(float(alert["step"] - r.run.onset))
            if r.onset_wall is not None:
                seconds.append(max(0.0, float(alert["started_at"]) - r.onset_wall))
        misses = ", ".join(_miss(r) for r in runs if not r.caught())
        location = f"{sum(judged)}/{len(judged)}" if judged else "–"
        print(
            f"| {detector} | {len(runs)} | {len(hits)}/{len(runs)} ({len(hits) / len(runs):.0%}) | {location} | "
            f"{_median(steps)} | {_median(seconds)} | {misses or '–'} |"
        )
    spiked = [r for r in faulty if r.run.fault == "bad_batch" and r.effect is not None]
    if spiked:
        for label, chosen, note in (
            (f"≥ {VISIBLE}×", [r for r in spiked if r.visible], "loss_spike's row"),
            (f"< {VISIBLE}×", [r for r in spiked if not r.visible], "not in its recall"),
        ):
            hits = sum(r.caught() for r in chosen)
            print(f"\nbad batches whose loss was {label} the clean batch's at the same weights ({note}): "
                  f"{hits}/{len(chosen)} caught by loss_spike", end="")  # fmt: skip
        print()
        for label, extra in (("the seeds' own draws (onset 45–70)", False), ("the extra bad-batch draws", True)):
            chosen = [r for r in spiked if r.visible and r.run.extra == extra]
            if chosen:
                print(f"- of those ≥ {VISIBLE}×, {label}: {sum(r.caught() for r in chosen)}/{len(chosen)}")
    pairs = [r for r in by_detector.get("replica_mismatch", []) if r.run.world_size == 2 and r.caught()]
    if pairs:  # two replicas whose checksums differ: no majority says which one changed, so both are named
        both = sum(1 for r in pairs if sorted((r.first("replica_mismatch") or {}).get("ranks") or []) == [0, 1])
        print(
            f"\nreplica_mismatch with two replicas (no majority: the rule names both): {both}/{len(pairs)} named "
            f"both ranks; their top-1 localisation counts rank 0, named first, as wrong"
        )
    loud = [(r, r.loud()) for r in healthy]
    noisy = [(r, alerts) for r, alerts in loud if alerts]
    warned = sum(1 for _, alerts in noisy)
    print(f"\nhealthy runs with a warning or critical alert: {warned}/{len(healthy)}")
    for r, alerts in noisy:
        shown = ", ".join(f"{a['detector']}/{a['severity']}@{a['step']}" for a in alerts)
        print(f"- seed {r.run.seed} {r.run.name}: {shown}")
    stray = [
        (r, [a for a in r.loud((*ALLOW.get(r.run.fault, ()), str(r.run.expect))) if a["severity"] == "critical"])
        for r in faulty
    ]
    stray = [(r, alerts) for r, alerts in stray if alerts]
    print(f"\nfault runs with an unrelated critical alert: {len(stray)}/{len(faulty)}")
    for r, alerts in stray:
        print(f"- seed {r.run.seed} {r.run.name}: " + ", ".join(f"{a['detector']}@{a['step']}" for a in alerts))
