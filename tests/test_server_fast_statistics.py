"""The detectors' fast statistics equal the numpy computations they replace, bit for bit (property-based):
SortedRing's medians and MADs, a sorted LossBaseline's threshold, exploding_gradient's log bound,
loss_not_decreasing's line fit, loss_spike's level and noise from plain Python floats; and where a detector
skips a statistic, the same verdicts as without the skip."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradwatch.server.detectors import loss_not_decreasing
from gradwatch.server.detectors.exploding_gradient import (
    ExplodingGradientConfig,
    ExplodingGradientDetector,
    _log_bound,
    _NormBaseline,
    _Recent,
)
from gradwatch.server.detectors.layerwise import Hysteresis
from gradwatch.server.detectors.loss_divergence import LossDivergenceConfig, LossDivergenceDetector
from gradwatch.server.detectors.loss_not_decreasing import _LineFit
from gradwatch.server.detectors.loss_spike import LossSpikeConfig, LossSpikeDetector
from gradwatch.server.detectors.robust import MAD_TO_SIGMA, LossBaseline, median
from gradwatch.server.detectors.sorted_ring import SortedRing, mad_of_sorted
from gradwatch.server.detectors.update_ratio import UpdateRatioConfig, UpdateRatioDetector
from gradwatch.server.report import RankReport

# Few distinct values (ties, signed zeros) as well as arbitrary ones, and now and then a non-finite one.
_VALUES = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-300, -3.25]),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
    st.floats(allow_nan=False, allow_infinity=False, width=64).filter(lambda v: abs(v) < 1e300),
)
_ANY = st.one_of(_VALUES, _VALUES, _VALUES, _VALUES, st.sampled_from([float("nan"), float("inf"), -float("inf")]))


def _bits(value: float) -> bytes:
    """Equal bits (a NaN's payload aside): the comparison that tells -0.0 from 0.0."""
    return b"nan" if value != value else struct.pack("<d", value)


@st.composite
def _windows(draw: st.DrawFn) -> tuple[int, tuple[tuple[int, int], ...], list[float]]:
    capacity = draw(st.integers(1, 40))
    bounds = draw(st.lists(st.tuples(st.integers(0, capacity - 1), st.integers(1, capacity)), max_size=3))
    slices = tuple((min(a, b - 1), b) if a < b else (b - 1, a + 1 if a + 1 <= capacity else capacity)
                   for a, b in bounds)  # fmt: skip
    slices = tuple((a, b) for a, b in slices if 0 <= a < b <= capacity)
    values = draw(st.lists(draw(st.sampled_from([_VALUES, _ANY])), min_size=1, max_size=3 * capacity + 5))
    return capacity, slices, values


@settings(max_examples=300, deadline=None)
@given(_windows())
def test_sorted_ring_statistics_equal_numpy_after_every_append(window) -> None:  # type: ignore[no-untyped-def]
    capacity, slices, values = window
    ring = SortedRing(capacity, slices)
    for value in values:
        ring.append(value)
        held = ring.unordered()
        with np.errstate(invalid="ignore", over="ignore"):
            centre = median(held)
            assert _bits(ring.median()) == _bits(centre)
            assert _bits(ring.mad(centre)) == _bits(median(np.abs(held - centre)))
        np.testing.assert_array_equal(ring.values(), held if not ring.full else ring.values())
        if ring.full:
            chronological = ring.values()
            for index, (start, stop) in enumerate(slices):
                with np.errstate(invalid="ignore", over="ignore"):
                    assert _bits(ring.slice_median(index)) == _bits(median(chronological[start:stop]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_VALUES, min_size=1, max_size=60), _VALUES)
def test_mad_of_sorted_equals_numpy_for_any_centre(values: list[float], centre: float) -> None:
    array = np.asarray(values)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = median(np.abs(array - centre))
    assert _bits(mad_of_sorted(sorted(values), centre)) == _bits(expected)


def test_sorted_ring_refuses_slices_outside_its_window_and_slice_medians_before_it_is_full() -> None:
    with pytest.raises(ValueError, match="not within"):
        SortedRing(4, ((2, 5),))
    ring = SortedRing(4, ((0, 2),))
    ring.append(1.0)
    with pytest.raises(ValueError, match="full window"):
        ring.slice_median(0)


@pytest.mark.parametrize("kernel", ["numpy's lstsq kernel", "np.linalg.lstsq"])
@settings(max_examples=150, deadline=None)
@given(values=hnp.arrays(np.float64, st.integers(4, 300), elements=_VALUES))
def test_line_fit_residuals_equal_polyfit(kernel: str, values: np.ndarray) -> None:
    assert loss_not_decreasing._LSTSQ is not None  # this numpy has the kernel: the fast path is the one tested
    x = np.arange(values.size, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        slope, intercept = np.polyfit(x, values, 1)
        expected = values - (slope * x + intercept)
    saved = loss_not_decreasing._LSTSQ
    if kernel == "np.linalg.lstsq":
        loss_not_decreasing._LSTSQ = None
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            got = _LineFit(values.size).residuals(values)
    finally:
        loss_not_decreasing._LSTSQ = saved
    assert got.tobytes() == expected.tobytes()


_NORMS = st.one_of(
    st.sampled_from([0.0, 1.0, 1e-300, 5e-324, 2.0, 1e300]),
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
    st.floats(min_value=-1.0, max_value=0.0, allow_nan=False),  # negative: not in the log window
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 30), st.lists(_NORMS, min_size=1, max_size=100), st.sampled_from([0.0, 3.0, 1e-3]))
def test_norm_baseline_log_bound_equals_numpy_after_every_append(window: int, norms: list[float], log_k: float) -> None:
    baseline = _NormBaseline(window)
    for norm in norms:
        baseline.append(norm)
        assert _bits(baseline.log_bound(log_k)) == _bits(_log_bound(baseline.ring.unordered(), log_k))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.integers(1, 10), st.lists(_VALUES, min_size=1, max_size=80))
