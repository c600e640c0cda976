"""loss_spike on runs whose batch losses are heavy-tailed (server/detectors/loss_spike.py, `admitted_k`): the
bulk of the losses gets quieter as the run converges while its outlying batches keep coming, so the robust noise
margin shrinks under excursions the run makes all the time. pytorch/examples `regression` (a linear model on
x..x^4 features, smooth L1) warned 4 times at the old defaults (bench/real_programs.py --programs regression).

The runs here are that class, generated: SGD on polynomial features of standard normal inputs (degree 2-4, batch
16-64, learning rate 0.02-0.1), computed with numpy (the detector reads losses only). Healthy, they must mostly
stay quiet; with one batch's targets scaled 50x they must all fire at that batch.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from gradwatch.server.detectors import Fire
from gradwatch.server.detectors.loss_spike import LossSpikeConfig, LossSpikeDetector

RUNS = 60


def fired(losses: list[float], config: LossSpikeConfig) -> list[int]:
    detector = LossSpikeDetector(config)
    steps = []
    for step, loss in enumerate(losses, start=1):
        if isinstance(detector.observe(SimpleNamespace(rank=0, step=step, loss=loss)), Fire):  # type: ignore[arg-type]
            steps.append(step)
    return steps


def regression(seed: int, bad_at: int | None = None) -> list[float]:
    """Batch losses of one SGD run fitting a random polynomial with a linear model on its powers of x."""
    rng = np.random.default_rng(seed)
    degree, batch = int(rng.integers(2, 5)), int(rng.integers(16, 65))
    lr, steps = float(rng.uniform(0.02, 0.1)), 800
    target_w, target_b = rng.standard_normal(degree) * 5, float(rng.standard_normal()) * 5
    w, b = rng.uniform(-0.5, 0.5, degree), 0.0
    losses = []
    for step in range(1, steps + 1):
        x = rng.standard_normal(batch)
        features = np.stack([x**power for power in range(1, degree + 1)], axis=1)
        y = features @ target_w + target_b
        if step == bad_at:
            y = y * 50.0
        error = features @ w + b - y
        size = np.abs(error)
        losses.append(float(np.where(size < 1.0, 0.5 * error**2, size - 0.5).mean()))  # smooth L1
        grad = np.clip(error, -1.0, 1.0) / batch
        w, b = w - lr * (features.T @ grad), b - lr * float(grad.sum())
    return losses


def test_heavy_tailed_healthy_runs_mostly_stay_quiet_and_every_bad_batch_fires() -> None:
    defaults, without = LossSpikeConfig(), LossSpikeConfig(admitted_k=0.0)
    assert defaults.admitted_k == 2.0
    runs = [regression(seed) for seed in range(RUNS)]
    warned = [seed for seed, losses in enumerate(runs) if fired(losses, defaults)]
    warned_without = [seed for seed, losses in enumerate(runs) if fired(losses, without)]
    # Measured on these 60: 13 warned without the rule, 4 with it (on seeds 0-99: 19 and 5).
    assert len(warned) <= RUNS // 10 < len(warned_without), (warned, warned_without)
    rng = np.random.default_rng(0)
    for seed in range(0, RUNS, 4):
        bad_at = int(rng.integers(300, 700))
        assert bad_at in fired(regression(seed, bad_at), defaults), seed


def test_a_spike_must_rise_past_twice_the_largest_admitted_excess() -> None:
    """The rule's contract on a hand-made series: 0.01 noise around 1.0 with one excursion of +0.1 that the
    12-sigma margin admits, then a jump just under and one just over twice the largest admitted excess (the
    factor and starting-level margins set out of the way)."""
    config = LossSpikeConfig(factor=1.01, min_rise=0.0)
    rng = np.random.default_rng(1)
    base = [1.0 + 0.01 * float(v) for v in rng.standard_normal(90)]
    base[60] = 1.1
    detector = LossSpikeDetector(config)
    for step, loss in enumerate(base, start=1):
        assert not isinstance(detector.observe(SimpleNamespace(rank=0, step=step, loss=loss)), Fire)  # type: ignore[arg-type]
    largest = max(detector._excess[0])  # the admitted excesses the rule reads (about 0.1, from step 61)
    assert 0.08 < largest < 0.12
    assert fired([*base, 1.0 + 1.9 * largest], config) == []
    assert fired([*base, 1.0 + 2.1 * largest], config) == [len(base) + 1]
    # Without the rule both jumps are beyond 12 sigma.
    off = LossSpikeConfig(factor=1.01, min_rise=0.0, admitted_k=0.0)
    assert fired([*base, 1.0 + 1.9 * largest], off) == [len(base) + 1]
