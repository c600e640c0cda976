"""Detectors on synthetic series (unit), then through gRPC with alerts merged across ranks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import pytest

from gradwatch.server.alerts import Alert
from gradwatch.server.app import ServerApp
from gradwatch.server.detectors import REGISTRY, Clear, Fire, Verdict
from gradwatch.server.detectors.exploding_gradient import ExplodingGradientConfig, ExplodingGradientDetector
from gradwatch.server.detectors.non_finite import NonFiniteConfig, NonFiniteDetector
from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import RankReport, build_report
from gradwatch.v1 import gradwatch_pb2 as pb
from server_support import columns, hello_frame, report_frame, run_stream, sample, scrape, start_app
from wait_support import wait_until

LAYERS = ("embed", "block.0", "block.1", "head")


def make_report(
    step: int,
    *,
    rank: int = 0,
    grad_norm: float = 1.0,
    loss: float | None = 0.5,
    flags: int = 0,
    layers: pb.LayerStats | None = None,
    **fields: Any,
) -> RankReport:
    frame = report_frame(step, grad_norm=grad_norm, loss=loss, flags=flags, layers=layers, **fields)
    return build_report("run", rank, frame.report, LAYERS, received_at=0.0)


def feed(detector: object, norms: Iterable[float], start: int = 1, rank: int = 0) -> list[tuple[int, Verdict]]:
    """(step, verdict) for every non-None verdict while feeding gradient norms."""
    out = []
    for step, norm in enumerate(norms, start=start):
        verdict = detector.observe(make_report(step, rank=rank, grad_norm=float(norm)))  # type: ignore[attr-defined]
        if verdict is not None:
            out.append((step, verdict))
    return out


# ------------------------------------------------------------------ registry


#: The catalogue of issue 4: stable names and their severities.
CATALOGUE_SEVERITIES = {
    "non_finite": "critical",
    "exploding_gradient": "critical",
    "loss_divergence": "critical",
    "loss_spike": "warning",
    "loss_not_decreasing": "warning",
    "vanishing_gradient": "warning",
    "dead_relu": "warning",
    "saturated_activation": "warning",
    "activation_not_centered": "warning",
    "input_not_normalized": "warning",
    "poor_weight_init": "warning",
    "update_ratio": "warning",
    "output_collapse": "warning",
    "class_imbalance": "warning",
    "frozen_parameters": "info",
    # gradients computed and never applied
    "gradients_not_applied": "warning",
    # issue 7: the cross-rank detectors
    "rank_divergence": "warning",
    "replica_mismatch": "critical",
    "straggler": "warning",
    "stalled": "critical",
    "throughput_drop": "warning",
    # the agent's guard
    "guard_skip": "warning",
    "guard_rollback": "warning",
    # hang localisation
    "collective_hang": "critical",
}


def test_registry_names_severities_runbooks_are_stable() -> None:
    names = [s.name for s in REGISTRY]
    assert names[:2] == ["non_finite", "exploding_gradient"]
    assert len(set(names)) == len(names)
    assert set(names) == set(CATALOGUE_SEVERITIES)  # every catalogued detector is registered, nothing else
    for spec in REGISTRY:
        assert spec.severity == CATALOGUE_SEVERITIES[spec.name], spec.name
        assert spec.runbook == f"docs/runbooks/{spec.name}.md"
        assert spec.config_type().enabled is True


# ------------------------------------------------------------------ non_finite


def _one_rank(det: NonFiniteDetector, report: RankReport) -> Verdict | None:
    """non_finite is cross-rank: a run of one rank judges each report at once."""
    findings = det.observe(report, RankTable(1))
    assert len(findings) <= 1 and all(f.rank == report.rank for f in findings), findings
    return findings[0].verdict if findings else None


def test_non_finite_fires_on_nan_loss_at_that_step() -> None:
    det = NonFiniteDetector(NonFiniteConfig())
    assert _one_rank(det, make_report(1)) is None
    verdict = _one_rank(det, make_report(2, loss=math.nan))
    assert isinstance(verdict, Fire) and verdict.step == 2
    assert "loss" in verdict.summary and "rank 0" in verdict.summary and verdict.layer is None


def test_non_finite_names_first_layer_from_agent_provenance() -> None:
    det = NonFiniteDetector(NonFiniteConfig())
    verdict = _one_rank(det, make_report(7, flags=pb.NON_FINITE_FLAG_GRADIENT, first_non_finite_layer=2))
    assert isinstance(verdict, Fire)
    assert verdict.layer == "block.1" and "gradient" in verdict.summary and "step 7" in verdict.summary


def test_non_finite_finds_layer_from_columns_and_counts_elements() -> None:
    det = NonFiniteDetector(NonFiniteConfig())
    layers = columns(4, grad_norm=[1, 1, 1, math.inf], grad_non_finite=[0, 0, 0, 12])
    verdict = _one_rank(det, make_report(3, layers=layers))
    assert isinstance(verdict, Fire) and verdict.layer == "head" and verdict.value == 12.0


def test_non_finite_weight_only_is_reported_as_weight() -> None:
    det = NonFiniteDetector(NonFiniteConfig())
    verdict = _one_rank(det, make_report(3, layers=columns(4, weight_non_finite=[0, 5, 0, 0])))
    assert isinstance(verdict, Fire) and verdict.layer == "block.0" and "non-finite weight" in verdict.summary


def test_non_finite_resolves_after_n_consecutive_finite_reports() -> None:
    det = NonFiniteDetector(NonFiniteConfig(resolve_after=5))
    _one_rank(det, make_report(1, grad_norm=math.nan))
    results = [_one_rank(det, make_report(s)) for s in range(2, 6)]  # 4 finite
    assert results == [None] * 4
    assert isinstance(_one_rank(det, make_report(6, grad_norm=math.inf)), Fire)  # streak restarts
    results = [_one_rank(det, make_report(s)) for s in range(7, 12)]
    assert results[:4] == [None] * 4 and results[4] == Clear(step=11)


def _two_ranks() -> RankTable:
    table = RankTable(2)
    for rank in (0, 1):
        table.join(rank, 2, "host", 0, 2, now=0.0)
    return table


def _arrive(det: NonFiniteDetector, table: RankTable, report: RankReport) -> list[Any]:
    table.report(report.rank, report.step, 0.1, None, now=report.received_at)  # the ingest updates it first
    return list(det.observe(report, table))


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_non_finite_names_the_rank_it_started_on_whichever_report_arrives_first(order: tuple[int, int]) -> None:
    """Rank 0's input was NaN; the all-reduce gave rank 1 NaN gradients with a finite input, forward and loss."""
    det, table = NonFiniteDetector(NonFiniteConfig()), _two_ranks()
    reports = {
        0: make_report(5, rank=0, loss=math.nan, grad_norm=math.nan, flags=pb.NON_FINITE_FLAG_INPUT),
        1: make_report(5, rank=1, grad_norm=math.nan, flags=pb.NON_FINITE_FLAG_GRADIENT),
    }
    first = _arrive(det, table, reports[order[0]])
    assert first == []  # held until the other rank has reported step 5
    findings = _arrive(det, table, reports[order[1]])
    assert [f.rank for f in findings] == [0, 1]  # the origin first: the alert opens with it
    origin, receiver = (f.verdict.summary for f in findings)
    assert "input batch" in origin and "rank(s) 1 only received it" in origin
    assert "rank 1's input, forward and loss were finite" in receiver and "from rank(s) 0" in receiver


