"""Detectors: one module each, all listed in gradwatch.server.detectors.REGISTRY.

Adding a detector: write a module with a `*Config` (DetectorConfig subclass with
documented defaults), the detector class and a `SPEC`, then add the SPEC here. A detector that judges only
some parts of a report (per-layer columns, activations...) names them in `needs`, so that the ingestor does not
call it on the reports without them (base.py, "What a detector is shown").
Cross-rank detectors (scope "run": non_finite, rank_divergence, replica_mismatch, straggler,
stalled, collective_hang, throughput_drop) follow the RunDetector contract in base.py. Its
settings appear under `detectors.<name>` in the server's YAML file, its alerts carry
`runbook` = alerting.runbook_base_url + <name>.md (docs/runbooks/<name>.md in the repository; the same link
in the API, notifications, incidents and the Prometheus and Grafana rules), and /metrics exports it in
gradwatch_alert_firing and gradwatch_detector_triggers_total for every run.
"""

from __future__ import annotations

from gradwatch.server.detectors import (
    activation_not_centered,
    class_imbalance,
    collective_hang,
    dead_relu,
    exploding_gradient,
    frozen_parameters,
    gradients_not_applied,
    guard_rollback,
    guard_skip,
    input_not_normalized,
    loss_divergence,
    loss_not_decreasing,
    loss_spike,
    non_finite,
    output_collapse,
    poor_weight_init,
    rank_divergence,
    replica_mismatch,
    saturated_activation,
    stalled,
    straggler,
    throughput_drop,
    update_ratio,
    vanishing_gradient,
)
from gradwatch.server.detectors.base import (
    TICK_INTERVAL_S,
    Clear,
    Detector,
    DetectorConfig,
    DetectorSpec,
    Finding,
    Fire,
    RunDetector,
    Verdict,
    alert_name_for,
)

__all__ = [
    "REGISTRY",
    "TICK_INTERVAL_S",
    "Clear",
    "Detector",
    "DetectorConfig",
    "DetectorSpec",
    "Finding",
    "Fire",
    "RunDetector",
    "Verdict",
    "alert_name_for",
    "inhibitions",
    "spec_by_name",
]

#: Every detector the server runs, in evaluation order. Names are stable API
#: (metric label values, alert identity, runbook file names).
REGISTRY: tuple[DetectorSpec, ...] = (
    non_finite.SPEC,
    exploding_gradient.SPEC,
    loss_divergence.SPEC,
    loss_spike.SPEC,
    loss_not_decreasing.SPEC,
    vanishing_gradient.SPEC,
    dead_relu.SPEC,
    saturated_activation.SPEC,
    activation_not_centered.SPEC,
    input_not_normalized.SPEC,
    poor_weight_init.SPEC,
    update_ratio.SPEC,
    output_collapse.SPEC,
    class_imbalance.SPEC,
    frozen_parameters.SPEC,
    gradients_not_applied.SPEC,
    rank_divergence.SPEC,
    replica_mismatch.SPEC,
    straggler.SPEC,
    stalled.SPEC,
    collective_hang.SPEC,
    throughput_drop.SPEC,
    guard_skip.SPEC,
    guard_rollback.SPEC,
)


def spec_by_name(name: str) -> DetectorSpec:
    """The registered spec called `name`; KeyError naming the known ones otherwise."""
    for spec in REGISTRY:
        if spec.name == name:
            return spec
    raise KeyError(f"no detector {name!r} (known: {', '.join(s.name for s in REGISTRY)})")


def inhibitions(specs: tuple[DetectorSpec, ...] = REGISTRY) -> dict[str, frozenset[str]]:
    """Source detector -> detectors it inhibits for the same run (the data behind every inhibition
    rule: the server's notifier and deploy/alertmanager/alertmanager.yml)."""
    return {spec.name: frozenset(spec.inhibits) for spec in specs if spec.inhibits}
