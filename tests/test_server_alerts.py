"""AlertBook: identity, rank merging, listeners, bounded history, run-level resolution."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradwatch.server.alerts import Alert, AlertBook, alert_id
from gradwatch.server.detectors import Fire, spec_by_name

NON_FINITE = spec_by_name("non_finite")
EXPLODING = spec_by_name("exploding_gradient")


def make_book(history: int = 10) -> AlertBook:
    ticks = itertools.count(1000)
    return AlertBook(clock=lambda: float(next(ticks)), history=history)


def test_alert_book_same_run_and_detector_is_one_alert_across_ranks() -> None:
    book = make_book()
    assert book.fire("r", NON_FINITE, 3, Fire(step=10, value=None, summary="first", layer="fc1")) is True
    assert book.fire("r", NON_FINITE, 1, Fire(step=12, value=2.0, summary="second", layer="fc2")) is True
    assert book.fire("r", NON_FINITE, 1, Fire(step=13, value=4.0, summary="again")) is False  # already firing
    [alert] = book.list()
    assert alert.ranks == (1, 3) and alert.step == 10 and alert.last_step == 13
    assert alert.layer == "fc1" and alert.summary == "first" and alert.value == 4.0
    assert alert.fingerprint == alert_id("r", "non_finite")
    assert alert.id == alert_id("r", "non_finite", alert.started_at)


def test_alert_book_each_episode_has_its_own_id_and_the_same_fingerprint() -> None:
    book = make_book()
    ids = set()
    for episode in range(3):
        book.fire("r", NON_FINITE, 0, Fire(step=10 * episode, value=None, summary="nan"))
        firing = book.firing_alert("r", "non_finite")
        assert firing is not None
        ids.add(firing.id)
        book.clear("r", "non_finite", 0)
    rows = book.list()
    assert len(rows) == 3 and {a.id for a in rows} == ids
    assert {a.fingerprint for a in rows} == {alert_id("r", "non_finite")}


def test_alert_book_other_detector_or_run_is_another_alert() -> None:
    book = make_book()
    book.fire("r", NON_FINITE, 0, Fire(step=1, value=None, summary="a"))
    book.fire("r", EXPLODING, 0, Fire(step=1, value=9.0, summary="b"))
    book.fire("s", NON_FINITE, 0, Fire(step=1, value=None, summary="c"))
    assert len(book.list(state="firing")) == 3
    assert book.firing_detectors() == {("r", "non_finite"), ("r", "exploding_gradient"), ("s", "non_finite")}


def test_alert_book_resolves_only_when_every_rank_cleared() -> None:
    book = make_book()
    events: list[Alert] = []
    book.add_listener(events.append)
    book.fire("r", NON_FINITE, 0, Fire(step=1, value=None, summary="x"))
    book.fire("r", NON_FINITE, 1, Fire(step=2, value=None, summary="x"))
    book.clear("r", "non_finite", 0)
    assert book.list()[0].state == "firing"
    book.clear("r", "non_finite", 1)
    [alert] = book.list()
    assert alert.state == "resolved" and alert.resolved_at > alert.started_at
    assert [e.state for e in events] == ["firing", "resolved"]


def test_alert_book_nan_value_is_json_safe() -> None:
    book = make_book()
    book.fire("r", EXPLODING, 0, Fire(step=1, value=float("nan"), summary="x"))
    assert book.list()[0].value is None


def test_alert_book_history_is_bounded() -> None:
    book = make_book(history=3)
    for i in range(5):
        book.fire(f"run{i}", NON_FINITE, 0, Fire(step=1, value=None, summary="x"))
        book.clear(f"run{i}", "non_finite", 0)
    assert [a.run for a in book.list(state="resolved")] == ["run4", "run3", "run2"]


def test_alert_book_resolve_run_resolves_all_of_that_run() -> None:
    book = make_book()
    book.fire("r", NON_FINITE, 0, Fire(step=1, value=None, summary="nan"))
    book.fire("r", EXPLODING, 0, Fire(step=1, value=5.0, summary="big"))
    book.fire("keep", NON_FINITE, 0, Fire(step=1, value=None, summary="nan"))
    book.resolve_run("r", "run finished")
    assert {a.run for a in book.list(state="firing")} == {"keep"}
    assert all("run finished" in a.summary for a in book.list(run="r"))


def test_alert_book_failing_listener_does_not_break_firing(caplog: pytest.LogCaptureFixture) -> None:
    book = make_book()
    calls: list[str] = []

    def broken(alert: dict[str, object]) -> None:
        raise RuntimeError("terminal closed")

    book.add_listener(broken)
    book.add_listener(lambda alert: calls.append(alert.state))
    book.fire("r", NON_FINITE, 0, Fire(step=1, value=None, summary="x"))
    book.clear("r", "non_finite", 0)
    assert calls == ["firing", "resolved"]
    assert sum("alert listener" in r.message for r in caplog.records) == 1  # logged once


def test_alert_book_rejects_unknown_state() -> None:
    with pytest.raises(ValueError, match="state"):
        make_book().list(state="open")


#: The JSON form of an alert, key order included: what /api/v1/alerts lists, webhooks get and SQLite stores.
ALERT_JSON_KEYS = [
    "id", "fingerprint", "run", "ranks", "detector", "severity", "state", "step", "last_step", "layer", "value",
    "summary", "started_at", "resolved_at", "runbook", "autopsy",
]  # fmt: skip


@given(
    ranks=st.lists(st.integers(0, 63), min_size=1, max_size=6, unique=True),
    value=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    layer=st.none() | st.text(max_size=8),
    resolve=st.booleans(),
)
def test_alert_json_form_is_stable_and_round_trips(
    ranks: list[int], value: float | None, layer: str | None, resolve: bool
) -> None:
    book = make_book()
    for step, rank in enumerate(ranks, start=1):
        book.fire("r", NON_FINITE, rank, Fire(step=step, value=value, summary="s", layer=layer),
                  autopsy={"rank": rank, "batch_ids": ["b"]} if rank % 2 else None)  # fmt: skip
    if resolve:
        for rank in ranks:
            book.clear("r", "non_finite", rank)
    [alert] = book.list()
    data = json.loads(json.dumps(alert.to_json(), allow_nan=False))  # JSON-safe: a NaN value is null
    assert list(data) == ALERT_JSON_KEYS
    assert data["ranks"] == sorted(ranks) and data["state"] == ("resolved" if resolve else "firing")
    assert Alert.from_json({**data, "active": list(alert.active)}) == alert
    with pytest.raises(dataclasses.FrozenInstanceError):
        alert.state = "resolved"  # type: ignore[misc]
