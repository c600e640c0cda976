"""The generated scenario matrix: ground truth drawn consistently for every seed, and a fixed-seed subset of real
runs (one CPU process each, seconds) caught by the right detector at the right place, healthy ones quiet. The
whole matrix is a bench: bench/detection_quality.py --matrix."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.scenarios.matrix import ALLOW, FAULTS, draw, run_matrix


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**31), max_world=st.integers(min_value=1, max_value=4))
def test_every_drawn_run_has_a_consistent_ground_truth(seed: int, max_world: int) -> None:
    run = draw(seed, max_world=max_world)
    assert run == draw(seed, max_world=max_world)  # deterministic
    assert 1 <= run.world_size <= max_world and FAULTS[run.fault][1] <= run.world_size
    assert run.healthy == (run.fault == "healthy") == (run.onset is None)
    if run.rank is not None:
        assert 0 <= run.rank < run.world_size
    if run.fault in ("nan_forward", "not_in_optimizer"):
        assert run.layer is not None
    if not run.healthy:
        assert run.onset is not None and 1 <= run.onset < run.steps and run.expect is not None


# World size 1 (no spawn): a NaN in the input, a NaN out of a module's forward, a layer left out of the
# optimizer, a healthy run, a learning-rate jump (update_ratio), a loss scaled before backward
# (exploding_gradient) and a bad batch (loss_spike).
@pytest.mark.parametrize("seed", [8, 15, 20, 1, 2, 12, 10])
def test_fixed_seed_runs_are_caught_and_located_or_quiet(seed: int) -> None:
    run = draw(seed)
    assert run.world_size == 1
    result = run_matrix(run)
    if run.healthy:
        assert result.loud() == [], result.alerts
        return
    assert result.caught(), (run, result.alerts)
    assert result.localised() in (True, None), (run, result.first(str(run.expect)))
    assert result.loud((*ALLOW[run.fault], str(run.expect))) == [], result.alerts
