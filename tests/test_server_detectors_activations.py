"""Activation, input, output and label detectors on hand-built reports decoded by the real server code."""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
import yaml

from activation_support import LAYERS, MODULES, activation_report, schema
from gradwatch.server.config import load_config
from gradwatch.server.detectors import REGISTRY, Clear, Fire, Verdict
from gradwatch.server.detectors.activation_not_centered import (
    ActivationNotCenteredConfig,
    ActivationNotCenteredDetector,
)
from gradwatch.server.detectors.class_imbalance import ClassImbalanceConfig, ClassImbalanceDetector
from gradwatch.server.detectors.dead_relu import DeadReluConfig, DeadReluDetector
from gradwatch.server.detectors.input_not_normalized import InputNotNormalizedConfig, InputNotNormalizedDetector
from gradwatch.server.detectors.layerwise import Hysteresis
from gradwatch.server.detectors.output_collapse import OutputCollapseConfig, OutputCollapseDetector
from gradwatch.server.detectors.poor_weight_init import PoorWeightInitConfig, PoorWeightInitDetector
from gradwatch.server.detectors.saturated_activation import (
    SaturatedActivationConfig,
    SaturatedActivationDetector,
)
from gradwatch.server.report import RankReport
from gradwatch.v1 import gradwatch_pb2 as pb

MINE = (
    "dead_relu",
    "saturated_activation",
    "activation_not_centered",
    "input_not_normalized",
    "poor_weight_init",
    "output_collapse",
    "class_imbalance",
)
NAN = float("nan")


def run(detector: Any, reports: Iterable[RankReport]) -> list[tuple[int, Verdict]]:
    """(step, verdict) for every verdict while feeding `reports`."""
    return [(r.step, v) for r in reports if (v := detector.observe(r)) is not None]


def series(n: int, make: Callable[[int], RankReport], start: int = 1) -> list[RankReport]:
    return [make(step) for step in range(start, start + n)]


def fires(verdicts: list[tuple[int, Verdict]]) -> list[int]:
    return [step for step, v in verdicts if isinstance(v, Fire)]


def clears(verdicts: list[tuple[int, Verdict]]) -> list[int]:
    return [step for step, v in verdicts if isinstance(v, Clear)]


# ------------------------------------------------------------------ registry and config


def test_registry_lists_the_activation_detectors_as_warnings_with_runbooks() -> None:
    specs = {spec.name: spec for spec in REGISTRY}
    for name in MINE:
        spec = specs[name]
        assert spec.severity == "warning" and spec.inhibits == ()
        assert spec.runbook == f"docs/runbooks/{name}.md"
        assert spec.config_type().enabled is True
        assert all(doc for _, doc in spec.config_type.describe().values())


def test_config_yaml_overrides_and_rejects_bad_keys() -> None:
    config = load_config({"detectors": {"dead_relu": {"dead_fraction": 0.8, "module_types": ["ReLU", "ReLU6"]}}})
    dead = config.detector("dead_relu")
    assert isinstance(dead, DeadReluConfig) and dead.dead_fraction == 0.8
    with pytest.raises(ValueError, match=r"detectors\.dead_relu\.clear_fraction"):
        load_config({"detectors": {"dead_relu": {"dead_fraction": 0.3}}})  # clear 0.4 above fire 0.3
    with pytest.raises(ValueError, match=r"detectors\.class_imbalance\.min_ratios"):
        load_config({"detectors": {"class_imbalance": {"min_ratios": 0.2}}})
    with pytest.raises(ValueError, match=r"detectors\.input_not_normalized\.min_rms"):
        load_config({"detectors": {"input_not_normalized": {"min_rms": 20.0}}})
    with pytest.raises(ValueError, match=r"detectors\.output_collapse\.clear_relative_spread"):
        load_config({"detectors": {"output_collapse": {"clear_relative_spread": 0.001}}})


