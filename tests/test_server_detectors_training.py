"""The training-dynamics detectors on hand-built reports: loss_divergence, loss_spike, loss_not_decreasing,
vanishing_gradient, update_ratio, frozen_parameters (fire, stay quiet, warm up, resolve, configuration)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from gradwatch.server.config import load_config
from gradwatch.server.detectors import Clear, Fire, Verdict, inhibitions
from gradwatch.server.detectors.exploding_gradient import ExplodingGradientConfig, ExplodingGradientDetector
from gradwatch.server.detectors.frozen_parameters import FrozenParametersConfig, FrozenParametersDetector
from gradwatch.server.detectors.gradients_not_applied import GradientsNotAppliedConfig, GradientsNotAppliedDetector
from gradwatch.server.detectors.loss_divergence import LossDivergenceConfig, LossDivergenceDetector
from gradwatch.server.detectors.loss_not_decreasing import LossNotDecreasingConfig, LossNotDecreasingDetector
from gradwatch.server.detectors.loss_spike import LossSpikeConfig, LossSpikeDetector
from gradwatch.server.detectors.update_ratio import UpdateRatioConfig, UpdateRatioDetector
from gradwatch.server.detectors.vanishing_gradient import VanishingGradientConfig, VanishingGradientDetector
from gradwatch.server.report import RankReport, build_report
from server_support import columns, report_frame

LAYERS = tuple(f"net.{i}" for i in range(8))


def report(step: int, *, rank: int = 0, loss: float | None = 0.5, norm: float = 1.0, **cols: Any) -> RankReport:
    layers = columns(len(LAYERS), **cols) if cols else None
    frame = report_frame(step, loss=loss, grad_norm=norm, layers=layers)
    return build_report("run", rank, frame.report, LAYERS, received_at=0.0)


def feed_losses(detector: Any, losses: Iterable[float], start: int = 1, rank: int = 0) -> list[tuple[int, Verdict]]:
    out = []
    for step, loss in enumerate(losses, start=start):
        verdict = detector.observe(report(step, rank=rank, loss=float(loss)))
        if verdict is not None:
            out.append((step, verdict))
    return out


def fires(verdicts: list[tuple[int, Verdict]]) -> list[int]:
    return [step for step, v in verdicts if isinstance(v, Fire)]


def clears(verdicts: list[tuple[int, Verdict]]) -> list[int]:
    return [step for step, v in verdicts if isinstance(v, Clear)]


def training_curve(n: int, seed: int, *, noise: float = 0.1, floor: float = 0.05) -> np.ndarray:
    """A decaying loss with multiplicative lognormal batch noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return (floor + 1.5 * np.exp(-t / 80.0)) * rng.lognormal(0.0, noise, n)


def chi2_batches(n: int, seed: int, batch: int = 4) -> np.ndarray:
    """MSE of tiny batches around a converged model: heavy-tailed per-step losses."""
    rng = np.random.default_rng(seed)
    return 0.1 + 0.3 * rng.chisquare(batch, n) / batch


# ------------------------------------------------------------------ configuration


def test_every_new_detector_loads_from_yaml_and_rejects_bad_keys() -> None:
    config = load_config({"detectors": {"loss_spike": {"factor": 6.0}, "frozen_parameters": {"ignore": ["enc."]}}})
    assert config.detector("loss_spike").factor == 6.0  # type: ignore[attr-defined]
    assert config.detector("frozen_parameters").ignore == ("enc.",)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"detectors\.update_ratio\.low"):
        load_config({"detectors": {"update_ratio": {"low": 1.0, "high": 0.5}}})
    with pytest.raises(ValueError, match=r"detectors\.loss_divergence\.min_reports"):
        load_config({"detectors": {"loss_divergence": {"min_reports": 500}}})
    with pytest.raises(ValueError, match=r"detectors\.loss_not_decreasing\.smooth"):
        load_config({"detectors": {"loss_not_decreasing": {"smooth": 60, "window": 100}}})
    with pytest.raises(ValueError, match=r"detectors\.vanishing_gradient\.depth_ratio"):
        load_config({"detectors": {"vanishing_gradient": {"depth_ratio": 2.0}}})


