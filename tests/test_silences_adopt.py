"""SilenceBook.adopt: a silence another replica created is kept exactly as it was made there; anything else is
refused with a reason and nothing is kept."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.server.silences import MAX_DURATION_S, SilenceBook

DETECTORS = ("non_finite", "loss_spike")
_FIELDS = ("id", "run", "detector", "comment", "created_by", "created_at", "ends_at")


def _book(now: float = 1000.0) -> SilenceBook:
    return SilenceBook(clock=lambda: now, detectors=DETECTORS, max_active=4)


@settings(max_examples=100, deadline=None)
@given(run=st.text(min_size=1, max_size=20), detector=st.sampled_from((None, *DETECTORS)),
       duration=st.floats(1e-3, MAX_DURATION_S), comment=st.text(max_size=30))  # fmt: skip
def test_a_record_made_on_one_replica_is_kept_as_it_is_on_another(run: str, detector: str | None, duration: float,
                                                                   comment: str) -> None:  # fmt: skip
    made = _book().add(run, detector, duration, comment, "alice")
    record = {key: made[key] for key in _FIELDS}
    other = _book()
    assert other.adopt(record) == made
    assert other.adopt(record) == made  # again: nothing changes
    assert other.matching(run, detector or DETECTORS[0]) == [made["id"]]
    assert other.expire(made["id"]) is not None  # one id ends it everywhere


_GOOD: dict[str, Any] = {"id": "1-abc", "run": "r", "detector": None, "comment": "", "created_by": "",
                         "created_at": 990.0, "ends_at": 1990.0}  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [{"id": ""}, {"id": "a/b"}, {"id": "x" * 65}, {"id": 7}, {"run": ""}, {"run": None}, {"detector": "nope"},
     {"created_at": math.nan}, {"ends_at": math.inf}, {"ends_at": True}, {"ends_at": 980.0},
     {"ends_at": 990.0 + MAX_DURATION_S + 1}, {"comment": 3}],
)  # fmt: skip
def test_a_bad_record_is_refused_and_nothing_kept(change: dict[str, Any]) -> None:
    book = _book()
    with pytest.raises(ValueError):
        book.adopt({**_GOOD, **change})
    assert book.view() == []


def test_an_ended_record_is_answered_but_not_kept_and_the_limit_holds() -> None:
    book = _book(now=5000.0)
    assert book.adopt(_GOOD)["state"] == "expired" and book.active_count() == 0
    fresh = {**_GOOD, "created_at": 4990.0, "ends_at": 9000.0}
    for i in range(4):
        book.adopt({**fresh, "id": f"id-{i}"})
    with pytest.raises(ValueError, match="too many active silences"):
        book.adopt({**fresh, "id": "one-more"})
