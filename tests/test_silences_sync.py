"""Silences resynced between replicas: a replica that was down or unreachable when a silence was created or
expired catches up (SilenceBook.reconcile, SilencesApi.sync), and an early expiry is never undone by a stale copy.

Generated: replicas that each saw any part of any history of creations and expiries agree after one resync round.
Real processes: three `gradwatch serve` replicas, one stopped while a silence is ended and another made, then
started again from its own data directory with the ended silence still stored as active.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.server.silences import SilenceBook
from relay_support import Serve, serve_peers
from server_support import short_run
from wait_support import wait_until

DETECTORS = ("non_finite", "loss_spike")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _books(n: int, clock: _Clock) -> list[SilenceBook]:
    return [SilenceBook(clock=clock, detectors=DETECTORS, max_active=64, history=4) for _ in range(n)]


def _record(silence: dict[str, Any]) -> dict[str, Any]:
    return {k: silence[k] for k in ("id", "run", "detector", "comment", "created_by", "created_at", "ends_at")}


# One step of a history: ("add", replica, duration, reached) | ("expire", replica, which, reached) | ("wait", s).
_STEP = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 3), st.floats(1.0, 500.0), st.sets(st.integers(0, 3))),
    st.tuples(st.just("expire"), st.integers(0, 3), st.integers(0, 20), st.sets(st.integers(0, 3))),
    st.tuples(st.just("wait"), st.floats(0.0, 200.0)),
)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 4), steps=st.lists(_STEP, max_size=25), order=st.randoms(use_true_random=False))
def test_replicas_that_each_saw_part_of_the_history_agree_after_one_resync_round(
    n: int, steps: list[tuple[Any, ...]], order: Any
) -> None:
    clock = _Clock()
    books = _books(n, clock)
    made: list[dict[str, Any]] = []  # every silence created, as its creator answered
    ended: dict[str, float] = {}  # id -> when a user expired it (before its own end)
    for step in steps:
        if step[0] == "wait":
            clock.now += step[1]
            continue
        kind, at, value, reached = step
        at %= n
        peers = [books[i] for i in sorted(reached) if i < n and i != at]
        if kind == "add":  # created on one replica, broadcast to those it reached
            silence = books[at].add(f"run-{len(made) % 3}", DETECTORS[len(made) % 2], value)
            made.append(silence)
            for peer in peers:
                peer.adopt(_record(silence))
        elif made:  # expired through one replica (if it holds it active), broadcast to those it reached
            sid = made[value % len(made)]["id"]
            if books[at].expire(sid) is not None:
                ended.setdefault(sid, clock.now)
                for peer in peers:
                    peer.expire(sid)
    # One resync round: each replica, in a random order, reconciles with every other replica's listing.
    for i in order.sample(range(n), n):
        listings = [s for j, book in enumerate(books) if j != i for s in book.view()]
        books[i].reconcile(listings)
    for silence in made:
        sid = silence["id"]
        should_be_active = sid not in ended and clock.now < silence["ends_at"]
        for book in books:
            held = {s["id"]: s for s in book.view()}.get(sid)
            assert (held is not None and held["state"] == "active") == should_be_active, (sid, held, ended)
            if sid in ended and held is not None and clock.now < silence["ends_at"]:
                assert held["ends_at"] <= clock.now  # ended here too, never at a later time than now
        if should_be_active:
            assert all(book.matching(silence["run"], silence["detector"]) for book in books)


def test_an_early_expiry_survives_a_restart_and_a_peers_stale_copy() -> None:
    clock = _Clock()
    saved: list[list[dict[str, Any]]] = [[]]
    book = SilenceBook(clock=clock, detectors=DETECTORS, persist=lambda items: saved.__setitem__(0, items))
    stale = book.add("r", None, 600.0)
    book.expire(stale["id"])
    restarted = SilenceBook(clock=clock, detectors=DETECTORS)
    restarted.restore(saved[0])
    assert restarted.active_count() == 0
    assert restarted.reconcile([stale]) == {"adopted": 0, "expired": 0, "refused": 0}  # the stale copy stays out
    assert [s["state"] for s in restarted.view()] == ["expired"]
    assert restarted.adopt(_record(stale))["state"] == "expired"  # nor does a late broadcast bring it back
    clock.now += 601.0  # past its own end: nothing left to remember
    restarted.reconcile([])
    book.reconcile([])
    assert restarted.view() == [] or all(s["state"] == "expired" for s in restarted.view())


def test_records_the_book_cannot_take_are_refused_and_counted() -> None:
    clock = _Clock()
    book = SilenceBook(clock=clock, detectors=DETECTORS, max_active=1)
    first = SilenceBook(clock=clock, detectors=DETECTORS).add("r", None, 60.0)
    second = {**first, "id": "2-other"}
    bad = {**first, "id": "3-bad", "detector": "no_such_detector"}
    assert book.reconcile([first, second, bad]) == {"adopted": 1, "expired": 0, "refused": 2}
    assert book.synced["refused"] == 2 and book.active_count() == 1


def _metric(server: Serve, name: str, action: str) -> float:
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    line = next(x for x in text.splitlines() if x.startswith(f'{name}{{action="{action}"}}'))
    return float(line.split()[-1])


def _states(server: Serve) -> dict[str, str]:
    return {s["id"]: s["state"] for s in server.get("/api/v1/silences?local=1")["silences"]}


@pytest.mark.timeout(240)
def test_a_replica_down_while_silences_change_catches_up_when_it_is_back(tmp_path: Path) -> None:
    a, b, c = serve_peers(tmp_path, "abc", cluster="silence_sync_s: 0.5")
    try:
        status, created = a.write("POST", "/api/v1/silences", {"run": "old", "duration_s": 600})
        assert status == 201 and created["replicas"] == 3
        first = created["silence"]["id"]
        assert c.stop() == 0  # C keeps `first` as active in its data directory
        status, ended = a.write("DELETE", f"/api/v1/silences/{first}")
        assert status == 200 and ended["unreachable"] == [c.http_address]
        status, made = b.write("POST", "/api/v1/silences", {"run": "late", "detector": "non_finite",
                                                               "duration_s": 600})  # fmt: skip
        assert status == 201 and made["unreachable"] == [c.http_address]
        second = made["silence"]["id"]
        port = c.http_address.rpartition(":")[2]
        c = Serve(tmp_path, "c", "--http-port", port, config=c.config)
        # Back from its own store with `first` active and without `second`: within a resync both are right.
        wait_until(lambda: _states(c) == {first: "expired", second: "active"}, 30, interval=0.1,
                   what="the restarted replica to catch up", detail=lambda: json.dumps(_states(c)))  # fmt: skip
        assert _metric(c, "gradwatch_silences_synced_total", "adopted") == 1
        assert _metric(c, "gradwatch_silences_synced_total", "expired") == 1
        # A silence made on C alone reaches A and B by their own resyncs, which also saw C's stale copy earlier:
        # `first` stays expired everywhere.
        status, only_c = c.write("POST", "/api/v1/silences?local=1", {"run": "c-only", "duration_s": 600})
        assert status == 201 and "replicas" not in only_c
        third = only_c["silence"]["id"]
        for server in (a, b):
            wait_until(lambda s=server: _states(s).get(third) == "active", 30, interval=0.1,
                       what="the peers to adopt C's silence")  # fmt: skip
            assert _states(server)[first] == "expired"
        # The adopted silence mutes C's alert.
        short_run(c.grpc_target, "late", nan_at=3)
        (tracked,) = wait_until(lambda: c.get("/api/v1/notifications")["notifications"], 30, interval=0.1)
        assert tracked["run"] == "late" and tracked["silenced_by"] == [second] and not tracked["notified"]
    finally:
        for server in (a, b, c):
            server.stop()