def test_sorted_loss_baseline_threshold_equals_the_partition_one(window: int, warmup: int, losses: list[float]) -> None:
    warmup = min(warmup, window)
    kept, plain = LossBaseline(window, warmup, sorted_window=True), LossBaseline(window, warmup)
    for loss in losses:
        for baseline in (kept, plain):
            if not baseline.warm(loss):
                continue
            baseline.window.append(loss)
        if kept.ready:
            with np.errstate(over="ignore", invalid="ignore"):
                got, expected = kept.threshold(3.0, 10.0, 0.2), plain.threshold(3.0, 10.0, 0.2)
            assert [_bits(v) for v in got] == [_bits(v) for v in expected]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(10, 60),
    st.integers(1, 40),
    st.integers(3, 70),
    st.lists(st.one_of(_VALUES, st.sampled_from([0.0, -0.0])), min_size=5, max_size=150),
)
def test_loss_spike_threshold_equals_numpy_on_the_whole_window(
    window: int, level_window: int, noise_window: int, losses: list[float]
) -> None:
    """loss_spike keeps only the losses it reads and takes their level and noise in plain Python: the same
    (level, threshold) as numpy's median and diff over the last losses of the whole admitted window."""
    config = LossSpikeConfig(window=window, min_reports=5, level_window=level_window, noise_window=noise_window)
    detector = LossSpikeDetector(config)
    baseline, admitted = detector._baselines[0], []
    for loss in losses:
        admitted = [*admitted, loss][-window:]
        if not baseline.warm(loss):
            continue
        if len(admitted) > 5:  # warm-up's losses are in the window; later ones are admitted by observe
            baseline.window.append(loss)
        held = np.array(admitted)
        with np.errstate(over="ignore", invalid="ignore"):
            level = median(held[-level_window:])
            steps = np.abs(np.diff(held[-noise_window:]))
            sigma = MAD_TO_SIGMA * median(steps) / np.sqrt(2.0) if steps.size else 0.0
            margin = max((config.factor - 1.0) * abs(level), config.mad_k * sigma, config.min_rise * baseline.scale)
            expected = (level, level + margin if np.isfinite(margin) else np.inf)
            got = detector._threshold(baseline, detector._excess[0])  # no excess on record: the sigma margin
        assert [_bits(v) for v in got] == [_bits(v) for v in expected]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.floats(0.0, 0.004),
    st.sampled_from([0.0, 0.01, 0.05, 0.2]),
    st.integers(30, 160),
    st.integers(1, 3),
)
def test_loss_not_decreasing_skips_only_fits_that_cannot_change_a_verdict(
    seed: int, fall: float, noise: float, length: int, consecutive: int
) -> None:
    """The trend fit is skipped between no progress and clear progress while the rank's latch is at rest: the
    same verdicts and summaries as a detector that fits there every time."""
    rng = np.random.default_rng(seed)
    steps = np.arange(3 * length)
    losses = 2.0 * (1.0 - fall * steps).clip(0.05) * (1.0 + noise * rng.standard_normal(steps.size))
    config = loss_not_decreasing.LossNotDecreasingConfig(
        window=length, smooth=length // 2, consecutive=consecutive, resolve_after=3
    )
    skipping, fitting = (loss_not_decreasing.LossNotDecreasingDetector(config) for _ in range(2))
    fitting._latch.at_rest = lambda rank: False  # type: ignore[method-assign]
    verdicts = [[], []]  # type: ignore[var-annotated]
    for step, loss in enumerate(losses.tolist()):
        report = _report(step, loss)
        for detector, out in zip((skipping, fitting), verdicts, strict=True):
            out.append(repr(detector.observe(report)))
    assert verdicts[0] == verdicts[1]