def test_inhibitions_page_once_for_the_cause() -> None:
    rules = inhibitions()
    assert {"exploding_gradient", "loss_divergence", "loss_spike"} <= rules["non_finite"]
    assert {"loss_spike", "loss_divergence"} <= rules["exploding_gradient"]
    assert rules["loss_divergence"] == frozenset({"loss_spike"})


# ------------------------------------------------------------------ loss_divergence


@pytest.mark.parametrize("seed", range(4))
def test_loss_divergence_quiet_on_healthy_curves(seed: int) -> None:
    det = LossDivergenceDetector(LossDivergenceConfig())
    assert feed_losses(det, training_curve(1500, seed, noise=0.3)) == []
    det = LossDivergenceDetector(LossDivergenceConfig())
    assert feed_losses(det, chi2_batches(1500, seed)) == []


def test_loss_divergence_fires_on_a_jump_that_stays_and_resolves_when_it_returns() -> None:
    det = LossDivergenceDetector(LossDivergenceConfig(resolve_after=5))
    base = training_curve(300, 0)
    verdicts = feed_losses(det, np.concatenate([base, np.full(40, 5.0), np.full(30, base[-1])]))
    fired = fires(verdicts)
    # The median of the last 10 losses (the mean of the middle two) crosses once 5 of them are high.
    assert fired[0] == 305, fired
    first = next(v for s, v in verdicts if isinstance(v, Fire))
    assert isinstance(first, Fire) and "diverged" in first.summary and first.value is not None
    assert first.value > 1.0  # the recent median, far above a baseline of ~0.15
    assert clears(verdicts) and clears(verdicts)[0] > 340


def test_loss_divergence_ignores_a_transient_spike() -> None:
    det = LossDivergenceDetector(LossDivergenceConfig())
    base = training_curve(400, 1)
    spiked = base.copy()
    spiked[300:304] = 50.0
    assert feed_losses(det, spiked) == []


def test_loss_divergence_trend_rule_catches_a_steady_climb() -> None:
    # Levels so loose only the trend can fire.
    det = LossDivergenceDetector(LossDivergenceConfig(factor=1000.0, mad_k=1000.0))
    rng = np.random.default_rng(3)
    base = 0.3 * rng.lognormal(0, 0.1, 200)
    climb = 0.3 * np.exp(np.linspace(0, 2.0, 120)) * rng.lognormal(0, 0.1, 120)
    verdicts = feed_losses(det, np.concatenate([base, climb]))
    assert fires(verdicts), verdicts
    first = next(v for _, v in verdicts if isinstance(v, Fire))
    assert isinstance(first, Fire) and "rising steadily" in first.summary


def test_loss_divergence_warm_up_and_non_finite_losses_are_not_judged() -> None:
    det = LossDivergenceDetector(LossDivergenceConfig())
    assert feed_losses(det, [1.0] * 5 + [100.0] * 20 + [1.0] * 5) == []
    assert feed_losses(det, [math.nan, math.inf] * 20, start=31) == []


def test_loss_divergence_judges_a_run_that_converged_within_its_warm_up_at_the_tasks_scale() -> None:
    """A classifier at 2e-4 by its 12th loss: the median of its first 30 is tiny, but its first loss (1.3) says
    what the task's losses are. A bad batch's SGD kick that leaves it at 1e-2 for a long stretch (50× its
    baseline, still 99 % solved) does not page; a loss back at 1.0 does."""
    rng = np.random.default_rng(2)
    warm = np.concatenate([1.3 * 0.45 ** np.arange(12), 2e-4 * rng.lognormal(0.0, 0.3, 60)])
    det = LossDivergenceDetector(LossDivergenceConfig())
    assert feed_losses(det, np.concatenate([warm, 1e-2 * rng.lognormal(0.0, 0.2, 60)])) == []
    det = LossDivergenceDetector(LossDivergenceConfig())
    assert fires(feed_losses(det, np.concatenate([warm, np.full(20, 1.0)])))


def test_loss_divergence_handles_negative_losses() -> None:
    # Negative log-likelihoods: the relative margin uses |median|.
    rng = np.random.default_rng(0)
    det = LossDivergenceDetector(LossDivergenceConfig())
    base = -2.0 + 0.05 * rng.standard_normal(200)
    assert feed_losses(det, base) == []
    assert fires(feed_losses(det, np.full(20, 3.0), start=201))


# ------------------------------------------------------------------ loss_spike


