#!/usr/bin/env python3
"""Detection quality: recall per detector, false alerts on healthy runs, steps from fault onset to alert.

Runs every scenario of `gradwatch.scenarios.catalogue` (the same definitions the tests in tests/scenarios use)
with several seeds, each a real tiny CPU training run streaming through the real agent to a real embedded
server with every registered detector at its defaults. For each fault scenario it records whether the
expected detector fired at or after the onset (recall), after how many steps (0: the faulty step itself), and
any critical alert from a detector the scenario does not allow. For each healthy run it counts warning and
critical alerts (false alerts; info alerts are listed apart). Prints Markdown tables.

Targets (issue 4): every fault caught by the right detector, zero warnings or criticals on healthy runs,
non_finite within the same step, exploding_gradient within two reports.

    python bench/detection_quality.py [--seeds 3] [--only NAME ...]

With `--matrix N` it runs the generated scenario matrix instead (gradwatch.scenarios.matrix: seeds
`--start` .. `--start + N - 1`, world sizes capped at `--max-world`) and reports per detector: recall (the
expected detector fired at or after the onset), top-1 localisation (the right rank first, the right layer or
module), onset → alert in steps and in seconds (the alert's server time minus the onset step's wall time on the
faulty rank), and warning/critical alerts on healthy runs (a detector the server's inhibition would silence is
not counted). Targets (issue 16): recall ≥ 95 % per detector, false alerts on ≤ 1 % of healthy runs,
localisation ≥ 95 %.

    python bench/detection_quality.py --matrix 300 [--start 0] [--max-world 4] [--record runs.jsonl]
    python bench/detection_quality.py --report runs.jsonl [more.jsonl ...]   # the tables of recorded runs

`--record` appends each run as it ends, so the matrix can run in chunks (on a shared machine) and be reported
whole with `--report`. `--extra-bad-batch` runs each seed's extra bad-batch draw instead of its own run (the seed's
model, optimizer, batch and world size, a bad batch at a late onset; gradwatch.scenarios.matrix's docstring): the
stream that gives loss_spike's recall enough visible bad batches to be measured.

    python bench/detection_quality.py --matrix 120 --start 8000 --extra-bad-batch --record extra.jsonl
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import torch

from gradwatch.scenarios.base import Scenario, run_scenario
from gradwatch.scenarios.catalogue import SCENARIOS
from gradwatch.scenarios.harness import RunResult


def _fmt_steps(values: list[int]) -> str:
    if not values:
        return "–"
    if len(set(values)) == 1:
        return str(values[0])
    return f"{statistics.median(values):g} (min {min(values)}, max {max(values)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per scenario (default 3)")
    parser.add_argument("--only", nargs="*", default=None, help="scenario names to run (default: all)")
    parser.add_argument("--matrix", type=int, default=0, help="run this many generated matrix runs instead")
    parser.add_argument("--start", type=int, default=0, help="first matrix seed (default 0)")
    parser.add_argument("--max-world", type=int, default=4, help="largest world size of matrix runs (default 4)")
    parser.add_argument(
        "--extra-bad-batch",
        action="store_true",
        help="matrix: run each seed's extra bad-batch draw (a late onset) instead of its own run",
    )
    parser.add_argument("--record", default=None, help="append each matrix run to this file as a JSON line")
    parser.add_argument("--report", nargs="*", default=None, help="report matrix runs recorded with --record")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - {s.name for s in SCENARIOS})
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(s.name for s in SCENARIOS)}")
    torch.set_num_threads(1)
    if args.report:
        from matrix_report import report_recorded

        return report_recorded(args.report)
    if args.matrix:
        from matrix_report import report_matrix

        return report_matrix(
            range(args.start, args.start + args.matrix),
            args.max_world,
            args.record,
            extra_bad_batch=args.extra_bad_batch,
        )
    chosen: list[Scenario] = [s for s in SCENARIOS if args.only is None or s.name in args.only]
    results: dict[str, list[RunResult]] = {}
    started = time.perf_counter()
    for sc in chosen:
        results[sc.name] = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            result = run_scenario(sc, seed)
            results[sc.name].append(result)
            print(
                f"  {sc.name} seed {seed}: {len(result.alerts)} alerts, {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
            )
    elapsed = time.perf_counter() - started

    faults = [s for s in chosen if not s.healthy]
    healthy = [s for s in chosen if s.healthy]
    print(f"\n{len(chosen)} scenarios × {args.seeds} seeds in {elapsed:.0f} s (torch {torch.__version__}, 1 thread)\n")
    if faults:
        print(
            "| scenario | expected detector | caught | steps onset → alert | other alerts (fired in ≥ 1 seed) "
            "| unexpected criticals |"
        )
        print("|---|---|---|---|---|---|")
        by_detector: dict[str, list[bool]] = collections.defaultdict(list)
        delays_by_detector: dict[str, list[int]] = collections.defaultdict(list)
        for sc in faults:
            assert sc.expect is not None
            runs = results[sc.name]
            delays = [d for r in runs if (d := r.steps_to_alert(sc.expect)) is not None]
            caught = [r.steps_to_alert(sc.expect) is not None for r in runs]
            by_detector[sc.expect] += caught
            delays_by_detector[sc.expect] += delays
            others = sorted({a.detector for r in runs for a in r.alerts} - {sc.expect})
            stray = sorted(
                {a.detector for r in runs for a in r.unexpected(("critical",), allow=(sc.expect, *sc.allow))}
            )
            errors = [e for r in runs for e in r.detector_errors]
            note = f" (detector errors: {len(errors)})" if errors else ""
            print(
                f"| {sc.name} | {sc.expect} | {sum(caught)}/{len(caught)} | {_fmt_steps(delays)} | "
                f"{', '.join(others) or '–'} | {', '.join(stray) or 'none'}{note} |"
            )
        print("\n| detector | recall | steps onset → alert |")
        print("|---|---|---|")
        for detector in sorted(by_detector):
            hits = by_detector[detector]
            print(f"| {detector} | {sum(hits)}/{len(hits)} | {_fmt_steps(delays_by_detector[detector])} |")
    if healthy:
        print("\n| healthy run | warnings + criticals | info |")
        print("|---|---|---|")
        total = 0
        for sc in healthy:
            runs = results[sc.name]
            loud = [a for r in runs for a in r.alerts if a.severity in ("warning", "critical")]
            info = [a for r in runs for a in r.alerts if a.severity == "info"]
            total += len(loud)
            loud_text = ", ".join(f"{a.detector}@{a.step}" for a in loud) or "0"
            info_text = ", ".join(sorted({a.detector for a in info})) or "0"
            print(f"| {sc.name}: {sc.description} | {loud_text} | {info_text} |")
        print(f"\nfalse alerts (warning or critical) on {len(healthy) * args.seeds} healthy runs: {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