def test_hysteresis_warms_up_fires_on_streak_follows_worst_and_clears() -> None:
    h = Hysteresis(consecutive=2, resolve_after=2, min_reports=1)
    over = np.array([True, False, True])
    score = np.array([1.0, 0.0, 5.0])
    assert h.judge(0, over, over, score) is None  # warm-up
    assert h.judge(0, over, over, score) is None  # streak 1
    outcome = h.judge(0, over, over, score)
    assert outcome is not None and outcome.kind == "fire" and outcome.index == 2  # the worst ready module
    still = np.array([True, False, False])
    outcome = h.judge(0, np.zeros(3, bool), still, score)
    assert outcome is not None and outcome.kind == "fire" and outcome.index == 0  # past the clear threshold
    none = np.zeros(3, bool)
    assert h.judge(0, none, none, score) is None
    outcome = h.judge(0, none, none, score)
    assert outcome is not None and outcome.kind == "clear"
    assert h.judge(1, over, over, score) is None  # ranks are separate


# ------------------------------------------------------------------ dead_relu


def relu_report(step: int, dead: float, *, rank: int = 0, head: float = 0.0) -> RankReport:
    # modules: Linear, ReLU (judged), Linear, LeakyReLU (never judged), ReLU as the output module (left out)
    types = ("Linear", "ReLU", "Linear", "LeakyReLU", "ReLU")
    return activation_report(
        step, rank=rank, modules=schema(MODULES, types), acts={"dead_fraction": [0.0, dead, 0.0, 0.9, head]}
    )


def test_dead_relu_fires_after_consecutive_reports_naming_the_layer() -> None:
    det = DeadReluDetector(DeadReluConfig())
    verdicts = run(det, [relu_report(s, 0.1) for s in range(1, 4)] + [relu_report(s, 0.75) for s in range(4, 8)])
    assert fires(verdicts) == [6, 7]  # over on 4, 5, 6: three in a row
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and fire.layer == "net.1" and fire.value == 0.75
    assert "75%" in fire.summary and "'net.1'" in fire.summary and "rank 0" in fire.summary


def test_dead_relu_one_sparse_batch_is_not_a_dead_layer() -> None:
    det = DeadReluDetector(DeadReluConfig())
    values = [0.1, 0.1, 0.7, 0.2, 0.8, 0.6, 0.1, 0.9, 0.9, 0.2] * 3
    assert run(det, [relu_report(s, v) for s, v in enumerate(values, start=1)]) == []


def test_dead_relu_hysteresis_keeps_firing_between_thresholds_then_clears() -> None:
    det = DeadReluDetector(DeadReluConfig())
    values = [0.0] * 3 + [0.9] * 3 + [0.45, 0.45] + [0.2] * 5
    verdicts = run(det, [relu_report(s, v) for s, v in enumerate(values, start=1)])
    assert fires(verdicts) == [6, 7, 8] and clears(verdicts) == [13]


def test_dead_relu_small_batches_of_a_sparse_layer_read_high_without_paging() -> None:
    """Batches of 4: a healthy sparse layer reads 50-65 % "dead" every report; only a rise above that is death."""
    rng = np.random.default_rng(3)
    noisy = [float(v) for v in rng.uniform(0.5, 0.66, 40)]
    det = DeadReluDetector(DeadReluConfig())
    assert run(det, [relu_report(s, v) for s, v in enumerate(noisy, start=1)]) == []
    verdicts = run(det, [relu_report(s, 0.93) for s in range(41, 45)])
    assert fires(verdicts) == [43, 44]  # the layer died: 35 points above its usual level
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and "usually" in fire.summary


def test_dead_relu_fires_on_a_layer_dead_from_the_start() -> None:
    det = DeadReluDetector(DeadReluConfig())
    assert fires(run(det, [relu_report(s, 1.0) for s in range(1, 8)])) == [6, 7]


