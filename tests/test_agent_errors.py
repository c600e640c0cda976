"""The agent's error choke point: `errors.guarded` around agent code, and the user's alert callback kept apart."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("torch")

from gradwatch.agent import errors
from gradwatch.agent.actions import AlertActions, AlertNotice, TrainingAlert

NOTICE = AlertNotice(detector="non_finite", severity="critical", step=7, rank=0, summary="NaN in the loss")


class _Boom(Exception):
    pass


def _fail() -> None:
    raise _Boom("agent bug")


def test_guarded_swallows_counts_and_times_an_error_in_production() -> None:
    errors.set_strict(False)
    errors.reset()
    spent: list[float] = []
    after = []
    with errors.guarded("unit_hook", spent.append) as guarded:
        _fail()
    after.append(True)  # execution goes on after the block
    assert after == [True] and errors.counts() == {"unit_hook": 1}
    assert len(spent) == 1 and spent[0] >= 0.0 and guarded.started > 0.0


def test_guarded_reraises_in_strict_mode_and_still_adds_the_time() -> None:
    errors.reset()
    spent: list[float] = []
    with pytest.raises(_Boom), errors.guarded("unit_hook", spent.append):
        _fail()
    assert errors.counts() == {"unit_hook": 1} and len(spent) == 1


def test_guarded_passes_keyboard_interrupt_through_uncounted() -> None:
    errors.set_strict(False)
    errors.reset()
    with pytest.raises(KeyboardInterrupt), errors.guarded("unit_hook"):
        raise KeyboardInterrupt
    assert errors.counts() == {}


def test_guarded_without_an_error_only_adds_the_time() -> None:
    errors.reset()
    spent: list[float] = []
    with errors.guarded("unit_hook", spent.append):
        pass
    assert errors.counts() == {} and len(spent) == 1


@pytest.mark.parametrize("mode", ["observe", "raise"])
def test_alert_callback_exception_is_the_users_not_an_internal_error(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    errors.reset()  # strict mode stays on: an internal error would re-raise here
    calls: list[AlertNotice] = []

    def callback(notice: AlertNotice) -> None:
        calls.append(notice)
        raise ValueError("user code failed")

    actions = AlertActions(mode, callback)
    actions.deliver(NOTICE)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        if mode == "raise":
            with pytest.raises(TrainingAlert):
                actions.poll()
        else:
            actions.poll()
        actions.poll()  # once per notice
    assert calls == [NOTICE] and actions.callback_errors == 1
    assert errors.counts() == {}
    [record] = [r for r in caplog.records if "alert_callback" in r.getMessage()]
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert "internal error" not in record.getMessage()