@pytest.mark.parametrize("seed", range(4))
def test_loss_spike_quiet_on_noisy_healthy_curves(seed: int) -> None:
    assert feed_losses(LossSpikeDetector(LossSpikeConfig()), training_curve(1500, seed, noise=0.3)) == []
    assert feed_losses(LossSpikeDetector(LossSpikeConfig()), chi2_batches(1500, seed)) == []


def test_loss_spike_fires_at_the_jump_and_resolves_after_recovery() -> None:
    det = LossSpikeDetector(LossSpikeConfig(resolve_after=5))
    base = training_curve(300, 2)
    verdicts = feed_losses(det, np.concatenate([base, [8.0, 9.0], base[-30:]]))
    assert fires(verdicts) == [301, 302]
    assert clears(verdicts) == [307]
    first = verdicts[0][1]
    assert isinstance(first, Fire) and "spiked to 8" in first.summary and first.value == 8.0


def test_loss_spike_needs_a_rise_that_matters_at_the_runs_scale() -> None:
    # Converged far below the start: doubling a tiny loss is not a spike.
    det = LossSpikeDetector(LossSpikeConfig())
    curve = np.concatenate([np.linspace(2.0, 0.01, 100), np.full(200, 0.01)])
    assert feed_losses(det, np.concatenate([curve, [0.05]])) == []
    assert fires(feed_losses(det, [1.5], start=302)) == [302]


@settings(max_examples=40, deadline=None)
@given(start=st.floats(0.5, 5.0), floor=st.floats(1e-3, 0.3), steps=st.integers(35, 120), noise=st.floats(0.0, 0.1),
       seed=st.integers(0, 2**16))  # fmt: skip
@example(start=1.0, floor=0.125, steps=55, noise=0.09375, seed=435)  # sigma over the whole window: the first noise
def test_loss_spike_judges_against_the_current_level_of_a_falling_loss(
    start: float, floor: float, steps: int, noise: float, seed: int
) -> None:
    """A loss falling fast while the baseline forms (start → floor·start over `steps`): a window median and MAD
    measure the descent, not the noise, and once hid a bad batch at 300× the current loss. Against the current
    level and a sigma from consecutive differences, the descent itself never fires and a batch at 4× the
    current level (and half the starting loss above it) always does."""
    rng = np.random.default_rng(seed)
    curve = start * floor ** (np.arange(steps) / (steps - 1)) * rng.lognormal(0.0, noise, steps)
    det = LossSpikeDetector(LossSpikeConfig())
    assert feed_losses(det, curve) == []
    bad = max(4.0 * float(np.median(curve[-10:])), float(np.median(curve[-10:])) + 0.5 * start)
    assert fires(feed_losses(det, [bad], start=steps + 1)) == [steps + 1]


def test_loss_spike_measures_a_rise_against_the_tasks_scale_when_the_run_converged_at_once() -> None:
    """A classifier that fell from 1.9 to 2e-4 within its first 30 losses: the median of those is tiny, but a
    hard batch at 30× its level (6e-3) is nothing at the task's scale (its first loss); a batch at 1.0 is."""
    rng = np.random.default_rng(5)
    curve = np.concatenate([1.9 * 0.3 ** np.arange(8), 2e-4 * rng.lognormal(0.0, 0.4, 120)])
    det = LossSpikeDetector(LossSpikeConfig())
    assert feed_losses(det, np.concatenate([curve, [6e-3]])) == []
    assert fires(feed_losses(det, [1.0], start=curve.size + 2)) == [curve.size + 2]


def test_loss_spike_ranks_have_separate_baselines() -> None:
    det = LossSpikeDetector(LossSpikeConfig())
    feed_losses(det, np.full(100, 0.1), rank=0)
    feed_losses(det, np.full(100, 10.0), rank=1)
    assert feed_losses(det, [10.0], start=101, rank=1) == []
    assert fires(feed_losses(det, [10.0], start=101, rank=0)) == [101]


# ------------------------------------------------------------------ loss_not_decreasing


@pytest.mark.parametrize("seed", range(4))
def test_loss_not_decreasing_quiet_while_learning_and_after_convergence(seed: int) -> None:
    det = LossNotDecreasingDetector(LossNotDecreasingConfig())
    assert feed_losses(det, training_curve(1500, seed, noise=0.3)) == []