def test_dead_relu_ignores_leaky_units_the_output_module_and_reports_without_activations() -> None:
    det = DeadReluDetector(DeadReluConfig())
    assert run(det, [relu_report(s, 0.0, head=1.0) for s in range(1, 10)]) == []
    assert det.observe(activation_report(11)) is None


# ------------------------------------------------------------------ saturated_activation


def tanh_report(step: int, saturated: float, *, head: float = 0.0) -> RankReport:
    types = ("Linear", "Tanh", "Linear", "ReLU", "Sigmoid")
    return activation_report(
        step, modules=schema(MODULES, types), acts={"saturated_fraction": [NAN, saturated, NAN, NAN, head]}
    )


def test_saturated_activation_fires_on_a_saturated_tanh_and_clears() -> None:
    det = SaturatedActivationDetector(SaturatedActivationConfig())
    values = [0.0, 0.95, 0.95, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0]
    verdicts = run(det, [tanh_report(s, v) for s, v in enumerate(values, start=1)])
    assert fires(verdicts) == [4] and clears(verdicts) == [9]
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and fire.layer == "net.1" and "Tanh" in fire.summary and "95%" in fire.summary


def test_saturated_activation_leaves_a_confident_output_sigmoid_alone() -> None:
    det = SaturatedActivationDetector(SaturatedActivationConfig())
    assert run(det, [tanh_report(s, 0.0, head=1.0) for s in range(1, 10)]) == []


# ------------------------------------------------------------------ activation_not_centered


def centred_report(step: int, mean: float, std: float, *, saturated: float = NAN) -> RankReport:
    types = ("Linear", "Sigmoid", "Linear", "ReLU", "Linear")
    return activation_report(
        step,
        modules=schema(MODULES, types),
        acts={
            "mean": [5.0, mean, 9.0, 0.4, 40.0],  # layers (and the output) may be off-centre: not judged
            "std": [1.0, std, 1.0, 0.58, 1.0],
            "saturated_fraction": [NAN, saturated, NAN, NAN, NAN],
            "dead_fraction": [0.0, 0.0, 0.0, 0.1, 0.0],
        },
    )


def test_activation_not_centered_fires_on_sigmoid_outputs_after_warm_up() -> None:
    det = ActivationNotCenteredDetector(ActivationNotCenteredConfig())
    verdicts = run(det, [centred_report(s, 0.5, 0.2) for s in range(1, 10)])
    assert fires(verdicts) == [8, 9]  # 3 warm-up reports, then 5 in a row
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and fire.layer == "net.1" and fire.value == pytest.approx(2.5, rel=1e-5)
    assert "Sigmoid" in fire.summary and "|mean|/std 2.5" in fire.summary


def test_activation_not_centered_quiet_for_relu_tanh_like_and_saturated_modules() -> None:
    det = ActivationNotCenteredDetector(ActivationNotCenteredConfig())
    assert run(det, [centred_report(s, 0.05, 0.4) for s in range(1, 20)]) == []
    det = ActivationNotCenteredDetector(ActivationNotCenteredConfig())
    assert run(det, [centred_report(s, 0.99, 0.01, saturated=0.9) for s in range(1, 20)]) == []


def test_activation_not_centered_clears_when_centred_again() -> None:
    det = ActivationNotCenteredDetector(ActivationNotCenteredConfig())
    reports = [centred_report(s, 0.5, 0.2) for s in range(1, 9)] + [centred_report(s, 0.0, 0.5) for s in range(9, 14)]
    verdicts = run(det, reports)
    assert fires(verdicts) == [8] and clears(verdicts) == [13]


# ------------------------------------------------------------------ input_not_normalized


def input_report(step: int, mean: list[float], std: list[float], flags: int = 0) -> RankReport:
    return activation_report(step, input_mean=mean, input_std=std, flags=flags)


def test_input_not_normalized_fires_on_raw_pixel_scale() -> None:
    det = InputNotNormalizedDetector(InputNotNormalizedConfig())
    verdicts = run(det, [input_report(s, [120.0, 115.0, 100.0], [60.0, 58.0, 62.0]) for s in range(1, 5)])
    assert fires(verdicts) == [3, 4]
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and fire.layer == "input" and "off-scale" in fire.summary
    assert "feature 0" in fire.summary