def _report(step: int, loss: float, grad_norm: float = 1.0) -> RankReport:
    return RankReport(run="r", rank=0, step=step, wall_time=0.0, step_duration_s=0.1, loss=loss, grad_norm=grad_norm,
                      non_finite_flags=0, columns={}, layer_names=(), non_finite_kinds=(), non_finite_layer=None,
                      received_at=0.0)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.integers(3, 20), st.lists(_NORMS, min_size=1, max_size=80))
def test_exploding_gradient_counts_rises_as_numpy_does_after_every_append(window: int, norms: list[float]) -> None:
    recent = _Recent(window)
    for norm in norms:
        recent.append(norm)
        assert recent.rises == np.count_nonzero(np.diff(recent.ring.values()) > 0)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from(["noise", "rise", "blowup", "spikes", "steps", "dip"]),
    st.sampled_from([0.0, 0.05, 0.5]),
    st.integers(3, 8),
)
def test_exploding_gradient_skips_only_statistics_that_cannot_change_a_verdict(
    seed: int, shape: str, noise: float, growth_window: int
) -> None:
    """A report under factor × median with too few rises skips the MAD, the log bound and the growth fit: the
    same verdicts and summaries as a detector that takes them on every report."""
    rng = np.random.default_rng(seed)
    t = np.arange(200, dtype=np.float64)
    norms = {
        "noise": np.ones_like(t),
        "rise": 1.0 + 0.05 * t,
        "blowup": np.exp(np.minimum(np.maximum(t - 120, 0) * 0.5, 600)),
        "spikes": np.where(rng.random(t.size) < 0.05, 30.0, 1.0),
        "steps": np.where(t > 100, 12.0, 1.0),
        # fast growth from far below the baseline to just under factor × its median: only the growth rule sees it
        "dip": np.where((t >= 100) & (t < 130), np.minimum(1e-4 * 4.0 ** np.maximum(t - 100, 0), 9.0), 1.0),
    }[shape] * (1.0 + noise * rng.random(t.size))
    config = ExplodingGradientConfig(growth_window=growth_window, min_reports=10, consecutive=2, resolve_after=5)
    skipping, full = ExplodingGradientDetector(config), ExplodingGradientDetector(config)
    full._quiet = lambda state, norm, median: False  # type: ignore[method-assign]
    for step, norm in enumerate(norms.tolist()):
        report = _report(step, 1.0, grad_norm=norm)
        assert repr(skipping.observe(report)) == repr(full.observe(report))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.integers(1, 10), st.lists(_VALUES, min_size=1, max_size=80), st.floats(0.0, 50.0))
def test_least_threshold_is_never_above_the_threshold(
    window: int, warmup: int, losses: list[float], mad_k: float
) -> None:
    warmup = min(warmup, window)
    for sorted_window in (True, False):
        baseline = LossBaseline(window, warmup, sorted_window=sorted_window)
        for loss in losses:
            if baseline.warm(loss):
                baseline.window.append(loss)
            if baseline.ready:
                with np.errstate(over="ignore", invalid="ignore"):
                    centre, least = baseline.least_threshold(3.0, 0.2)
                    median, threshold = baseline.threshold(3.0, mad_k, 0.2)
                assert _bits(centre) == _bits(median)
                assert not least > threshold


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from(["fall", "rise", "jump", "spikes", "plateau"]),
    st.sampled_from([0.0, 0.01, 0.3]),
)
def test_loss_divergence_skips_only_statistics_that_cannot_change_a_verdict(
    seed: int, shape: str, noise: float
) -> None:
    """A level and a loss under the least threshold skip the MAD: the same verdicts and summaries as a detector
    that takes the whole threshold on every report."""
    rng = np.random.default_rng(seed)
    t = np.arange(300, dtype=np.float64)
    losses = {
        "fall": 2.0 / np.sqrt(t + 1.0),
        "rise": 1.0 + 0.01 * t,
        "jump": np.where(t > 150, 4.0, 1.0),
        "spikes": np.where(rng.random(t.size) < 0.05, 5.0, 1.0),
        "plateau": np.ones_like(t),
    }[shape] * (1.0 + noise * rng.standard_normal(t.size))
    config = LossDivergenceConfig(window=40, min_reports=10)
    reports = [_report(step, loss) for step, loss in enumerate(losses.tolist())]
    skipping = [repr(v) for v in map(LossDivergenceDetector(config).observe, reports)]
    with pytest.MonkeyPatch.context() as patch:  # no bound below the threshold: the whole threshold every time
        patch.setattr(LossBaseline, "least_threshold", lambda self, factor, min_rise: (0.0, -np.inf))
        full = [repr(v) for v in map(LossDivergenceDetector(config).observe, reports)]
    assert skipping == full