def test_loss_not_decreasing_fires_on_a_plateau_from_the_start() -> None:
    cfg = LossNotDecreasingConfig()
    det = LossNotDecreasingDetector(cfg)
    rng = np.random.default_rng(0)
    verdicts = feed_losses(det, 1.4 * rng.lognormal(0, 0.1, 300))
    fired = fires(verdicts)
    assert fired and fired[0] == cfg.window + cfg.consecutive - 1, fired
    first = verdicts[0][1]
    assert isinstance(first, Fire) and "not decreasing" in first.summary


def test_loss_not_decreasing_fires_when_learning_stalls_early_and_resolves_when_it_resumes() -> None:
    det = LossNotDecreasingDetector(LossNotDecreasingConfig())
    learning = np.linspace(1.0, 0.8, 60)  # 20 % progress, then stuck
    stalled = np.full(200, 0.8)
    resumed = np.linspace(0.8, 0.2, 200)
    verdicts = feed_losses(det, np.concatenate([learning, stalled, resumed]))
    # Stuck from step 60: the 200-report window is full at step 200, its halves then differ by < 5 %; 10 more.
    assert fires(verdicts) and 200 <= fires(verdicts)[0] <= 230, fires(verdicts)
    assert clears(verdicts) and clears(verdicts)[0] > 260


def test_loss_not_decreasing_leaves_a_settled_plateau_alone() -> None:
    det = LossNotDecreasingDetector(LossNotDecreasingConfig())
    assert feed_losses(det, np.concatenate([np.linspace(2.0, 0.4, 100), np.full(500, 0.4)])) == []


# ------------------------------------------------------------------ vanishing_gradient


def deep_net_report(step: int, early: float, *, rank: int = 0) -> RankReport:
    grads = np.geomspace(early, 1.0, len(LAYERS))  # input side first
    return report(step, rank=rank, grad_norm=grads, weight_norm=np.full(len(LAYERS), 4.0))


def test_vanishing_gradient_fires_on_depth_ratio_after_consecutive_reports_and_resolves() -> None:
    cfg = VanishingGradientConfig()
    det = VanishingGradientDetector(cfg)
    verdicts = [det.observe(deep_net_report(10 * i, 1e-6)) for i in range(1, 6)]
    # First full report skipped (min_reports=1), then 3 in a row.
    assert [type(v).__name__ for v in verdicts] == ["NoneType", "NoneType", "NoneType", "Fire", "Fire"]
    fire = verdicts[3]
    assert isinstance(fire, Fire) and fire.layer == "net.0" and "vanish with depth" in fire.summary
    assert fire.value is not None and fire.value < cfg.depth_ratio
    healed = [det.observe(deep_net_report(10 * i, 0.3)) for i in range(6, 9)]
    assert healed[:2] == [None, None] and isinstance(healed[2], Clear)


def test_vanishing_gradient_quiet_on_healthy_layer_spread() -> None:
    det = VanishingGradientDetector(VanishingGradientConfig())
    assert [det.observe(deep_net_report(10 * i, 0.02)) for i in range(1, 20)] == [None] * 19


def test_vanishing_gradient_tiny_rule_and_zero_gradients() -> None:
    det = VanishingGradientDetector(VanishingGradientConfig(consecutive=1, min_reports=0))
    tiny = report(10, grad_norm=1e-9, weight_norm=3.0)
    verdict = det.observe(tiny)
    assert isinstance(verdict, Fire) and "vanished" in verdict.summary
    det = VanishingGradientDetector(VanishingGradientConfig(consecutive=1, min_reports=0))
    assert det.observe(report(10, grad_norm=0.0, weight_norm=3.0)) is None  # frozen, not vanishing


def test_vanishing_gradient_skips_reports_without_layer_columns() -> None:
    det = VanishingGradientDetector(VanishingGradientConfig(consecutive=1, min_reports=0))
    assert det.observe(report(1)) is None


# ------------------------------------------------------------------ update_ratio


def ratio_report(step: int, ratios: Iterable[float] | float) -> RankReport:
    return report(step, update_ratio=ratios, grad_norm=1.0, weight_norm=1.0)


