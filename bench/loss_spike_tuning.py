#!/usr/bin/env python3
"""loss_spike offline on traced matrix runs: the tuning seeds' bad batches and their healthy twins.

`--trace` trains, without the agent or a server (`gradwatch.scenarios.matrix.trace`), each seed's extra
bad-batch run (`draw(seed, max_world=1, extra_bad_batch=True)`) and its healthy twin (the same run, no fault),
and appends {seed, run, effect, bad, healthy: [losses], bad_norms, healthy_norms: [gradient norms]} as JSON
lines. `--judge` feeds each trace to `LossSpikeDetector` at its defaults (and with `--set name=value` overrides)
and prints: the visible bad batches (effect ≥ VISIBLE) caught at their onset, the invisible ones caught, the
healthy twins with any firing and the bad runs firing before their onset.
This is how loss_spike's numbers are tuned on seeds apart from the held-out matrix's.

    python bench/loss_spike_tuning.py --trace 7000 7199 --out traces.jsonl
    python bench/loss_spike_tuning.py --judge traces.jsonl [--set mad_k=8 ...]
    python bench/loss_spike_tuning.py --simulate 300 0 [--set ...]   # simulated healthy series (seeds 0-299)
    python bench/loss_spike_tuning.py --compare 8219 [--extra]   # a matrix run with and without the record
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from types import SimpleNamespace


def _fires(losses: list[float], overrides: dict[str, float]) -> list[int]:
    from gradwatch.server.detectors.base import Fire
    from gradwatch.server.detectors.loss_spike import LossSpikeConfig, LossSpikeDetector

    detector = LossSpikeDetector(LossSpikeConfig(**overrides))
    fired = []
    for step, loss in enumerate(losses, start=1):  # the detector reads a report's rank, step and loss only
        verdict = detector.observe(SimpleNamespace(run="t", rank=0, step=step, loss=loss))  # type: ignore[arg-type]
        if isinstance(verdict, Fire):
            fired.append(step)
    return fired


def trace_seeds(first: int, last: int, out: str) -> None:
    import torch

    from gradwatch.scenarios.matrix import draw, trace

    torch.set_num_threads(1)
    for seed in range(first, last + 1):
        run = draw(seed, max_world=1, extra_bad_batch=True)
        bad, bad_norms, effect = trace(run)
        twin = dataclasses.replace(run, fault="healthy", where="none", onset=None, expect=None, rank=None)
        healthy, healthy_norms, _ = trace(twin)
        with open(out, "a") as f:
            row = {"seed": seed, "run": dataclasses.asdict(run), "effect": effect, "bad": bad, "healthy": healthy,
                   "bad_norms": bad_norms, "healthy_norms": healthy_norms}  # fmt: skip
            f.write(json.dumps(row) + "\n")
        print(f"  {run.name} onset {run.onset}: effect {effect:.2f}", file=sys.stderr)


def judge(paths: list[str], overrides: dict[str, float]) -> None:
    from gradwatch.scenarios.matrix import VISIBLE

    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f]
    visible = [r for r in rows if r["effect"] >= VISIBLE]
    caught = [r for r in visible if r["run"]["onset"] in _fires(r["bad"], overrides)]
    faint = [r for r in rows if r["effect"] < VISIBLE]
    faint_caught = [r for r in faint if r["run"]["onset"] in _fires(r["bad"], overrides)]
    noisy = [(r, _fires(r["healthy"], overrides)) for r in rows]
    noisy = [(r, f) for r, f in noisy if f]
    early = [(r, f) for r in rows if (f := [s for s in _fires(r["bad"], overrides) if s < r["run"]["onset"]])]
    print(f"settings {overrides or 'defaults'}: visible bad batches caught {len(caught)}/{len(visible)}; "
          f"faint caught {len(faint_caught)}/{len(faint)}; healthy twins firing {len(noisy)}/{len(rows)}; "
          f"bad runs firing before the onset {len(early)}/{len(rows)}")  # fmt: skip
    for r in visible:
        if r not in caught:
            run = r["run"]
            print(f"  missed {run['seed']} {run['family']} batch {run['batch']} onset {run['onset']}: "
                  f"effect {r['effect']:.2f}")  # fmt: skip
    for r, fired in noisy:
        print(f"  healthy twin of {r['seed']} ({r['run']['family']}, batch {r['run']['batch']}) fired at {fired}")


def simulate(count: int, first: int, overrides: dict[str, float]) -> None:
    """Healthy simulated series of 1,500 steps (the class of tests/test_loss_spike_tail.py): a loss decaying from
    floor + amplitude to floor with a time constant of 20-2,000 steps, under lognormal noise up to 0.3 or as the
    mean of 16-64 gamma per-sample losses of shape 0.5-4. Prints how many fired at all."""
    import numpy as np

    noisy = []
    for seed in range(first, first + count):
        rng = np.random.default_rng(seed)
        n = 1500
        tau = float(np.exp(rng.uniform(np.log(20), np.log(2000))))
        trend = rng.uniform(0.01, 1.0) + rng.uniform(0.0, 3.0) * np.exp(-np.arange(n) / tau)
        if rng.random() < 0.5:
            losses = trend * rng.lognormal(0.0, rng.uniform(0.02, 0.3), n)
        else:
            batch, shape = int(rng.integers(16, 65)), rng.uniform(0.5, 4.0)
            losses = trend * rng.gamma(shape, 1.0 / shape, (n, batch)).mean(axis=1)
        if fired := _fires([float(v) for v in losses], overrides):
            noisy.append((seed, fired[0]))
    print(f"settings {overrides or 'defaults'}: simulated healthy series firing {len(noisy)}/{count} {noisy}")


def compare(seeds: list[int], extra: bool) -> None:
    """Each seed's matrix run (its extra bad-batch draw with `extra`), through the agent and a real server, once
    with loss_spike's record of excesses on (tail_k=3) and once at the defaults (off): the warning and critical
    alerts of each."""
    import torch

    from gradwatch.scenarios.matrix import draw, run_matrix
    from gradwatch.server.config import ServerConfig
    from gradwatch.server.detectors.loss_spike import LossSpikeConfig

    torch.set_num_threads(1)
    base = ServerConfig.local()
    with_tail = dataclasses.replace(base, detectors={**base.detectors, "loss_spike": LossSpikeConfig(tail_k=3.0)})
    for seed in seeds:
        run = draw(seed, max_world=4, extra_bad_batch=extra)
        for label, config in (("tail_k=3", with_tail), ("defaults", base)):
            alerts = [a for a in run_matrix(run, config).alerts if a["severity"] != "info"]
            shown = "; ".join(f"{a['detector']}/{a['severity']}@{a['step']}: {a['summary']}" for a in alerts)
            print(f"{run.name} {label}: {shown or 'no warning or critical'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs=2, type=int, metavar=("FIRST", "LAST"), help="trace these seeds")
    parser.add_argument("--out", default="loss_spike_traces.jsonl", help="append traces here")
    parser.add_argument("--judge", nargs="*", default=None, help="judge recorded traces")
    parser.add_argument("--simulate", nargs=2, type=int, metavar=("COUNT", "FIRST"), help="simulated series")
    parser.add_argument("--compare", nargs="*", type=int, default=None, help="seeds: run with and without tail_k")
    parser.add_argument("--extra", action="store_true", help="--compare the seeds' extra bad-batch draws")
    parser.add_argument("--set", nargs="*", default=[], help="LossSpikeConfig overrides, name=value")
    args = parser.parse_args(argv)
    if args.trace:
        trace_seeds(args.trace[0], args.trace[1], args.out)
    overrides = {k: float(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.judge:
        judge(args.judge, overrides)
    if args.simulate:
        simulate(args.simulate[0], args.simulate[1], overrides)
    if args.compare:
        compare(args.compare, args.extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