_SHORT_UPDATE_RATIO = {"window": 3, "min_reports": 2, "first_reports": 1, "baseline_reports": 2, "jump_reports": 1}


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 12),
    st.sampled_from(["healthy", "jump", "high", "low", "slow jump"]),
    st.sampled_from([{}, _SHORT_UPDATE_RATIO]),
)
def test_update_ratio_skips_only_medians_that_cannot_change_a_verdict(
    seed: int, layers: int, shape: str, settings_: dict[str, int]
) -> None:
    """Layers whose ratios cannot put a median out of range, and reports where no layer can start or go on
    with a jump, skip those medians: the same verdicts and summaries as a detector that takes them always."""
    rng = np.random.default_rng(seed)
    config = UpdateRatioConfig(**settings_)
    skipping, full = UpdateRatioDetector(config), UpdateRatioDetector(config)
    full._may_leave_range = lambda held, judge_high, judge_low: True  # type: ignore[method-assign]
    full._may_jump = lambda state, ratio: True  # type: ignore[method-assign]
    odd = rng.random(layers) < 0.4
    for step in range(60):
        ratio = 10 ** rng.uniform(-5, -2, layers)
        if shape == "jump" and step > 30:
            ratio = np.where(odd, ratio * 300, ratio)
        elif shape == "high":
            ratio = np.where(odd, rng.choice([0.29, 0.31, 0.6]), ratio)
        elif shape == "low":
            ratio = np.where(odd, rng.choice([0.0, 1e-9, 2e-8]), ratio)
        elif shape == "slow jump" and step > 30:
            ratio = np.where(odd, np.minimum(ratio * 1000, 0.04), ratio)
        if rng.random() < 0.1:
            ratio[rng.integers(0, layers)] = rng.choice([np.nan, np.inf, 0.0])
        report = dataclasses.replace(_report(step, 2.0), update_ratio=ratio.astype(np.float32),
                                     layer_names=tuple(f"layer{i}" for i in range(layers)))  # fmt: skip
        with np.errstate(invalid="ignore"):
            assert repr(skipping.observe(report)) == repr(full.observe(report))


class _AlwaysCounting(Hysteresis):
    def _quiet(self, streak: np.ndarray, over: np.ndarray) -> bool:
        return False


_MODULE = st.tuples(st.booleans(), st.booleans(), _VALUES)  # over, still, score


@st.composite
def _module_reports(draw: st.DrawFn) -> list[tuple[int, list[tuple[bool, bool, float]]]]:
    """Reports of two ranks over one schema of a few modules, now and then another (a restarted agent)."""
    width = draw(st.integers(1, 4))
    reports = []
    for _ in range(draw(st.integers(0, 60))):
        n = width if draw(st.integers(0, 9)) else draw(st.integers(1, 4))
        reports.append((draw(st.integers(0, 1)), draw(st.lists(_MODULE, min_size=n, max_size=n))))
    return reports


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 3), _module_reports())
def test_hysteresis_skips_only_streak_updates_that_change_nothing(
    consecutive: int, resolve_after: int, min_reports: int, reports: list[tuple[int, list[tuple[bool, bool, float]]]]
) -> None:
    """Reports with no module over and no streak running leave the streaks alone: the same outcomes as a
    Hysteresis that recomputes them on every report (ranks, schema changes and warm-up included)."""
    quick = Hysteresis(consecutive=consecutive, resolve_after=resolve_after, min_reports=min_reports)
    counting = _AlwaysCounting(consecutive=consecutive, resolve_after=resolve_after, min_reports=min_reports)
    for rank, modules in reports:
        over, still, score = (np.array(column) for column in zip(*modules, strict=True))
        still = still | over  # what the detectors pass: over implies still abnormal
        assert quick.judge(rank, over, still, score) == counting.judge(rank, over, still, score)
        assert quick.firing(rank) == counting.firing(rank)