def test_update_ratio_fires_on_the_worst_layer_and_resolves() -> None:
    cfg = UpdateRatioConfig(resolve_after=2, jump_factor=1e9)  # the absolute rule alone (the jump rule: below)
    det = UpdateRatioDetector(cfg)
    healthy = np.full(len(LAYERS), 1e-3)
    hot = healthy.copy()
    hot[5] = 0.8
    out = [det.observe(ratio_report(10 * i, healthy)) for i in range(1, 6)]
    assert out == [None] * 5
    out = [det.observe(ratio_report(10 * i, hot)) for i in range(6, 10)]
    # The median of the last 5 reports turns once 3 of them are hot.
    assert out[:2] == [None, None] and isinstance(out[2], Fire)
    assert out[2].layer == "net.5" and "too high" in out[2].summary and out[2].value == pytest.approx(0.8)
    out = [det.observe(ratio_report(10 * i, healthy)) for i in range(10, 16)]
    assert any(isinstance(v, Clear) for v in out)


def test_update_ratio_low_but_not_zero_and_warm_up() -> None:
    det = UpdateRatioDetector(UpdateRatioConfig())
    lows = [det.observe(ratio_report(10 * i, 1e-11)) for i in range(1, 8)]
    assert lows[:5] == [None] * 5 and isinstance(lows[5], Fire) and "too low" in lows[5].summary
    det = UpdateRatioDetector(UpdateRatioConfig())
    assert [det.observe(ratio_report(10 * i, 0.0)) for i in range(1, 10)] == [None] * 9  # frozen: not ours


def test_update_ratio_one_hot_report_is_not_persistent_and_nan_layers_are_skipped() -> None:
    det = UpdateRatioDetector(UpdateRatioConfig())
    series = [1e-3] * 8 + [5.0] + [1e-3] * 8
    assert [det.observe(ratio_report(10 * i, r)) for i, r in enumerate(series, 1)] == [None] * len(series)
    with_nan = np.full(len(LAYERS), 1e-3)
    with_nan[0] = np.nan
    assert [det.observe(ratio_report(10 * i, with_nan)) for i in range(20, 30)] == [None] * 10


@pytest.mark.parametrize("reports", [1, 2])
def test_update_ratio_jump_rule_names_the_layer_whose_ratio_jumped(reports: int) -> None:
    det = UpdateRatioDetector(UpdateRatioConfig(jump_reports=reports))
    healthy = np.full(len(LAYERS), 2e-3)
    assert [det.observe(ratio_report(i, healthy)) for i in range(1, 13)] == [None] * 12
    jumped = healthy.copy()
    jumped[3] = 0.12  # 60× its level, under `high`
    out = [det.observe(ratio_report(13 + i, jumped)) for i in range(reports)]
    assert out[:-1] == [None] * (reports - 1) and isinstance(out[-1], Fire), out
    assert out[-1].layer == "net.3" and "jumped" in out[-1].summary and "60×" in out[-1].summary


def test_update_ratio_jump_needs_the_floor_where_it_starts_and_the_factor_where_it_lasts() -> None:
    """A normalised model's jump decays fast: under the floor by the next report, still 15× the level."""
    det = UpdateRatioDetector(UpdateRatioConfig())
    healthy = np.full(len(LAYERS), 2e-3)
    for i in range(1, 13):
        det.observe(ratio_report(i, healthy))
    assert det.observe(ratio_report(13, 0.12)) is None
    assert isinstance(det.observe(ratio_report(14, 0.03)), Fire)
    det = UpdateRatioDetector(UpdateRatioConfig())
    for i in range(1, 13):
        det.observe(ratio_report(i, healthy))
    assert [det.observe(ratio_report(13 + i, 0.04)) for i in range(4)] == [None] * 4  # never over the floor


@settings(max_examples=60, deadline=None)
@given(first=st.floats(10.1, 100.0), after=st.floats(0.0, 8.0))
def test_update_ratio_jump_lasts_while_it_stays_several_times_the_level(first: float, after: float) -> None:
    """A jump of `first`× its level (above the floor) followed by a report at `after`× fires exactly when the
    second report holds at least jump_hold× (a batch-normalised CNN's SGD jump of 30× read 15× and then 4.7×); a
    single outsized update followed by the usual level is no jump. (Ratios travel as float32: values within 1 %
    of a threshold are left out.)"""
    assume(abs(after - UpdateRatioConfig().jump_hold) > 0.03)
    det = UpdateRatioDetector(UpdateRatioConfig())
    level = 6e-3
    for i in range(1, 13):
        det.observe(ratio_report(i, np.full(len(LAYERS), level)))
    assert det.observe(ratio_report(13, level * first)) is None
    second = det.observe(ratio_report(14, level * after))
    assert isinstance(second, Fire) == (after >= UpdateRatioConfig().jump_hold), second