def test_non_finite_waits_at_most_hold_s_for_a_silent_rank_and_says_when_no_forward_was_non_finite() -> None:
    det, table = NonFiniteDetector(NonFiniteConfig(hold_s=1.0)), _two_ranks()
    assert _arrive(det, table, make_report(5, rank=0, grad_norm=math.nan, flags=pb.NON_FINITE_FLAG_GRADIENT)) == []
    assert det.tick(table, now=0.5) == []
    (finding,) = det.tick(table, now=1.0)
    assert finding.rank == 0 and "arose in a backward pass" in finding.verdict.summary
    # Already firing: the next non-finite report fires at once.
    (again,) = _arrive(det, table, make_report(6, rank=0, grad_norm=math.nan))
    assert isinstance(again.verdict, Fire) and again.verdict.step == 6


# ------------------------------------------------------------------ exploding_gradient


def healthy_series(n: int, seed: int, sigma: float = 0.5) -> np.ndarray:
    """Lognormal noise on a decaying trend, after a warm-up spike of large early gradients."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    trend = 2.0 * np.exp(-t / 1500.0) + 0.5
    warmup = 1.0 + 40.0 * np.exp(-t / 3.0)
    return trend * warmup * rng.lognormal(0.0, sigma, n)


@pytest.mark.parametrize("seed", range(5))
def test_exploding_gradient_silent_on_noisy_healthy_series(seed: int) -> None:
    det = ExplodingGradientDetector(ExplodingGradientConfig())
    assert feed(det, healthy_series(3000, seed)) == []


def test_exploding_gradient_fires_on_jump_after_two_reports_and_resolves() -> None:
    cfg = ExplodingGradientConfig(resolve_after=10)
    det = ExplodingGradientDetector(cfg)
    rng = np.random.default_rng(0)
    base = rng.lognormal(0.0, 0.3, 200)
    series = np.concatenate([base, [80.0, 90.0, 100.0], rng.lognormal(0.0, 0.3, 30)])
    verdicts = feed(det, series)

    fires = [(s, v) for s, v in verdicts if isinstance(v, Fire)]
    assert [s for s, _ in fires] == [202, 203]  # not on the first spike report
    assert fires[0][1].value == pytest.approx(90.0)
    assert "baseline median" in fires[0][1].summary and "rank 0" in fires[0][1].summary
    clears = [s for s, v in verdicts if isinstance(v, Clear)]
    assert clears == [203 + cfg.resolve_after]


def test_exploding_gradient_single_spike_is_not_an_explosion() -> None:
    det = ExplodingGradientDetector(ExplodingGradientConfig())
    series = np.concatenate([np.ones(100), [500.0], np.ones(50)])
    assert feed(det, series) == []


def test_exploding_gradient_no_decision_during_warm_up() -> None:
    det = ExplodingGradientDetector(ExplodingGradientConfig(min_reports=20))
    assert feed(det, [1.0] * 5 + [1000.0] * 10 + [1.0] * 5) == []


def test_exploding_gradient_fires_on_sustained_growth_alone() -> None:
    # Thresholds so loose only the growth rule can fire.
    cfg = ExplodingGradientConfig(factor=1e9, mad_k=1e9)
    det = ExplodingGradientDetector(cfg)
    rng = np.random.default_rng(1)
    climb = 1.4 ** np.arange(1, 25) * rng.uniform(0.97, 1.03, 24)
    verdicts = feed(det, np.concatenate([rng.lognormal(0, 0.2, 100), climb]))
    fires = [v for _, v in verdicts if isinstance(v, Fire)]
    assert fires and "grew" in fires[0].summary


def test_exploding_gradient_one_final_spike_after_a_rising_stretch_is_not_growth() -> None:
    det = ExplodingGradientDetector(ExplodingGradientConfig())
    sawtooth = [1.0 + 0.01 * (i % 7) for i in range(60)]  # rises on 6 of every 7 reports
    assert feed(det, [*sawtooth, 250.0, 1.0, 1.0]) == []


def test_exploding_gradient_fires_on_growth_with_defaults() -> None:
    det = ExplodingGradientDetector(ExplodingGradientConfig())
    series = np.concatenate([np.full(100, 1.0), 1.5 ** np.arange(1, 20)])
    assert any(isinstance(v, Fire) for _, v in feed(det, series))


def test_exploding_gradient_ignores_non_finite_norms() -> None:
    det = ExplodingGradientDetector(ExplodingGradientConfig())
    assert feed(det, [1.0] * 50 + [math.nan, math.inf] * 5 + [1.0] * 10) == []


def test_exploding_gradient_ranks_have_separate_baselines() -> None:
    det = ExplodingGradientDetector(ExplodingGradientConfig())
    feed(det, [1.0] * 50, rank=0)
    feed(det, [1000.0] * 50, rank=1)  # a different but steady scale on another shard
    assert feed(det, [1000.0, 1000.0], start=51, rank=1) == []
    assert [type(v) for _, v in feed(det, [1000.0, 1000.0], start=51, rank=0)] == [Fire]


# ------------------------------------------------------------------ through gRPC


@pytest.fixture()
def app() -> Iterator[ServerApp]:
    app = start_app()
    yield app
    app.stop(grace=0)


def _send(
    app: ServerApp,
    rank: int,
    seqs: range,
    *,
    nan_at: AbstractSet[int] = frozenset(),
    layers: int = 0,
    norm: float = 1.0,
) -> None:
    frames = [hello_frame(run="merge", rank=rank, world_size=2, session=f"s{rank}", layers=layers)]
    for seq in seqs:
        bad = seq in nan_at
        layer_stats = None
        if layers:
            counts = np.zeros(layers)
            counts[1] = 3.0 if bad else 0.0
            layer_stats = columns(layers, grad_norm=1.0, grad_non_finite=counts)
        frames.append(report_frame(seq, loss=math.nan if bad else 0.5, grad_norm=norm, layers=layer_stats))
    run_stream(app.grpc_target, frames)


def test_non_finite_alert_merges_ranks_and_resolves_when_all_clear(app: ServerApp) -> None:
    events: list[Alert] = []
    app.add_alert_listener(events.append)

    _send(app, 0, range(1, 6), nan_at={5}, layers=4)
    _send(app, 1, range(1, 8), nan_at={7}, layers=4)
    # Rank 1's first non-finite report waits for rank 0's report of step 7 (which never comes: rank 0 stopped at
    # step 5) for at most hold_s, then the server's 1 s tick judges it.
    wait_until(lambda: app.alerts(state="firing")[0]["ranks"] == [0, 1], 10.0, what="the alert to name ranks 0 and 1",
               interval=0.05, detail=lambda: repr(app.alerts(state="firing")))  # fmt: skip
    [alert] = app.alerts(state="firing")
    assert alert["detector"] == "non_finite" and alert["run"] == "merge" and alert["severity"] == "critical"
    assert alert["ranks"] == [0, 1]
    assert alert["step"] == 5 and alert["last_step"] == 7
    assert alert["layer"] == "model.layers.1.linear"  # provenance from the first rank to fire
    assert "rank 0 at step 5" in alert["summary"]
    # One form of runbook link everywhere: the configured base URL, as notifications and incidents carry it.
    assert alert["runbook"] == app.renderer.runbook_url("non_finite") == app.config.alerting.runbook_base_url + (
        "non_finite.md"
    )
    assert alert["resolved_at"] is None
    text = scrape(app)
    assert sample(text, "gradwatch_alert_firing", run="merge", detector="non_finite") == 1
    assert sample(text, "gradwatch_detector_triggers_total", run="merge", detector="non_finite") == 2
    assert sample(text, "gradwatch_non_finite_events_total", run="merge", kind="loss") == 2
    assert sample(text, "gradwatch_non_finite_events_total", run="merge", kind="gradient") == 2

    _send(app, 0, range(6, 26))  # rank 0 recovers: rank 1 still firing
    assert [a["state"] for a in app.alerts(run="merge")] == ["firing"]
    _send(app, 1, range(8, 28))  # rank 1 recovers too

    [resolved] = app.alerts(run="merge")
    assert resolved["state"] == "resolved" and resolved["resolved_at"] is not None
    assert resolved["id"] == alert["id"]
    assert [e.state for e in events] == ["firing", "resolved"]
    assert sample(scrape(app), "gradwatch_alert_firing", run="merge", detector="non_finite") == 0


def test_exploding_gradient_alert_through_grpc_carries_norm_and_baseline(app: ServerApp) -> None:
    frames = [hello_frame(run="boom")]
    norms = [1.0 + 0.01 * (i % 7) for i in range(60)] + [250.0, 300.0]
    frames += [report_frame(seq, grad_norm=n) for seq, n in enumerate(norms, start=1)]
    responses = run_stream(app.grpc_target, frames)

    [alert] = app.alerts(run="boom", state="firing")
    assert alert["detector"] == "exploding_gradient"
    assert alert["step"] == 62 and alert["last_step"] == 62 and alert["value"] == pytest.approx(300.0)
    assert "baseline median" in alert["summary"]
    commands = [r.command for r in responses if r.WhichOneof("body") == "command"]
    assert commands and commands[0].kind == pb.COMMAND_KIND_FULL_STATS


def test_disabled_detector_never_fires() -> None:
    import dataclasses
    import types

    from server_support import server_config

    base = server_config()
    detectors = dict(base.detectors)
    detectors["non_finite"] = NonFiniteConfig(enabled=False)
    app = start_app(dataclasses.replace(base, detectors=types.MappingProxyType(detectors)))
    try:
        run_stream(app.grpc_target, [hello_frame(run="off"), report_frame(1, loss=math.nan)])
        assert app.alerts() == []
    finally:
        app.stop(grace=0)