def test_input_not_normalized_fires_on_off_centre_features_and_ignores_constant_ones() -> None:
    det = InputNotNormalizedDetector(InputNotNormalizedConfig())
    mean, std = [3.0, 2.5, 4.0, 1.0], [1.0, 1.0, 1.5, 0.0]  # the last one is a constant bias column
    verdicts = run(det, [input_report(s, mean, std) for s in range(1, 4)])
    assert fires(verdicts) == [3]
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and "not centred" in fire.summary


def test_input_not_normalized_quiet_on_standardised_noisy_batches() -> None:
    rng = np.random.default_rng(0)
    det = InputNotNormalizedDetector(InputNotNormalizedConfig())
    reports = [input_report(s, list(rng.normal(0, 0.3, 16)), list(rng.uniform(0.6, 1.4, 16))) for s in range(1, 60)]
    assert run(det, reports) == []
    det = InputNotNormalizedDetector(InputNotNormalizedConfig())  # [0, 1] images: mean 0.45, std 0.25 per channel
    assert run(det, [input_report(s, [0.45, 0.44, 0.41], [0.25, 0.24, 0.26]) for s in range(1, 20)]) == []


def test_input_not_normalized_non_finite_input_fires_at_once_and_clears() -> None:
    det = InputNotNormalizedDetector(InputNotNormalizedConfig())
    ok = ([0.0, 0.1], [1.0, 1.0])
    reports = [input_report(1, *ok), activation_report(2, flags=pb.NON_FINITE_FLAG_INPUT)]
    reports += [activation_report(s) for s in range(3, 7)] + [input_report(7, *ok)]
    verdicts = run(det, reports)
    assert fires(verdicts) == [2] and clears(verdicts) == [7]
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and "NaN or Inf" in fire.summary and fire.layer == "input"


# ------------------------------------------------------------------ poor_weight_init


def init_report(step: int, stds: list[float], spread: list[float] | None = None, **kw: Any) -> RankReport:
    types = ("Linear", "Tanh", "Linear", "Tanh", "Linear")
    acts = {"std": stds, "unit_spread": spread if spread is not None else [s * 0.8 for s in stds]}
    return activation_report(step, modules=schema(MODULES, types), acts=acts, **kw)


def test_poor_weight_init_fires_on_activations_vanishing_with_depth() -> None:
    det = PoorWeightInitDetector(PoorWeightInitConfig())
    verdicts = run(det, [init_report(s, [0.5, 0.4, 1e-3, 2e-4, 1e-5]) for s in range(1, 3)])
    assert fires(verdicts) == [2]
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and fire.layer == "net.3" and "vanishes with depth" in fire.summary


def test_poor_weight_init_fires_on_symmetric_units_naming_the_layer() -> None:
    det = PoorWeightInitDetector(PoorWeightInitConfig())
    stds = [0.5, 0.4, 0.3, 0.3, 0.2]
    verdicts = run(det, [init_report(s, stds, spread=[1e-7, 1e-7, 0.2, 0.2, NAN]) for s in range(1, 3)])
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and fire.layer == "net.0" and "same value" in fire.summary


def test_poor_weight_init_fires_on_zero_layers_and_only_at_the_start() -> None:
    stds = [0.5, 0.4, 0.3, 0.3, 0.2]
    zero = {"grad_norm": [0.0, 0.3, 0.1], "weight_norm": [0.0, 2.0, 1.0]}
    det = PoorWeightInitDetector(PoorWeightInitConfig())
    verdicts = run(det, [init_report(s, stds, layers=zero) for s in range(1, 3)])
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and fire.layer == LAYERS[0] and "all-zero weights" in fire.summary
    late = PoorWeightInitDetector(PoorWeightInitConfig())
    reports = [init_report(s, stds) for s in range(1, 6)] + [init_report(s, stds, layers=zero) for s in range(6, 12)]
    assert run(late, reports) == []  # the start window (5 full reports) is over


