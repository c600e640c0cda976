"""Two tiers as real processes: 3 relays (`gradwatch serve --upstream`) and 1 aggregator (`gradwatch serve`), a real
multi-process gloo job (spawn) whose ranks connect to different relays. Each cross-rank fault of
tests/test_e2e_cluster.py, and a NaN on one rank, must raise the same detectors naming the same ranks as the same job
on one server (run side by side in the same test), and the incidents must be reachable from the aggregator.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as mp  # noqa: E402
from test_e2e_cluster import HOST, _worker  # noqa: E402

from paging_support import released_port  # noqa: E402
from relay_support import Serve  # noqa: E402
from wait_support import wait_until  # noqa: E402

SETTLE_S = 30.0


def _settled(server: Serve, run: str, relays: list[Serve]) -> list[dict[str, Any]]:
    """The run's alerts once the run is finished on `server` and every relay has delivered all it holds."""

    def finished() -> bool:
        runs = {r["run"]: r for r in server.get("/api/v1/runs")["runs"]}
        delivered = all(r.get("/api/v1/relays")["upstream"]["buffered"] == 0 for r in relays)
        return run in runs and runs[run]["state"] == "finished" and delivered

    def state() -> str:
        buffered = [r.get("/api/v1/relays")["upstream"]["buffered"] for r in relays]
        return f"runs {server.get('/api/v1/runs')['runs']}, frames buffered at the relays {buffered}"

    wait_until(finished, SETTLE_S, what=f"run {run!r} to finish on {server.http_url}", interval=0.2, detail=state)
    ticks = server.ticks()
    wait_until(lambda: server.ticks() >= ticks + 2, SETTLE_S, what=f"two more detector ticks on {server.http_url}")
    return server.get(f"/api/v1/alerts?run={run}")["alerts"]


def _job(scenario: str, world_size: int, steps: int, targets: list[str], tmp: Path) -> None:
    args = (world_size, released_port(), ",".join(targets), scenario, steps, str(tmp / "release"))
    mp.spawn(_worker, args=args, nprocs=world_size, join=True)


def _named(alerts: list[dict[str, Any]]) -> dict[str, list[int]]:
    return {a["detector"]: a["ranks"] for a in alerts}


@pytest.fixture
def tiers(tmp_path: Path) -> Any:
    """One plain server (the baseline), and an aggregator with three relays."""
    started: list[Serve] = []
    try:
        single = Serve(tmp_path, "single")
        started.append(single)
        aggregator = Serve(tmp_path, "aggregator")
        started.append(aggregator)
        relays = []
        for n in range(3):
            relays.append(Serve(tmp_path, f"relay-{n}", "--upstream", aggregator.grpc_target))
            started.append(relays[-1])
        yield single, aggregator, relays
    finally:
        codes = [server.stop() for server in started]
        assert codes == [0] * len(started), codes  # every process stopped cleanly on SIGTERM


@pytest.mark.timeout(600)
def test_relay_cluster_cross_rank_faults_and_a_nan_fire_as_on_one_server(tiers: Any, tmp_path: Path) -> None:
    single, aggregator, relays = tiers
    relay_targets = [r.grpc_target for r in relays]

    # Three faults on three ranks, each rank on its own relay (rank r -> relay r).
    _job("faults", 3, 20, [single.grpc_target], tmp_path)
    _job("faults", 3, 20, relay_targets, tmp_path)
    one = _settled(single, "faults", [])
    two = _settled(aggregator, "faults", relays)
    assert _named(one) == {"rank_divergence": [2], "replica_mismatch": [1], "straggler": [0]}, one
    assert _named(two) == _named(one), two
    by_detector = {a["detector"]: a for a in two}
    assert f"rank 2 ({HOST})" in by_detector["rank_divergence"]["summary"]
    assert by_detector["replica_mismatch"]["step"] == 6
    assert "replica group of 3 ranks led by rank 0" in by_detector["replica_mismatch"]["summary"]
    assert f"rank 0 ({HOST}) is a straggler" in by_detector["straggler"]["summary"]
    # The relays ran no cross-rank detector, and none of the ranks is still held by a relay.
    assert all(r.get("/api/v1/alerts?run=faults")["alerts"] == [] for r in relays)
    held = aggregator.get("/api/v1/relays")["relays"]
    assert len(held) == 3 and all(r["runs"] == {} for r in held), held

    # A NaN on rank 1 (DDP spreads it to every rank's gradients): the origin is named the same way.
    _job("nan", 3, 12, [single.grpc_target], tmp_path)
    _job("nan", 3, 12, relay_targets, tmp_path)
    one = _settled(single, "nan", [])
    two = _settled(aggregator, "nan", relays)
    assert "non_finite" in _named(one), one
    assert _named(two) == _named(one), two
    nan_one = next(a for a in one if a["detector"] == "non_finite")
    nan_two = next(a for a in two if a["detector"] == "non_finite")
    assert nan_two["step"] == nan_one["step"] == 8 and nan_two["summary"] == nan_one["summary"], (nan_one, nan_two)

    # Incidents are reachable from the aggregator: the CLI lists and shows them, and writes the HTML report.
    cli = [sys.executable, "-m", "gradwatch.cli"]
    listed = json.loads(
        subprocess.run(
            [*cli, "incidents", "--server", aggregator.http_url, "--json"], check=True, capture_output=True, text=True
        ).stdout
    )
    incidents = listed["incidents"] if isinstance(listed, dict) else listed
    detectors = {i["detector"] for i in incidents}
    assert {"replica_mismatch", "rank_divergence", "non_finite"} <= detectors, incidents
    mismatch = next(i for i in incidents if i["detector"] == "replica_mismatch")
    shown = subprocess.run(
        [*cli, "incidents", "show", mismatch["id"], "--server", aggregator.http_url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "replica_mismatch" in shown and "faults" in shown
    page = tmp_path / "incident.html"
    subprocess.run([*cli, "report", mismatch["id"], "--server", aggregator.http_url, "-o", str(page)], check=True)
    assert "replica_mismatch" in page.read_text()