@settings(max_examples=80, deadline=None)
@given(decay=st.floats(1.5, 3.0), jump=st.floats(12.0, 60.0), landing=st.floats(0.06, 0.25), lasting=st.booleans())
def test_update_ratio_jump_on_a_falling_ratio_is_judged_against_where_the_layer_is_now(
    decay: float, jump: float, landing: float, lasting: bool
) -> None:
    """A converging model's ratio falls `decay`× a report (SGD's updates shrink with its gradients); a rate raised
    30× then lands `jump`× above the last report and keeps falling at the same pace. The median of the last
    reports is still decay^1.5× above the last one, so judged against it a 12–60× jump read 3–10×: a held-out
    4-rank MLP's SGD jump was missed. It fires exactly when the next report is still jump_hold× the last report
    before the jump; a single outsized update (back on the trend at once) does not."""
    assume(abs(jump / decay - UpdateRatioConfig().jump_hold) > 0.05)
    last = landing / jump  # the last ratio before the jump
    before = min(12, int(math.log(0.1 / last) / math.log(decay)))  # falling from at most 0.1 (healthy)
    assume(before >= 4)
    ratios = [last * decay ** (before - i) for i in range(before + 1)]
    ratios += [landing, landing / decay if lasting else last / decay]
    det = UpdateRatioDetector(UpdateRatioConfig())
    out = [det.observe(ratio_report(8 * i, r)) for i, r in enumerate(ratios, 1)]
    fired = [v for v in out if isinstance(v, Fire)]
    assert out[: before + 2] == [None] * (before + 2), out
    assert bool(fired) == (lasting and jump / decay >= UpdateRatioConfig().jump_hold), (out, ratios)
    assert all("jumped" in v.summary for v in fired)


@settings(max_examples=60, deadline=None)
@given(
    start=st.floats(1e-5, 1e-2),
    growth=st.floats(0.5, 1.25),
    linear=st.booleans(),
    reports=st.integers(20, 60),
    lone=st.integers(10, 19),
)
def test_update_ratio_jump_rule_stays_quiet_on_schedules_and_small_ratios(
    start: float, growth: float, linear: bool, reports: int, lone: int
) -> None:
    """A schedule (a linear warm-up from zero; a rate moving at most 25 % between two reports, i.e. over 8
    steps: exponential warm-ups and decays) and rises of 10× or more that stay under the floor are not jumps."""
    det = UpdateRatioDetector(UpdateRatioConfig())
    ramp = [start * i for i in range(reports)] if linear else [start * growth**i for i in range(reports)]
    values = [min(v, 0.25) for v in ramp]
    values[lone] = min(values[lone - 1] * 50.0, 0.05)
    values += [min(values[-1] * 10.0, 0.04)] * 4
    out = [det.observe(ratio_report(i, v)) for i, v in enumerate(values, 1)]
    fired = [v for v in out if isinstance(v, Fire)]
    assert all("jumped" not in v.summary for v in fired), fired


# ------------------------------------------------------------------ frozen_parameters


def test_frozen_parameters_names_layers_without_gradient_or_update() -> None:
    det = FrozenParametersDetector(FrozenParametersConfig())
    grads = np.ones(len(LAYERS))
    grads[2] = 0.0
    ratios = np.full(len(LAYERS), 1e-3)
    ratios[2] = 0.0
    ratios[6] = 0.0  # has a gradient but the optimizer never moves it
    out = [det.observe(report(10 * i, grad_norm=grads, update_ratio=ratios)) for i in range(1, 7)]
    assert out[:4] == [None] * 4
    fire = out[4]
    assert isinstance(fire, Fire) and fire.layer == "net.2" and fire.value == 2.0
    assert "1 without any gradient, 1 never updated" in fire.summary and "'net.6'" in fire.summary
    moving = [det.observe(report(70, grad_norm=1.0, update_ratio=1e-3))]
    assert moving == [Clear(step=70)]