@pytest.mark.parametrize("first_full", [1, 4])
def test_poor_weight_init_blames_no_initialisation_after_training_ran_away(first_full: int) -> None:
    """Reports that arrive after the rank's gradient norm ran 1000x beyond its first (a learning rate that wrecked
    the weights in its first updates) say nothing of the initialisation, whenever the full ones come (the agent's
    interval, or a server command after another alert). The same full reports without the runaway fire."""
    exploding = [0.5, 3.0, 40.0, 700.0, 9e3]  # explodes with depth: 1.8e4x
    ordinary = [dataclasses.replace(init_report(s, []), activations={}, grad_norm=norm)
                for s, norm in ((1, 0.9), (2, 1.5), (3, 7.7e4))]  # fmt: skip
    full = [init_report(s, exploding) for s in range(first_full + 3, first_full + 6)]
    assert run(PoorWeightInitDetector(PoorWeightInitConfig()), ordinary + full) == []
    calm = [dataclasses.replace(r, grad_norm=1.0) for r in ordinary]
    assert fires(run(PoorWeightInitDetector(PoorWeightInitConfig()), calm + full))[:1] == [first_full + 4]


def test_poor_weight_init_ignores_layers_this_rank_holds_nothing_of() -> None:
    """An FSDP2 rank's empty shard reads as all-zero weights and gradients: not a zero initialisation."""
    stds = [0.5, 0.4, 0.3, 0.3, 0.2]
    zero = {"grad_norm": [0.0, 0.3, 0.1], "weight_norm": [0.0, 2.0, 1.0]}
    empty_here = np.array([0, 96, 17])
    det = PoorWeightInitDetector(PoorWeightInitConfig())
    reports = [dataclasses.replace(init_report(s, stds, layers=zero), local_param_counts=empty_here) for s in (1, 2)]
    assert run(det, reports) == []
    det = PoorWeightInitDetector(PoorWeightInitConfig())  # the same rank holding its share: a real zero layer
    held = [dataclasses.replace(r, local_param_counts=np.array([4, 96, 17])) for r in reports]
    assert fires(run(det, held)) == [2]


def test_poor_weight_init_quiet_on_a_healthy_start_and_clears_when_fixed() -> None:
    det = PoorWeightInitDetector(PoorWeightInitConfig())
    assert run(det, [init_report(s, [1.0, 0.6, 0.5, 0.4, 0.3]) for s in range(1, 30)]) == []
    det = PoorWeightInitDetector(PoorWeightInitConfig())
    bad = [init_report(s, [0.5, 0.4, 1e-3, 2e-4, 1e-5]) for s in range(1, 4)]
    good = [init_report(s, [1.0, 0.6, 0.5, 0.4, 0.3]) for s in range(4, 9)]
    verdicts = run(det, bad + good)
    assert fires(verdicts) == [2, 3] and clears(verdicts) == [8]


# ------------------------------------------------------------------ output_collapse


def test_output_collapse_fires_when_outputs_stop_depending_on_the_input() -> None:
    det = OutputCollapseDetector(OutputCollapseConfig())
    reports = [activation_report(s, output_spread=0.8, output_rms=1.5) for s in range(1, 4)]
    reports += [activation_report(s, output_spread=1e-4, output_rms=2.0) for s in range(4, 7)]
    reports += [activation_report(s, output_spread=0.5, output_rms=1.0) for s in range(7, 12)]
    verdicts = run(det, reports)
    assert fires(verdicts) == [6] and clears(verdicts) == [11]
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and fire.value == pytest.approx(5e-5) and "same output" in fire.summary


