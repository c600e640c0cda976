#!/usr/bin/env python3
"""Hang detection time: seconds from a rank hanging to Alertmanager's webhook, against the 600 s watchdog.

The real path, end to end, on loopback, at default settings: a 3-rank DDP job (torch.multiprocessing.spawn +
gloo, the job of tests/test_e2e_hang.py) with the agent attached streams to `gradwatch serve --alertmanager-url
...` in its own process; the server pushes to Debian's real prometheus-alertmanager, which routes with
deploy/alertmanager/alertmanager.yml (critical → pager, group_wait 0s) to a webhook receiver in this process.
In each trial rank 1 blocks in Python before its backward at step 6 (the other ranks wait for it in DDP's
all-reduce); it writes the wall time at which it blocked, and the clock stops when the webhook POST carrying
GradwatchCollectiveHang for that run arrives. Then the rank is released and the job finishes. Prints every
sample, the median, min and max, and the ranks the page named. PyTorch's default collective timeout (NCCL's
watchdog) is 600 s: a hang without gradwatch is noticed then, and the logs do not say which rank.

    python bench/hang_latency.py [--trials 5]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import uuid

import torch.multiprocessing as mp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # shared process helpers

from test_e2e_hang import FAULT_STEP, _worker

from paging_support import WebhookReceiver, alertmanager, gradwatch_serve, released_port, routing_config

WATCHDOG_S = 600.0
PAGE_TIMEOUT_S = 120.0


def trial(target: str, receiver: WebhookReceiver, workdir: pathlib.Path) -> tuple[float, str]:
    """One job whose rank 1 hangs; (seconds from the hang to the page, the page's ranks label)."""
    run = f"blocked#{uuid.uuid4().hex[:8]}"  # the test's hang before the backward, in a run of its own
    release = workdir / run
    args = (3, released_port(), target, run, FAULT_STEP + 4, str(release))
    context = mp.spawn(_worker, args=args, nprocs=3, join=False)
    try:
        page = receiver.wait_alert(
            lambda d, a: (
                a["labels"].get("run") == run
                and a["labels"].get("alertname") == "GradwatchCollectiveHang"
                and a["status"] == "firing"
            ),
            PAGE_TIMEOUT_S,
        )
        if page is None:
            raise RuntimeError(f"no page for {run} within {PAGE_TIMEOUT_S}s")
        hung_at = float(pathlib.Path(f"{release}.at").read_text())
        return page[0].received_at - hung_at, page[1]["annotations"].get("ranks", "?")
    finally:
        release.touch()
        context.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args(argv)
    samples: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, WebhookReceiver() as receiver, \
            alertmanager(routing_config(receiver.url), pathlib.Path(tmp)) as am_url, \
            gradwatch_serve(pathlib.Path(tmp), "--alertmanager-url", am_url) as target:  # fmt: skip
        for _ in range(args.trials):
            seconds, ranks = trial(target, receiver, pathlib.Path(tmp))
            samples.append(seconds)
            print(f"hang -> page {seconds:.1f} s (ranks {ranks})", flush=True)
    print(
        f"hang -> Alertmanager webhook (GradwatchCollectiveHang), default settings, {len(samples)} jobs: median "
        f"{statistics.median(samples):.1f} s, min {min(samples):.1f} s, max {max(samples):.1f} s; "
        f"the default collective watchdog: {WATCHDOG_S:.0f} s ({WATCHDOG_S / statistics.median(samples):.0f}x later)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
