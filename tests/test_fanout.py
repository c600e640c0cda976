"""One view over every replica: two aggregator replicas as `gradwatch serve` processes with `cluster.peers` naming
both; runs, alerts and incidents held by either are answered by the other (the CLI and the HTML report against
one replica), and a replica that is down is named in the answer instead of silently missing.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.server.config import AuthConfig, ClusterConfig, HttpConfig, RelayConfig
from gradwatch.server.detectors.stalled import StalledConfig
from gradwatch.server.fanout import ORDER, merge_page
from paging_support import released_port
from relay_support import Serve, serve_peers
from server_support import AgentStream, hello_frame, http_get, report_frame, server_config, short_run, start_app
from wait_support import wait_until

CLI = [sys.executable, "-m", "gradwatch.cli"]


def _cli(*args: str) -> Any:
    return json.loads(subprocess.run([*CLI, *args, "--json"], check=True, capture_output=True, text=True).stdout)


def _items(answer: Any, key: str) -> list[dict[str, Any]]:
    return answer[key] if isinstance(answer, dict) else answer


@pytest.mark.timeout(300)
def test_any_replica_answers_for_every_replicas_runs_alerts_and_incidents(tmp_path: Path) -> None:
    a, b = serve_peers(tmp_path, "ab")
    try:
        short_run(a.grpc_target, "on-a", nan_at=5)
        short_run(b.grpc_target, "on-b", nan_at=5)

        def listed() -> list[dict[str, Any]]:
            return _items(_cli("incidents", "--server", a.http_url), "incidents")

        wait_until(lambda: len(listed()) >= 2, 30, what="incidents of both replicas listed", interval=0.2,
                   detail=lambda: repr(listed()))  # fmt: skip
        for server in (a, b):  # either replica answers for both
            url = server.http_url
            assert {r["run"] for r in _items(_cli("runs", "--server", url), "runs")} == {"on-a", "on-b"}
            alerts = _items(_cli("alerts", "--server", url), "alerts")
            assert sorted((x["run"], x["detector"]) for x in alerts) == [("on-a", "non_finite"), ("on-b", "non_finite")]
        # One run of B, shown through A (the replica that saw it last answers), its ranks too.
        shown_run = _cli("runs", "show", "on-b", "--server", a.http_url)
        assert shown_run["run"] == "on-b" and [r["rank"] for r in shown_run["ranks"]] == [0]
        assert [r["rank"] for r in a.get("/api/v1/runs/on-b/ranks")["ranks"]] == [0]
        # Each replica alone still holds only its own (local=1 is what the fan-out asks).
        assert [r["run"] for r in a.get("/api/v1/runs?local=1")["runs"]] == ["on-a"]
        # B's incident, shown and reported through A.
        incident = next(i for i in _items(_cli("incidents", "--server", a.http_url), "incidents") if i["run"] == "on-b")
        shown = subprocess.run([*CLI, "incidents", "show", incident["id"], "--server", a.http_url],
                               check=True, capture_output=True, text=True).stdout  # fmt: skip
        assert "on-b" in shown and "non_finite" in shown
        page = tmp_path / "b.html"
        subprocess.run([*CLI, "report", incident["id"], "--server", a.http_url, "-o", str(page)], check=True)
        assert "on-b" in page.read_text()
        # A replica down: the other answers with what it holds and names the missing one.
        assert b.stop() == 0
        answer = a.get("/api/v1/runs")
        assert [r["run"] for r in answer["runs"]] == ["on-a"]
        assert answer["unreachable"] == [b.http_address] and answer["replicas"] == 1
        status, _, body = http_get(a.http_url + "/api/v1/runs/on-b")
        assert status == 404 and json.loads(body)["unreachable"] == [b.http_address]
    finally:
        assert a.stop() == 0
        b.stop()


def test_a_run_whose_agents_moved_to_another_replica_is_handed_over_not_stalled() -> None:
    ports = [released_port(), released_port()]
    base = server_config()
    stalled = StalledConfig(floor_s=6.0, silent_after_s=6.0)  # the dead run stalls after 6 s; the moved one must not
    peers = ClusterConfig(peers=tuple(f"127.0.0.1:{p}" for p in ports))
    base = dataclasses.replace(base, cluster=peers, relay=RelayConfig(handover_after_s=1.0),
                               detectors={**base.detectors, "stalled": stalled})  # fmt: skip
    a, b = (start_app(dataclasses.replace(base, http=HttpConfig(host="127.0.0.1", port=p))) for p in ports)
    moved = None
    try:
        for run in ("moved", "dead"):  # both runs' agents stop talking to A without a goodbye ...
            stream = AgentStream(a.grpc_target)
            stream.send(hello_frame(run=run, session=run))
            for seq in range(1, 6):
                stream.send(report_frame(seq))
            stream.recv_ack(5)
            stream.close()
        moved = AgentStream(b.grpc_target)  # ... but "moved" goes on at B (dns:/// picked B on reconnect)
        moved.send(hello_frame(run="moved", session="moved"))
        for seq in range(6, 9):
            moved.send(report_frame(seq))
        moved.recv_ack(8)
        wait_until(lambda: any(x["detector"] == "stalled" for x in a.alerts(run="dead")), 30,
                   what="the dead run to stall", interval=0.1, detail=lambda: repr(a.alerts()))  # fmt: skip
        assert a.alerts(run="moved") == []  # handed over before it could stall
        assert a.store.get("moved").expired and not a.store.get("dead").expired  # type: ignore[union-attr]
        assert not b.store.get("moved").expired  # type: ignore[union-attr]
    finally:
        if moved is not None:
            moved.close()
        a.stop()
        b.stop()


def test_a_peer_that_refuses_the_cluster_token_is_named_not_silently_left_out(tmp_path: Path) -> None:
    """Tokens on, and A's cluster.token_file holds a token B does not know: B answers A's questions 401, so A names
    B under `unreachable` instead of answering as if B held nothing; B, with the right token, hears A."""
    right, wrong = "cluster-secret-0123456789", "stale-secret-0123456789ab"
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f'tokens: [{{name: peers, token: "{right}", api: true}}]\n')
    for name, token in (("a", wrong), ("b", right)):
        (tmp_path / f"{name}.token").write_text(token + "\n")
    ports = [released_port(), released_port()]
    peers = tuple(f"127.0.0.1:{p}" for p in ports)
    a, b = (start_app(dataclasses.replace(server_config(), http=HttpConfig(host="127.0.0.1", port=port),
                                          auth=AuthConfig(tokens_file=str(tokens)),
                                          cluster=ClusterConfig(peers=peers, token_file=str(tmp_path / f"{n}.token"))))
            for n, port in zip("ab", ports, strict=True))  # fmt: skip
    try:
        for server, unreachable in ((a, [peers[1]]), (b, [])):
            request = urllib.request.Request(f"{server.http_url}/api/v1/incidents",
                                             headers={"Authorization": f"Bearer {right}"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.loads(response.read())
            assert (answer["replicas"], answer["unreachable"]) == (2 - len(unreachable), unreachable)
    finally:
        a.stop()
        b.stop()


#: How one replica lists each (its store: least recently seen first; its AlertBook: firing oldest first, then
#: resolved most recently resolved first; its database: incidents newest first, then by id).
REPLICA_ORDER: dict[str, Any] = {
    "runs": lambda r: (r["last_seen"], r["run"]),
    "alerts": lambda a: (a["state"] != "firing", a["started_at"] if a["state"] == "firing" else -a["resolved_at"]),
    "incidents": lambda i: (-i["opened_at"], i["id"]),
}


def _replica_lists(key: str) -> st.SearchStrategy[list[list[dict[str, Any]]]]:
    """Each replica's whole list for `key`, in the replica's own order; times drawn from a few values (ties)."""
    times = st.integers(0, 6).map(float)
    if key == "runs":  # unique within a replica; the same run may be held by two (moving)
        item = st.builds(lambda n, t: {"run": f"r{n}", "last_seen": t}, st.integers(0, 9), times)
        one = st.lists(item, max_size=8, unique_by=lambda r: r["run"])
    elif key == "alerts":
        item = st.builds(lambda firing, t, r: {"state": "firing" if firing else "resolved", "started_at": t,
                                               "resolved_at": None if firing else t + r}, st.booleans(), times, times)
        one = st.lists(item, max_size=8)
    else:
        item = st.builds(lambda t, n: {"opened_at": t, "id": f"{n:04x}"}, times, st.integers(0, 1 << 16))
        one = st.lists(item, max_size=8, unique_by=lambda i: i["id"])
    return st.lists(one.map(lambda items: sorted(items, key=REPLICA_ORDER[key])), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), key=st.sampled_from(["runs", "alerts", "incidents"]), limit=st.integers(1, 6),
       offset=st.integers(0, 8))  # fmt: skip
def test_a_merged_page_is_that_page_of_every_replicas_list_together(data: Any, key: str, limit: int,
                                                                   offset: int) -> None:  # fmt: skip
    """What each replica answers the fan-out (its first offset + limit items, and its total) merges into the page
    that paging all replicas' items together gives, with their total; a run held by two replicas counts once, as
    the one seen last (exact when every copy is within the replicas' answers, as on the overview)."""
    lists = data.draw(_replica_lists(key))
    for replica, items in enumerate(lists):
        for i, item in enumerate(items):
            item.setdefault("id", f"{replica}-{i}")
    if key == "runs":
        limit = max(limit, max(len(items) for items in lists))
    answers = [(200, {key: items[: offset + limit], "total": len(items)}) for items in lists]
    status, page = merge_page(key, answers, len(lists), [], limit, offset)
    everything = sorted((item for items in lists for item in items), key=ORDER[key])
    if key == "runs":
        latest = {r["run"]: r for r in sorted(everything, key=lambda r: r["last_seen"])}
        everything = sorted(latest.values(), key=ORDER[key])
        shown = [(r["run"], r["last_seen"]) for r in page["runs"]]
        assert shown == [(r["run"], r["last_seen"]) for r in everything[offset : offset + limit]]
    else:
        assert page[key] == everything[offset : offset + limit]
    assert status == 200 and page["total"] == len(everything)
    assert page["next_offset"] == (offset + limit if offset + limit < len(everything) else None)


def _write(server: Serve, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    return server.write(method, path, body)


@pytest.mark.timeout(180)
def test_a_silence_asked_of_any_replica_mutes_the_run_on_the_replica_that_holds_it(tmp_path: Path) -> None:
    a, b, c = serve_peers(tmp_path, "abc")
    try:
        # Through A, for a run that lives on B.
        status, created = _write(a, "POST", "/api/v1/silences",
                                 {"run": "nan-b", "duration_s": 600, "comment": "known bad data"})  # fmt: skip
        assert status == 201 and created["replicas"] == 3 and created["unreachable"] == []
        silence = created["silence"]
        for server in (a, b, c):  # the same record everywhere: one id to expire, one end time
            (held,) = server.get("/api/v1/silences?local=1")["silences"]
            assert held == silence
        short_run(b.grpc_target, "nan-b", nan_at=3)
        (tracked,) = wait_until(lambda: b.get("/api/v1/notifications")["notifications"], 30, interval=0.1)
        assert tracked["run"] == "nan-b" and tracked["silenced_by"] == [silence["id"]]
        assert not tracked["notified"]  # muted where the alert fired
        listed = a.get("/api/v1/silences")
        assert [s["id"] for s in listed["silences"]] == [silence["id"]] and listed["replicas"] == 3
        # C stopped: a new silence says so, and is kept by A and B.
        assert c.stop() == 0
        status, second = _write(b, "POST", "/api/v1/silences", {"run": "other", "detector": "non_finite",
                                                                "duration_s": 60})  # fmt: skip
        assert status == 201 and second["replicas"] == 2 and second["unreachable"] == [c.http_address]
        assert second["silence"]["id"] in [s["id"] for s in a.get("/api/v1/silences?local=1")["silences"]]
        # Expired through A: gone on B too, so B's alert is no longer muted.
        status, ended = _write(a, "DELETE", f"/api/v1/silences/{silence['id']}")
        assert status == 200 and ended["replicas"] == 2 and ended["unreachable"] == [c.http_address]
        assert [s["state"] for s in b.get("/api/v1/silences?local=1")["silences"] if s["id"] == silence["id"]] == [
            "expired"
        ]
        assert _write(a, "DELETE", f"/api/v1/silences/{silence['id']}")[0] == 404  # no replica holds it active
        # A peer's record is checked like a new silence.
        assert _write(a, "POST", "/api/v1/silences?local=1", {**silence, "detector": "nope"})[0] == 400
    finally:
        assert a.stop() == 0
        b.stop()
        c.stop()