def test_frozen_parameters_ignores_prefixes_frozen_on_purpose() -> None:
    det = FrozenParametersDetector(FrozenParametersConfig(ignore=("net.0", "net.1")))
    grads = np.ones(len(LAYERS))
    grads[:2] = 0.0
    assert [det.observe(report(10 * i, grad_norm=grads)) for i in range(1, 10)] == [None] * 9


def test_frozen_parameters_ignores_layers_this_rank_holds_nothing_of() -> None:
    """An FSDP2 rank whose shard of a layer is empty sees no gradient there, every step: nothing is frozen."""
    det = FrozenParametersDetector(FrozenParametersConfig())
    grads = np.ones(len(LAYERS))
    grads[2] = 0.0
    local = np.full(len(LAYERS), 10)
    local[2] = 0
    reports = [dataclasses.replace(report(10 * i, grad_norm=grads), local_param_counts=local) for i in range(1, 9)]
    assert [det.observe(r) for r in reports] == [None] * 8
    held = FrozenParametersDetector(FrozenParametersConfig())  # held here, still no gradient: frozen
    local[2] = 10
    assert isinstance([held.observe(r) for r in reports][4], Fire)


def test_frozen_parameters_quiet_when_everything_moves() -> None:
    det = FrozenParametersDetector(FrozenParametersConfig(reports=1))
    assert det.observe(report(10, grad_norm=0.5, update_ratio=1e-3)) is None
    assert det.observe(report(11)) is None  # a report without layer columns says nothing


# ------------------------------------------------------------------ exploding_gradient: numerically zero norms


def test_exploding_gradient_ignores_float_noise_of_a_dead_network() -> None:
    det = ExplodingGradientDetector(ExplodingGradientConfig())
    rng = np.random.default_rng(0)
    dead = 1e-16 * rng.lognormal(0, 0.5, 60)
    noise = np.full(20, 4e-13)  # thousands of times the baseline, still zero for any model
    series = np.concatenate([dead, noise])
    assert [det.observe(report(s, norm=float(n))) for s, n in enumerate(series, 1)] == [None] * 80
    # A real explosion out of that state still fires.
    assert isinstance(det.observe(report(81, norm=1.0)), type(None))
    assert isinstance(det.observe(report(82, norm=1.0)), Fire)


def test_exploding_gradient_stays_quiet_when_a_converged_run_jumps_from_almost_nothing() -> None:
    det = ExplodingGradientDetector(ExplodingGradientConfig())
    rng = np.random.default_rng(1)
    start = 0.25 * rng.lognormal(0, 0.2, 20)  # the run's starting level
    converged = 2e-4 * rng.lognormal(0, 0.5, 200)
    jump = [6e-3, 6e-3, 6e-3]  # 30× the recent median, still 40× below the start
    assert [det.observe(report(s, norm=float(n))) for s, n in enumerate([*start, *converged, *jump], 1)] == [None] * 223
    assert isinstance(det.observe(report(224, norm=0.5)), type(None))  # above start_fraction × start: counts
    assert isinstance(det.observe(report(225, norm=0.5)), Fire)


def test_small_gradients_and_updates_of_a_solved_task_are_success() -> None:
    vanishing = VanishingGradientDetector(VanishingGradientConfig(consecutive=1, min_reports=0))
    updates = UpdateRatioDetector(UpdateRatioConfig(window=1, min_reports=0))
    for step in range(1, 11):  # the starting loss level: 1.0
        vanishing.observe(report(step, loss=1.0))
        updates.observe(report(step, loss=1.0))
    solved = {"loss": 1e-4, "grad_norm": 1e-9, "weight_norm": 3.0, "update_ratio": 1e-10}
    assert vanishing.observe(report(20, **solved)) is None
    assert updates.observe(report(20, **solved)) is None
    stuck = {**solved, "loss": 0.9}  # the same numbers while the loss is still high: a fault
    assert isinstance(vanishing.observe(report(30, **stuck)), Fire)
    assert isinstance(updates.observe(report(30, **stuck)), Fire)


MINE = (
    "exploding_gradient",
    "loss_divergence",
    "loss_spike",
    "loss_not_decreasing",
    "vanishing_gradient",
    "update_ratio",
    "frozen_parameters",
    "gradients_not_applied",
)


