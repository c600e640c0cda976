#!/usr/bin/env python3
"""Alert latency: seconds from the faulty training step to Alertmanager's webhook, via the direct push.

The real path, end to end, on loopback: a real training run (gradwatch.demo.DemoTraining, CPU) with
the agent attached streams to `gradwatch serve --alertmanager-url ...` in its own process; the server
pushes to Debian's real prometheus-alertmanager, which routes with deploy/alertmanager/alertmanager.yml
(critical → pager, group_wait 0s) to a webhook receiver in this process. Each trial is a fresh run:
healthy steps, then a NaN injected at one step while training goes on at full speed. The clock starts
just before the faulty step and stops when the webhook POST carrying that run's page arrives.
Prints every sample, the median, p90, p99 and max. Target: p99 ≤ 1 s.

    python bench/alert_latency.py [--trials 50] [--warmup-steps 30]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
import uuid

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # shared process helpers

import gradwatch
from gradwatch.demo import DemoTraining
from paging_support import WebhookReceiver, alertmanager, gradwatch_serve, routing_config

PAGE_TIMEOUT_S = 15.0


def trial(target: str, receiver: WebhookReceiver, seed: int, warmup_steps: int) -> float:
    """One run with a NaN after `warmup_steps` healthy steps; seconds from the faulty step to the page."""
    run = f"latency-{seed}-{uuid.uuid4().hex[:6]}"
    training = DemoTraining(seed=seed)
    with gradwatch.attach(training.model, training.optimizer, run=run, server=target) as monitor:
        for _ in range(warmup_steps):
            monitor.step(training.step())
        faulty_at = time.time()
        monitor.step(training.step("nan"))
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while True:
            page = receiver.wait_alert(lambda d, a: a["labels"].get("run") == run and a["status"] == "firing", 0)
            if page is not None:
                return page[0].received_at - faulty_at
            if time.monotonic() > deadline:
                raise RuntimeError(f"no page for {run} within {PAGE_TIMEOUT_S}s")
            monitor.step(training.step())  # the run goes on while the page travels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    samples: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, WebhookReceiver() as receiver, \
            alertmanager(routing_config(receiver.url), pathlib.Path(tmp)) as am_url, \
            gradwatch_serve(pathlib.Path(tmp), "--alertmanager-url", am_url) as target:
        for seed in range(args.trials):
            samples.append(trial(target, receiver, seed, args.warmup_steps))
    ms = np.array(samples) * 1000
    print("samples (ms):", " ".join(f"{v:.0f}" for v in ms))
    print(
        f"faulty step -> Alertmanager webhook, direct push, {len(samples)} runs: "
        f"median {statistics.median(samples):.3f} s, p90 {np.percentile(samples, 90):.3f} s, "
        f"p99 {np.percentile(samples, 99):.3f} s, max {max(samples):.3f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
