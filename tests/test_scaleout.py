"""Scale-out: two real server replicas on port 0, real agents choosing a replica per run by rendezvous hashing.

Every rank of a run reaches the same replica, both replicas get runs, the totals add up across replicas, each
run's series come from exactly one scrape, and an alert fires on the replica that owns the faulty run only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402
from agent_support import make_mlp, train, wait_until  # noqa: E402
from gradwatch.routing import rendezvous_order  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402
from server_support import sample, scrape  # noqa: E402

RANKS = 2
STEPS = 6
RUNS_PER_REPLICA = 2
FAULTY_STEP = 4


@pytest.fixture
def replicas() -> Iterator[list[ServerApp]]:
    apps = [ServerApp(ServerConfig.local()).start() for _ in range(2)]
    yield apps
    for app in apps:
        app.stop(grace=0)


def _runs_for(targets: list[str]) -> dict[str, str]:
    """Run ids -> the replica rendezvous hashing gives them: the first RUNS_PER_REPLICA ids for each replica
    (the ports are random, so the ids are chosen here, with the agent's own function)."""
    chosen: dict[str, str] = {}
    for i in itertools.count():
        run = f"job-{i}"
        owner = rendezvous_order(run, targets)[0]
        if sum(1 for o in chosen.values() if o == owner) < RUNS_PER_REPLICA:
            chosen[run] = owner
        if len(chosen) == RUNS_PER_REPLICA * len(targets):
            return chosen


def _train_rank(servers: str, run: str, rank: int, nan_at: int | None) -> dict[str, Any]:
    model = make_mlp(seed=rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(
        model, optimizer, run=run, job_name="scaleout", servers=servers, rank=rank, world_size=RANKS
    )
    train(model, optimizer, monitor, STEPS, nan_at=nan_at)
    assert monitor.close(timeout=10.0), monitor.counters()
    return monitor.counters()


def test_scaleout_each_run_lands_wholly_on_its_replica(replicas: list[ServerApp]) -> None:
    targets = [app.grpc_target for app in replicas]
    owners = _runs_for(targets)
    faulty = next(iter(owners))  # one run gets a NaN: its replica, and only it, must alert
    servers = ",".join(reversed(targets))  # the order of the list does not matter

    for run in owners:
        for rank in range(RANKS):
            _train_rank(servers, run, rank, FAULTY_STEP if run == faulty else None)

    by_target = {app.grpc_target: app for app in replicas}
    for app in replicas:
        held = {r["run"]: r for r in app.runs()}
        expected = {run for run, owner in owners.items() if owner == app.grpc_target}
        assert set(held) == expected  # both replicas hold runs, and only their own
        for run in held.values():
            assert [r["rank"] for r in run["ranks"]] == list(range(RANKS))  # every rank of the run is here
            assert run["step"] == STEPS

    # Totals add up: every report of every rank was applied exactly once, somewhere.
    texts = [scrape(app) for app in replicas]
    reports = [sample(text, "gradwatch_ingest_frames_total", kind="report") or 0.0 for text in texts]
    assert sum(reports) == len(owners) * RANKS * STEPS
    assert all(n == RUNS_PER_REPLICA * RANKS * STEPS for n in reports)
    assert sum(sample(text, "gradwatch_runs_tracked") or 0.0 for text in texts) == len(owners)
    for run in owners:
        labels = {"run": run, "job_name": "scaleout", "world_size": str(RANKS)}
        series = [sample(text, "gradwatch_run_info", **labels) for text in texts]
        assert sorted(s is not None for s in series) == [False, True], run  # exported by exactly one replica

    # The alert fires where the faulty run lives, and nowhere else.
    owner = by_target[owners[faulty]]
    other = next(app for app in replicas if app is not owner)
    def non_finite() -> list[dict[str, object]]:
        return [a for a in owner.alerts(run=faulty, state="firing") if a["detector"] == "non_finite"]

    assert wait_until(lambda: bool(non_finite()))
    (alert,) = non_finite()  # (the NaN input batch also trips input_not_normalized, which non_finite inhibits)
    assert alert["step"] == FAULTY_STEP
    assert alert["ranks"] == list(range(RANKS))  # both ranks' reports met on this replica
    assert other.alerts() == []
    assert {a["run"] for a in owner.alerts()} == {faulty}
    assert sample(scrape(owner), "gradwatch_alert_firing", run=faulty, detector="non_finite") == 1
