"""What a restarted server answers from its database: every rank of a wide run, every rank's recent series and the
run-state gauges of /metrics, as before the restart; a rank that comes back continues its series, and a run whose
agents came back is saved as it is now (the ranks that did not come back are not listed after the next restart).

Real servers (ServerApp on port 0 over one data directory), real gRPC Flush calls as agents make them. The
subprocess test beside this one (test_server_restart.py) restarts `gradwatch serve` with SIGTERM and SIGKILL.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from test_recorder import wait_until

from gradwatch.server.app import ServerApp
from gradwatch.server.config import StorageConfig
from gradwatch.server.database import DB_FILE
from gradwatch.server.views import RANKS_IN_VIEW
from hardening_support import flush_outcome
from server_support import AgentStream, columns, get_json, hello, hello_frame, http_get, report_frame, server_config

LAYERS = 3
#: Gauges that legitimately read differently after a restart: no agent is connected to the new process.
LIVE_GAUGES = frozenset({"gradwatch_run_ranks_connected"})


@contextmanager
def served(data: pathlib.Path, ring_length: int = 32) -> Iterator[ServerApp]:
    config = dataclasses.replace(server_config(ring_length=ring_length), storage=StorageConfig(data_dir=str(data)))
    app = ServerApp(config).start()
    try:
        yield app
    finally:
        app.stop(grace=0)


def feed(target: str, run: str, ranks: range, world_size: int, reports: range, session: str = "s-1") -> None:
    """Each rank flushes `reports` (loss, gradient norms, layer columns and global share vary by rank and step, evenly
    across ranks, so no rank diverges;
    rank 1's loss turns NaN at step 7)."""
    for rank in ranks:
        frames = [
            report_frame(
                seq,
                loss=float("nan") if (rank == 1 and seq >= 7) else 1.0 / seq + rank / 1000,
                grad_norm=0.5 + rank + seq / 8,
                grad_global_share=(rank + 1) * seq / 64,
                layers=columns(
                    LAYERS,
                    grad_norm=[rank + seq, seq / 2, rank / 3],
                    weight_norm=seq + 0.25,
                    update_ratio=[1e-3 * seq, float("nan"), 2e-3],
                ),
            )
            for seq in reports
        ]
        outcome = flush_outcome(target, hello(run=run, rank=rank, world_size=world_size, layers=LAYERS,
                                                       session=session), frames)  # fmt: skip
        assert outcome[0] == grpc.StatusCode.OK, outcome


def saved(data: pathlib.Path, run: str) -> tuple[int, int]:
    """(rank rows, reports saved over the run's ranks) in the database beside the running server."""
    with closing(sqlite3.connect(f"file:{data / DB_FILE}?mode=ro", uri=True)) as conn:
        ranks = conn.execute("SELECT COUNT(*) FROM ranks WHERE run_id = ?", (run,)).fetchone()[0]
        stops = conn.execute("SELECT COALESCE(SUM(s), 0) FROM (SELECT MAX(stop) AS s FROM series WHERE run_id = ? "
                             "GROUP BY rank)", (run,)).fetchone()[0]  # fmt: skip
    return int(ranks), int(stops)


def pages(url: str, path: str, key: str, limit: int) -> list[Any]:
    """Every item of a paginated answer, following next_offset."""
    items: list[Any] = []
    offset: int | None = 0
    while offset is not None:
        page = get_json(f"{url}/api/v1/{path}{'&' if '?' in path else '?'}limit={limit}&offset={offset}")
        items += page[key]
        offset = page["next_offset"]
    return items


def state(app: ServerApp, run: str) -> dict[str, Any]:
    """What a restart must keep of `run`: its view, every rank page, every series page, its run-state gauges."""
    url = app.http_url
    view = get_json(f"{url}/api/v1/runs/{run}")["run"]
    return {
        "view": _strip(view),
        "ranks": _strip(pages(url, f"runs/{run}/ranks", "ranks", 7)),
        "series": pages(url, f"runs/{run}/series?last=1000000", "ranks", 9),
        "series_default": get_json(f"{url}/api/v1/runs/{run}/series"),
        "gauges": run_gauges(http_get(url + "/metrics")[2].decode(), run),
    }


def run_gauges(text: str, run: str) -> list[tuple[str, tuple[tuple[str, str], ...], str]]:
    """Every gauge sample of `run` (name, labels, value as text so NaN equals NaN). Counters are left out:
    a restarted process starts them at 0 (Prometheus' rate() and increase() expect that)."""
    return sorted(
        (s.name, tuple(sorted(s.labels.items())), repr(float(s.value)))
        for family in text_string_to_metric_families(text)
        if family.type == "gauge" and family.name not in LIVE_GAUGES
        for s in family.samples
        if s.labels.get("run") == run
    )


def _strip(value: Any) -> Any:
    """Without `restored` and a rank's `connected`: the only fields a restart may change."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("restored", "connected")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def test_restart_keeps_every_rank_series_and_gauges_of_a_wide_run(tmp_path: pathlib.Path) -> None:
    ranks, reports = RANKS_IN_VIEW + 6, range(1, 41)  # more reports than the ring holds (32)
    with served(tmp_path) as app:
        feed(app.grpc_target, "wide", range(ranks), ranks, reports)
        before = state(app, "wide")
        wait_until(lambda: saved(tmp_path, "wide") == (ranks, ranks * len(reports)), what="everything saved")
    assert len(before["view"]["ranks"]) == RANKS_IN_VIEW and before["view"]["ranks_total"] == ranks
    assert [r["rank"] for r in before["ranks"]] == list(range(ranks))
    assert [len(r["step"]) for r in before["series"]] == [32] * ranks  # the ring's length
    names = {name for name, _, _ in before["gauges"]}
    assert {"gradwatch_run_loss", "gradwatch_run_step", "gradwatch_layer_grad_norm", "gradwatch_run_grad_norm",
            "gradwatch_rank_last_report_timestamp_seconds", "gradwatch_alert_firing"} <= names  # fmt: skip
    assert ("gradwatch_run_loss", (("run", "wide"),), "nan") in before["gauges"]  # rank 1's loss is NaN
    for _ in range(2):  # restored twice: a restored server saves what it restored
        with served(tmp_path) as again:
            after = state(again, "wide")
            assert get_json(f"{again.http_url}/api/v1/runs/wide")["run"]["restored"]
        assert after == before


def test_a_rank_that_comes_back_continues_its_series_and_the_rest_are_dropped(tmp_path: pathlib.Path) -> None:
    with served(tmp_path) as app:
        feed(app.grpc_target, "back", range(3), 3, range(1, 11))
        wait_until(lambda: saved(tmp_path, "back") == (3, 30), what="saved")
    with served(tmp_path) as again:
        feed(again.grpc_target, "back", range(1), 3, range(11, 16), session="s-2")  # only rank 0 comes back
        series = get_json(f"{again.http_url}/api/v1/runs/back/series")["ranks"]
        assert [r["rank"] for r in series] == [0]
        assert series[0]["step"] == list(range(1, 16))  # before the restart, then after it
        before = state(again, "back")
        wait_until(lambda: saved(tmp_path, "back")[0] == 1, what="saved")
    with served(tmp_path) as third:
        assert state(third, "back") == before


def test_an_agent_back_after_a_restart_is_acknowledged_what_was_saved_and_never_applied_twice(
    tmp_path: pathlib.Path,
) -> None:
    """The rank's agent sessions are saved with it: the same session's Hello after a restart is welcomed with the
    highest seq saved, and frames it resends (applied, never acknowledged) are not applied again."""
    with served(tmp_path) as app:
        feed(app.grpc_target, "resend", range(1), 1, range(1, 11))
        wait_until(lambda: saved(tmp_path, "resend") == (1, 10), what="saved")
    with served(tmp_path) as again:
        stream = AgentStream(again.grpc_target)
        try:
            stream.send(hello_frame(run="resend", layers=LAYERS))
            welcome = stream.recv()
            assert welcome.WhichOneof("body") == "welcome" and welcome.welcome.acked_seq == 10
            for seq in range(5, 16):  # 5..10 again, as an agent resends what it holds unacknowledged
                stream.send(report_frame(seq))
            stream.recv_ack(15)
        finally:
            stream.close()
        (series,) = get_json(f"{again.http_url}/api/v1/runs/resend/series")["ranks"]
        assert series["step"] == list(range(1, 16))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chunks=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 20)), min_size=1, max_size=8),
    ring=st.integers(1, 40),
)
def test_series_chunks_assemble_to_the_latest_rows_whatever_their_overlap(
    chunks: list[tuple[int, int]], ring: int
) -> None:
    """Checkpoints write a rank's rows as chunks numbered by report count; overlapping or repeated chunks (a
    rank that came back and was saved whole again) assemble to the latest `ring` rows of the rank."""
    import numpy as np

    from gradwatch.server.persistence import _assemble
    from gradwatch.server.store import RING_DTYPE

    def rows(start: int, stop: int) -> bytes:
        out = np.zeros(stop - start, dtype=RING_DTYPE)
        out["step"] = np.arange(start, stop)
        return out.tobytes()

    got, count = _assemble([(s, s + n, rows(s, s + n)) for s, n in chunks], ring)
    stop = max(s + n for s, n in chunks)
    covered = sorted({i for s, n in chunks for i in range(s, s + n) if i >= stop - ring})
    assert count == stop and got["step"].tolist() == covered


@settings(max_examples=30, deadline=None)
@given(
    checkpoints=st.lists(st.integers(1, 12), min_size=1, max_size=12),
    keep=st.integers(1, 30),
)
def test_prune_keeps_each_ranks_latest_series_rows_and_drops_what_a_pruned_run_held(
    checkpoints: list[int], keep: int
) -> None:
    """However many rows each checkpoint appended, pruning leaves chunks covering at least a rank's latest `keep`
    rows and none wholly older; a run pruned from the registry takes its ranks, series and parts with it."""
    import numpy as np

    from gradwatch.server.config import StorageConfig
    from gradwatch.server.database import Checkpoint, Database
    from gradwatch.server.persistence import _assemble
    from gradwatch.server.store import RING_DTYPE

    db = Database(StorageConfig(data_dir="", max_runs=1), alert_history=10)
    record = {"job_name": "j", "world_size": 1, "first_seen": 0.0, "finished_at": None, "protocol_version": 1,
              "summary": {}}  # fmt: skip
    count = 0
    for n in checkpoints:
        rows = np.zeros(n, dtype=RING_DTYPE)
        rows["step"] = np.arange(count, count + n)
        db.checkpoint(Checkpoint(runs=[{**record, "run_id": "a", "last_seen": time.time()}],
                                 ranks=[("a", 0, {"view": {"rank": 0}, "sessions": []})],
                                 series=[("a", 0, count, count + n, rows.tobytes())],
                                 parts=[("a", "global", b"")]))  # fmt: skip
        count += n
    db.prune(series_rows=keep)
    chunks = db.run_series("a")[0]
    got, stop = _assemble(chunks, keep)
    assert stop == count and got["step"].tolist() == list(range(max(0, count - keep), count))
    assert all(end > count - keep for _, end, _ in chunks)  # nothing left that is wholly older
    db.checkpoint(Checkpoint(runs=[{**record, "run_id": "b", "last_seen": time.time() + 1}]))  # max_runs=1: "a" goes
    db.prune(series_rows=keep)
    assert (db.run_ranks("a"), db.run_series("a"), db.run_parts("a")) == ([], {}, {})
    db.close()


def test_reports_after_a_checkpoint_reach_the_restored_views_through_the_latest_part(tmp_path: pathlib.Path) -> None:
    """A rank's row is rewritten only when its view changes beyond what moves with every report (the `latest`
    part carries steps, losses, times, report counts and the session's applied seq): reports and heartbeats after
    a checkpoint still read back after a restart, and the agent is acknowledged the last seq applied."""
    ranks = 5
    with served(tmp_path) as app:
        feed(app.grpc_target, "moving", range(ranks), ranks, range(1, 11))
        wait_until(lambda: saved(tmp_path, "moving") == (ranks, ranks * 10), what="first checkpoint")
        feed(app.grpc_target, "moving", range(ranks), ranks, range(11, 26))
        wait_until(lambda: saved(tmp_path, "moving") == (ranks, ranks * 25), what="second checkpoint")
        before = state(app, "moving")
    assert [r["step"] for r in before["ranks"]] == [25] * ranks
    with served(tmp_path) as again:
        assert state(again, "moving") == before
        stream = AgentStream(again.grpc_target)
        try:
            stream.send(hello_frame(run="moving", layers=LAYERS))
            assert stream.recv().welcome.acked_seq == 25
        finally:
            stream.close()