def test_documented_defaults_of_the_training_detectors_match_the_code() -> None:
    """docs/configuration.md lists every setting of these detectors with its default value."""
    import dataclasses
    import pathlib
    import re

    import yaml

    from gradwatch.server.detectors import spec_by_name

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]
    documented = next(b["detectors"] for b in blocks if isinstance(b, dict) and "detectors" in b)
    for name in MINE:
        defaults = dataclasses.asdict(spec_by_name(name).config_type())
        assert documented[name] == {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}, name
    load_config({"detectors": {name: documented[name] for name in MINE}})


def test_exploding_gradient_judges_heavy_tailed_norms_on_the_log_scale() -> None:
    rng = np.random.default_rng(5)
    heavy = 0.06 * rng.lognormal(0.0, 1.75, 400)  # small batches near zero loss: norms span 1e-3..10
    heavy[:20] = 0.4  # the run's start
    quiet = ExplodingGradientDetector(ExplodingGradientConfig())
    assert [quiet.observe(report(s, norm=float(n))) for s, n in enumerate(heavy, 1)] == [None] * 400
    explosion = [quiet.observe(report(s, norm=5e3)) for s in (401, 402)]
    assert explosion[0] is None and isinstance(explosion[1], Fire)
    # Without the log-scale bound the same healthy series pages.
    linear = ExplodingGradientDetector(ExplodingGradientConfig(log_k=0.0))
    assert any(isinstance(linear.observe(report(s, norm=float(n))), Fire) for s, n in enumerate(heavy, 1))


def _ratio_report(step: int, ratios: list[float]) -> RankReport:
    """A report of the agent's update-ratio cadence between full steps: StepReport.update_ratio, no columns."""
    frame = report_frame(step, update_ratio=np.asarray(ratios, dtype="<f4").tobytes())
    return build_report("run", 0, frame.report, LAYERS, received_at=0.0)


def test_gradients_not_applied_is_carried_by_the_update_ratio_cadence_between_full_reports() -> None:
    """A full report marks layer 0 (a gradient, no update) and the update-ratio reports after it keep it at zero:
    the third report in a row fires, long before the next full report."""
    det = GradientsNotAppliedDetector(GradientsNotAppliedConfig())
    n = len(LAYERS)
    grads, stuck = [1.0] * n, [0.0] + [1e-3] * (n - 1)
    assert det.observe(report(10, grad_norm=grads, update_ratio=stuck)) is None
    assert det.observe(_ratio_report(11, stuck)) is None
    assert isinstance(det.observe(_ratio_report(12, stuck)), Fire)
    assert isinstance(det.observe(_ratio_report(13, [1e-3] * n)), Clear)  # it moved


@settings(max_examples=150, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["full", "ratio"]), min_size=1, max_size=30),
    zero=st.lists(st.booleans(), min_size=30, max_size=30),
    grad=st.lists(st.booleans(), min_size=30, max_size=30),
)
def test_gradients_not_applied_fires_exactly_after_a_full_report_marked_the_layer_and_reports_kept_it(
    kinds: list[str], zero: list[bool], grad: list[bool]
) -> None:
    """Against a direct reading of the rule, for any interleaving of full and update-ratio reports: layer 0 is
    unapplied on a full report when it has a gradient and a zero update, on an update-ratio report when it was
    unapplied on the report before and its update is still zero; 3 such reports in a row fire. The other
    layers always move, so an update-ratio report alone never starts a streak."""
    det = GradientsNotAppliedDetector(GradientsNotAppliedConfig())
    n, streak, firing = len(LAYERS), 0, False
    for i, kind in enumerate(kinds):
        ratios = [0.0 if zero[i] else 1e-3] + [1e-3] * (n - 1)
        if kind == "full":
            grads = [1.0 if grad[i] else 0.0] + [1.0] * (n - 1)
            verdict = det.observe(report(i + 1, grad_norm=grads, update_ratio=ratios))
            unapplied = grad[i] and zero[i]
        else:
            verdict = det.observe(_ratio_report(i + 1, ratios))
            unapplied = streak > 0 and zero[i]
        streak = streak + 1 if unapplied else 0
        if streak >= 3:
            assert isinstance(verdict, Fire), (i, kind)
            firing = True
        elif firing:
            assert isinstance(verdict, Clear), (i, kind)
            firing = False
        else:
            assert verdict is None, (i, kind)
