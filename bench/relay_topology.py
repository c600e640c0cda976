#!/usr/bin/env python3
"""Two tiers under load: bench/loadgen.py's simulated ranks over N relays in front of one aggregator.

Every process is real: Debian's prometheus-alertmanager (routed with deploy/alertmanager/alertmanager.yml to a
webhook receiver here), one aggregator (`gradwatch serve --alertmanager-url`) and `--relays` relays
(`gradwatch serve --upstream <aggregator>`); rank k of every simulated run talks to relay k·N/world (a pod's
ranks share its sidecar). Measured per tier over the sending window (warm-up excluded): CPU per report
(utime + stime from /proc, all relays together and the aggregator), RSS; end to end: acknowledged-but-lost
reports (acknowledged by a relay, not applied at the aggregator once the relays drained: must be 0), the NaN ->
Alertmanager webhook latency (the clock starts when the NaN frame is written to the relay), relay drops, and
the detectors firing at the aggregator besides non_finite. Prints one JSON document and a summary on stderr.

    python bench/relay_topology.py --relays 4 --runs 8 --world-size 64 --steps-per-s 1 --layers 200 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

from loadgen import (
    Load,
    _applied_reports,
    _get,
    _percentiles,
    detector_config,
    named_ranks,
    offered_rate,
    only_expected,
    parse_args,
    process_usage,
)

from paging_support import WebhookReceiver, alertmanager, gradwatch_process, routing_config

DRAIN_S = 120.0


def _relay_state(http_url: str) -> dict[str, Any]:
    return json.loads(_get(http_url + "/api/v1/relays"))["upstream"]


def measure(args: argparse.Namespace, relays: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        tmp = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
        receiver = stack.enter_context(WebhookReceiver())
        am_url = stack.enter_context(alertmanager(routing_config(receiver.url), tmp / "am"))
        (tmp / "agg").mkdir()
        agg = stack.enter_context(gradwatch_process(tmp / "agg", "--alertmanager-url", am_url, *args.serve_arg,
                                                    *detector_config(args, tmp)))  # fmt: skip
        tier = []
        for n in range(relays):
            (tmp / f"relay-{n}").mkdir()
            tier.append(stack.enter_context(gradwatch_process(tmp / f"relay-{n}", "--upstream", agg.target)))
        load = Load(args, ",".join(r.target for r in tier))
        pids = {"aggregator": [agg.pid], "relays": [r.pid for r in tier]}
        started = time.time() + 1.0
        window: dict[str, Any] = {}

        def cpu() -> dict[str, float]:
            return {name: sum(process_usage(p)["cpu_s"] for p in group) for name, group in pids.items()}

        def mark() -> None:  # CPU over the sending window only (start-up and drain excluded)
            for at, end in ((args.warmup_s, "0"), (args.duration, "1")):
                time.sleep(max(0.0, started + at - time.time()))
                window.update({f"cpu{end}": cpu(), f"t{end}": time.time(),
                               f"acked{end}": sum(r.acked for r in load.ranks)})  # fmt: skip

        marker = threading.Thread(target=mark, daemon=True)
        marker.start()
        asyncio.run(load.run(started))
        marker.join()
        deadline = time.monotonic() + DRAIN_S
        while any(_relay_state(r.http_url)["buffered"] for r in tier) and time.monotonic() < deadline:
            time.sleep(0.5)
        states = [_relay_state(r.http_url) for r in tier]
        pages: dict[str, float] = {}
        page_deadline = time.monotonic() + args.page_timeout_s
        for run, sent_at in load.nan_sent.items():
            hit = receiver.wait_alert(lambda d, a, run=run: a["status"] == "firing" and a["labels"].get("run") == run
                                      and a["labels"].get("detector") == "non_finite",
                                      max(0.0, page_deadline - time.monotonic()))  # fmt: skip
            if hit is not None:
                pages[run] = hit[0].received_at - sent_at
        firing = json.loads(_get(agg.http_url + "/api/v1/alerts?state=firing"))["alerts"]
        applied = _applied_reports(agg.http_url)
        rss = {name: sum(process_usage(p)["rss_mb"] for p in group) for name, group in pids.items()}
    sent = sum(r.sent for r in load.ranks)
    acked = sum(r.acked for r in load.ranks)
    lost = sum(max(0, r.acked - applied.get((r.run, r.rank), 0)) for r in load.ranks)
    window_s = window["t1"] - window["t0"]
    reports = window["acked1"] - window["acked0"]
    offered = offered_rate(load, args)
    per_report = {name: (window["cpu1"][name] - window["cpu0"][name]) / max(1, reports) * 1e6 for name in pids}
    return {
        "config": {**{k: v for k, v in vars(args).items() if k != "serve_arg"}, "relays": relays},
        "ranks": len(load.ranks), "offered_reports_per_s": offered, "sent": sent, "acked": acked,
        "acked_but_lost": lost, "errors": sorted({r.error for r in load.ranks if r.error})[:5],
        "acked_reports_per_s": reports / window_s,
        "sustained": reports / window_s >= 0.97 * offered and acked == sent,
        "ack_lag_s": _percentiles([lag for r in load.ranks for lag in r.ack_lags]),
        "cpu_us_per_report": per_report,
        "cpu_share": {name: (window["cpu1"][name] - window["cpu0"][name]) / window_s for name in pids},
        "rss_mb": rss,
        "relay_dropped": [s["dropped"] for s in states], "relay_buffered_at_end": [s["buffered"] for s in states],
        "nan_injected": len(load.nan_sent), "nan_paged": len(pages),
        "nan_to_alertmanager_s": _percentiles(list(pages.values())),
        "other_detectors_firing": sorted({a["detector"] for a in firing if a["detector"] != "non_finite"}),
        "named": named_ranks(firing), "only_slow_and_silent_named": only_expected(args, named_ranks(firing)),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    relays = 4
    if "--relays" in argv:
        at = argv.index("--relays")
        relays = int(argv[at + 1])
        del argv[at : at + 2]
    args = parse_args(argv)
    result = measure(args, relays)
    print(json.dumps(result, indent=1))
    cost, page = result["cpu_us_per_report"], result["nan_to_alertmanager_s"]
    held = "sustained" if result["sustained"] else "NOT sustained"
    print(f"{result['ranks']} ranks over {relays} relays, {args.layers} layers: {result['acked_reports_per_s']:.0f} of "
          f"{result['offered_reports_per_s']:.0f} reports/s acked ({held}); "
          f"CPU/report: relays {cost['relays']:.0f} us, aggregator {cost['aggregator']:.0f} us; "
          f"NaN->Alertmanager p99 {page['p99']} s over {page['n']}; acked but lost {result['acked_but_lost']}",
          file=sys.stderr)  # fmt: skip
    return 0 if result["acked_but_lost"] == 0 and not result["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
