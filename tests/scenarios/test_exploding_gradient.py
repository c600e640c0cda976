"""exploding_gradient on a real run: a 30× learning-rate jump pages before the weights overflow."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario


def test_learning_rate_blow_up_is_caught_before_the_nan() -> None:
    sc = scenario("explode")
    result = run_scenario(sc)
    # The step after the jump is the first whose gradient the bigger update changed; two reports confirm.
    assert_caught(result, "exploding_gradient", within=4, allow=sc.allow)
    nan = result.first("non_finite")
    first = result.first("exploding_gradient")
    assert first is not None and (nan is None or nan.step > first.step), result.describe()