def test_output_collapse_all_zero_output_counts_and_missing_spread_is_not_judged() -> None:
    det = OutputCollapseDetector(OutputCollapseConfig())
    reports = [activation_report(s, output_spread=0.0, output_rms=0.0) for s in range(1, 5)]
    assert fires(run(det, reports)) == [4]
    quiet = OutputCollapseDetector(OutputCollapseConfig())
    assert run(quiet, [activation_report(s, output_rms=1.0) for s in range(1, 10)]) == []


# ------------------------------------------------------------------ class_imbalance


def test_class_imbalance_fires_once_enough_labels_are_seen() -> None:
    det = ClassImbalanceDetector(ClassImbalanceConfig())
    verdicts = run(det, [activation_report(s, labels=[60, 3, 20]) for s in range(1, 8)])
    assert fires(verdicts) == [7]  # 83 labels per report: 498 after six reports, under min_samples
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and "class 1" in fire.summary and "class 0" in fire.summary


def test_class_imbalance_quiet_on_balanced_labels_and_waits_for_enough_per_class() -> None:
    rng = np.random.default_rng(1)
    det = ClassImbalanceDetector(ClassImbalanceConfig())
    assert run(det, [activation_report(s, labels=list(rng.multinomial(32, [0.1] * 10))) for s in range(1, 200)]) == []
    det = ClassImbalanceDetector(ClassImbalanceConfig())  # 100 classes, 600 labels: too few per class to judge
    assert run(det, [activation_report(s, labels=[2.0] * 99 + [4.0]) for s in range(1, 4)]) == []


def test_class_imbalance_counts_a_missing_class_and_clears_when_balanced() -> None:
    det = ClassImbalanceDetector(ClassImbalanceConfig())
    reports = [activation_report(s, labels=[300, 0, 300]) for s in range(1, 3)]
    reports += [activation_report(s, labels=[100, 600, 100]) for s in range(3, 5)]
    verdicts = run(det, reports)
    assert fires(verdicts) == [1, 2] and clears(verdicts) == [3]
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and fire.value == 0.0 and "class 1 has 0" in fire.summary


def test_documented_defaults_match_the_code() -> None:
    """docs/configuration.md lists every setting of these detectors with its default value."""
    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]
    documented = next(b["detectors"] for b in blocks if isinstance(b, dict) and "detectors" in b)
    specs = {spec.name: spec for spec in REGISTRY}
    for name in MINE:
        defaults = dataclasses.asdict(specs[name].config_type())
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
        assert documented[name] == values, name
    load_config({"detectors": {name: documented[name] for name in MINE}})  # and the server accepts them as written


def test_input_not_normalized_clears_once_inputs_are_standardised_and_flags_all_zero_inputs() -> None:
    det = InputNotNormalizedDetector(InputNotNormalizedConfig())
    raw = [input_report(s, [120.0, 110.0], [60.0, 55.0]) for s in range(1, 4)]
    fixed = [input_report(s, [0.05, -0.1], [1.0, 0.9]) for s in range(4, 9)]
    verdicts = run(det, raw + fixed)
    assert fires(verdicts) == [3] and clears(verdicts) == [8]
    zeros = InputNotNormalizedDetector(InputNotNormalizedConfig())
    verdicts = run(zeros, [input_report(s, [0.0, 0.0], [0.0, 0.0]) for s in range(1, 4)])
    assert fires(verdicts) == [3]
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and "RMS 0" in fire.summary


def test_poor_weight_init_names_the_deepest_module_when_activations_explode() -> None:
    types = ("Linear", "ReLU", "Linear", "ReLU", "Linear")
    acts = {"std": [1.0, 0.8, 40.0, 300.0, 1.0], "unit_spread": [0.8, 0.6, 30.0, 200.0, NAN]}
    det = PoorWeightInitDetector(PoorWeightInitConfig())
    verdicts = run(det, [activation_report(s, modules=schema(MODULES, types), acts=acts) for s in (1, 2)])
    fire = verdicts[0][1]
    assert isinstance(fire, Fire) and fire.layer == "net.3" and "explodes with depth" in fire.summary
