"""The generated scenario matrix: ground truth drawn consistently for every seed, and a fixed-seed subset of real
runs (one CPU process each, seconds) caught by the right detector at the right place, healthy ones quiet. The
whole matrix is a bench: bench/detection_quality.py --matrix."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

pytest.importorskip("torch")

from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.scenarios.matrix import ALLOW, EXTRA_ONSET, FAULTS, MatrixRun, draw, run_matrix
from gradwatch.server.config import ServerConfig
from gradwatch.server.detectors.loss_spike import LossSpikeConfig

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "bench" / "results"


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


# Held-out misses of an earlier round, now seen (spawn + gloo): a corrupted GRU/LSTM rank on two ranks whose loss
# sat 1.27× the other's (rank_divergence: a small departure that lasts, judged over 40 steps), and a 4-rank MLP's
# SGD learning-rate jump on a ratio falling fourfold a report (update_ratio: judged against where the layer was,
# not a lagging median). Both were missed before (bench/results/matrix_heldout8000_2026-12-07.md).
@pytest.mark.parametrize("seed", [8241, 8149])
def test_earlier_held_out_misses_are_caught(seed: int) -> None:
    run = draw(seed)
    assert (run.fault, run.world_size) in (("corrupt_rank", 2), ("lr_jump", 4)), run
    result = run_matrix(run)
    assert result.caught(), (run, result.alerts)
    assert result.localised() in (True, None), (run, result.first(str(run.expect)))
    assert result.loud((*ALLOW[run.fault], str(run.expect))) == [], result.alerts


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**31), max_world=st.integers(min_value=1, max_value=4))
def test_an_extra_bad_batch_draw_keeps_the_seeds_other_draws(seed: int, max_world: int) -> None:
    own, extra = draw(seed, max_world=max_world), draw(seed, max_world=max_world, extra_bad_batch=True)
    kept = ("seed", "family", "norm", "residual", "optimizer", "schedule", "batch", "world_size", "steps")
    assert [getattr(extra, f) for f in kept] == [getattr(own, f) for f in kept]
    assert (extra.fault, extra.expect, extra.where, extra.layer, extra.extra) == ("bad_batch", "loss_spike", "data",
                                                                                  None, True)  # fmt: skip
    assert extra.onset is not None and EXTRA_ONSET[0] <= extra.onset <= EXTRA_ONSET[1]
    assert extra.rank is not None and 0 <= extra.rank < extra.world_size
    assert extra.name != own.name and not own.extra


def test_the_seeds_own_draws_are_those_recorded_before_the_extra_stream() -> None:
    """The extra bad-batch stream changed no seed's own run: 160 held-out runs recorded before it, drawn again."""
    with open(RESULTS / "matrix_2026-12-07_heldout_final_a.jsonl") as f:
        recorded = [MatrixRun(**json.loads(line)["run"]) for line in f]
    assert len(recorded) >= 150
    assert [draw(r.seed, max_world=4) for r in recorded] == recorded


# Bad batches late in light-tailed runs (a GRU at batch 32, a transformer at batch 16; tuning seeds, extra draws
# at world size 1): 2.25× and 1.84× the clean batch's loss, 9.4 and 6.9 noise sigmas, missed by 12 sigmas alone
# and caught against the run's record of excesses (server/detectors/loss_spike.py, opt-in: `tail_k: 3`). Their
# healthy twins (the same run without the bad batch) stay quiet.
@pytest.mark.parametrize("seed", [7018, 7024])
def test_a_late_bad_batch_on_a_light_tailed_run_is_caught_and_its_twin_is_quiet(seed: int) -> None:
    run = draw(seed, max_world=1, extra_bad_batch=True)
    config = _with_tail_record()
    result = run_matrix(run, config)
    assert result.effect is not None and result.effect >= 1.5, result.effect  # a bad batch that shows
    assert result.caught(), (run, result.alerts)
    assert result.localised() is True and (result.first("loss_spike") or {})["step"] == run.onset
    assert result.loud((*ALLOW[run.fault], "loss_spike")) == [], result.alerts
    twin = dataclasses.replace(run, fault="healthy", where="none", onset=None, expect=None, rank=None)
    assert run_matrix(twin, config).loud() == []


def _with_tail_record() -> ServerConfig:
    """Every detector at its defaults but loss_spike with its record of excesses on (tail_k 3, opt-in)."""
    base = ServerConfig.local()
    return dataclasses.replace(base, detectors={**base.detectors, "loss_spike": LossSpikeConfig(tail_k=3.0)})
