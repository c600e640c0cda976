"""Preflight overfit check on real tiny models: one that can overfit a batch passes; broken set-ups fail with the
detectors that explain why."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from gradwatch.preflight import overfit_check  # noqa: E402


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _adam(lr: float) -> object:
    return lambda params: torch.optim.Adam(params, lr=lr)


def test_a_model_that_can_overfit_passes_and_the_callers_model_is_untouched() -> None:
    torch.set_num_threads(1)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    verdict = overfit_check(model, _batch(), torch.nn.functional.cross_entropy, _adam(1e-2), steps=200)
    assert verdict.passed, verdict
    assert len(verdict.losses) == 200 and verdict.final_loss < 0.05 * verdict.initial_loss
    assert not [f for f in verdict.fired if f.severity in ("warning", "critical")], verdict
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert "PASSED" in str(verdict)


def test_a_learning_rate_of_zero_fails_and_says_why() -> None:
    torch.set_num_threads(1)
    verdict = overfit_check(_model(), _batch(), torch.nn.functional.cross_entropy, _adam(0.0), steps=120)
    assert not verdict.passed
    assert verdict.final_loss == pytest.approx(verdict.initial_loss)
    assert "loss_not_decreasing" in verdict.detectors, verdict
    assert "frozen_parameters" in verdict.detectors, verdict
    text = str(verdict)
    assert "FAILED" in text and "loss_not_decreasing" in text and "broken" in text


def test_a_loss_detached_from_the_model_fails_with_frozen_layers() -> None:
    torch.set_num_threads(1)

    def broken_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The classic bug: the loss is computed from a copy that has left the graph (here multiplied away).
        return torch.nn.functional.cross_entropy(output * 0.0, target)

    verdict = overfit_check(_model(), _batch(), broken_loss, _adam(1e-2), steps=120)
    assert not verdict.passed
    frozen = [f for f in verdict.fired if f.detector == "frozen_parameters"]
    assert frozen and "without any gradient" in frozen[0].summary, verdict
    assert "loss_not_decreasing" in verdict.detectors, verdict


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="steps"):
        overfit_check(_model(), _batch(), torch.nn.functional.cross_entropy, _adam(1e-2), steps=5)
    with pytest.raises(ValueError, match="batch"):
        overfit_check(_model(), [1, 2], torch.nn.functional.cross_entropy, _adam(1e-2))  # type: ignore[arg-type]


def test_importing_preflight_does_not_import_torch() -> None:
    code = "import sys, gradwatch.preflight; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
