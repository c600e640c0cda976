"""Server side of loss-scaler skips and of the exact global gradient norm across ranks (no torch here)."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from gradwatch.server.config import LimitsConfig
from gradwatch.server.detectors import REGISTRY, Fire
from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import KIND_LOSS, build_report
from gradwatch.server.store import GLOBAL_PENDING_STEPS, RunStore
from gradwatch.server.validate import INVALID_REPORT, FrameRejected, StreamValidator
from gradwatch.v1 import gradwatch_pb2 as pb
from server_support import columns, hello, hello_frame, report_frame

NAMES = ("a", "b")


def _report(step: int, **fields: object) -> pb.StepReport:
    return report_frame(step, **fields).report  # type: ignore[arg-type]


def test_report_skipped_step_is_neither_non_finite_nor_a_gradient_norm() -> None:
    inf = math.inf
    msg = _report(3, grad_norm=inf, flags=pb.NON_FINITE_FLAG_GRADIENT, skipped_step=True, loss_scale=512.0,
                  layers=columns(2, grad_norm=[1.0, inf], grad_non_finite=[0, 3], weight_norm=1.0),
                  first_non_finite_layer=1, grad_global_share=inf)  # fmt: skip
    report = build_report("r", 0, msg, NAMES, 0.0)
    assert report.skipped and report.non_finite_kinds == () and report.non_finite_layer is None
    assert math.isnan(report.grad_norm) and report.grad_global_share is None
    assert set(report.columns) == {"weight_norm"}  # scaled gradient columns are dropped
    nan_loss = build_report("r", 0, _report(4, loss=math.nan, skipped_step=True, grad_norm=inf), NAMES, 0.0)
    assert nan_loss.non_finite_kinds == (KIND_LOSS,)  # a non-finite loss is real, skipped or not


def test_detectors_stay_quiet_on_skipped_steps_after_a_healthy_baseline() -> None:
    detectors = [spec.factory(spec.config_type()) for spec in REGISTRY if spec.scope == "rank"]
    verdicts = []
    for step in range(1, 61):
        skipped = step % 7 == 0  # the scaler skips every seventh step (scale too high), gradients Inf
        msg = _report(step, grad_norm=math.inf if skipped else 1.0 + 0.01 * (step % 3),
                      flags=pb.NON_FINITE_FLAG_GRADIENT if skipped else 0, skipped_step=skipped)  # fmt: skip
        report = build_report("r", 0, msg, NAMES, float(step))
        verdicts += [v for d in detectors if isinstance(v := d.observe(report), Fire)]
    assert verdicts == []


def _store(world_size: int) -> tuple[RunStore, list[object]]:
    store = RunStore(LimitsConfig(), detector_names=(), clock=lambda: 0.0)
    joined = [store.join(hello(run="g", rank=r, world_size=world_size, session=f"s{r}")) for r in range(world_size)]
    return store, joined


def test_store_global_grad_norm_sums_every_rank_share_of_a_step() -> None:
    store, joined = _store(3)
    shares = {1: [1.0, 2.0, 6.0], 2: [0.25, 0.5, 0.25]}
    for step in (1, 2):
        for rank, (run, state, _) in enumerate(joined):  # type: ignore[misc]
            assert run.global_grad_norm_step == (None if step == 1 else 1)  # not before every rank reported
            msg = _report(step, grad_global_share=shares[step][rank])
            store.record_report(run, state, build_report("g", rank, msg, (), 0.0), state.schema)
    run = store.get("g")
    assert run is not None
    assert list(run.global_grad_norms) == [(1, 3.0), (2, 1.0)]
    assert (run.global_grad_norm, run.global_grad_norm_step) == (1.0, 2)
    assert not run.pending_shares


def test_store_global_grad_norm_counts_a_resent_share_once_and_bounds_waiting_steps() -> None:
    store, joined = _store(2)
    run, state, _ = joined[0]  # type: ignore[misc]
    for step in range(1, GLOBAL_PENDING_STEPS + 10):  # rank 1 never reports: steps wait, bounded
        for _ in range(2):
            store.record_report(run, state, build_report("g", 0, _report(step, grad_global_share=4.0), (), 0.0),
                                state.schema)  # fmt: skip
    assert len(run.pending_shares) == GLOBAL_PENDING_STEPS and run.global_grad_norm is None
    assert all(shares == {0: 4.0} for shares in run.pending_shares.values())


def test_validation_rejects_negative_global_share_and_loss_scale() -> None:
    for field, value in (("grad_global_share", -1.0), ("loss_scale", -2.0), ("loss_scale", math.nan)):
        validator = StreamValidator(LimitsConfig())
        validator.check(hello_frame())
        with pytest.raises(FrameRejected) as info:
            validator.check(report_frame(1, **{field: value}))
        assert (info.value.reason, info.value.code) == (INVALID_REPORT, grpc.StatusCode.INVALID_ARGUMENT)
        assert field in info.value.message
    validator = StreamValidator(LimitsConfig())
    validator.check(hello_frame())
    validator.check(report_frame(1, grad_global_share=math.nan, loss_scale=0.0))  # a NaN share is data
    assert np.isnan(build_report("r", 0, report_frame(1, grad_global_share=math.nan).report, (), 0.0)
                    .grad_global_share)  # fmt: skip


def _activation_hello() -> pb.AgentFrame:
    frame = hello_frame(layers=2)
    frame.hello.activation_schema.names.extend(["net.0", "net.1", "net.2"])
    frame.hello.activation_schema.module_types.extend(["Linear", "ReLU", "Linear"])
    return frame


def test_validation_checks_activation_columns_and_provenance_against_the_activation_schema() -> None:
    bad_frames = {
        "first_non_finite_module": report_frame(1, first_non_finite_module=3),
        "ActivationStats.mean": report_frame(1, activations=pb.ActivationStats(mean=b"\0" * 8)),
        "input_mean and input_std": report_frame(1, input_mean=b"\0" * 4),
        "label_histogram": report_frame(1, label_histogram=b"\0" * 3),
    }
    for what, frame in bad_frames.items():
        validator = StreamValidator(LimitsConfig())
        validator.check(_activation_hello())
        with pytest.raises(FrameRejected) as info:
            validator.check(frame)
        assert what in info.value.message
    validator = StreamValidator(LimitsConfig())
    validator.check(_activation_hello())
    validator.check(report_frame(1, first_non_finite_module=2, activations=pb.ActivationStats(mean=b"\0" * 12),
                                 input_mean=b"\0" * 8, input_std=b"\0" * 8, label_histogram=b"\0" * 40))  # fmt: skip


def test_non_finite_alert_names_where_the_nan_started() -> None:
    modules = _activation_hello().hello.activation_schema
    detector = next(spec.factory(spec.config_type()) for spec in REGISTRY if spec.name == "non_finite")
    flags = pb.NON_FINITE_FLAG_LOSS | pb.NON_FINITE_FLAG_ACTIVATION
    ranks = RankTable(2)  # non_finite is cross-rank; no rank has joined, so nothing waits for a peer
    msg = _report(5, loss=math.nan, flags=flags, first_non_finite_module=1)
    (finding,) = detector.observe(build_report("r", 0, msg, NAMES, 0.0, modules), ranks)
    verdict = finding.verdict
    assert isinstance(verdict, Fire) and "started in the module 'net.1' (ReLU)" in verdict.summary
    msg = _report(6, loss=math.nan, flags=flags | pb.NON_FINITE_FLAG_INPUT, first_non_finite_module=0)
    (finding,) = detector.observe(build_report("r", 1, msg, NAMES, 0.0, modules), ranks)
    verdict = finding.verdict
    assert isinstance(verdict, Fire) and "started in the input batch" in verdict.summary


def test_run_view_shows_the_cadence_in_force_and_the_overhead_budget() -> None:
    from gradwatch.server.views import run_view

    store, joined = _store(1)
    run, state, _ = joined[0]  # type: ignore[misc]
    (rank,) = run_view(run, [])["ranks"]
    assert (rank["full_stats_interval_in_force"], rank["over_budget"]) == (0, False)  # Hello's (0 here)
    msg = _report(1, full_stats_interval=10000, over_budget=True)
    store.record_report(run, state, build_report("g", 0, msg, (), 0.0), state.schema)
    (rank,) = run_view(run, [])["ranks"]
    assert (rank["full_stats_interval_in_force"], rank["over_budget"]) == (10000, True)


def test_validation_bounds_the_activation_schema() -> None:
    from gradwatch.server.validate import INVALID_SCHEMA, LIMIT_EXCEEDED, check_hello

    limits = LimitsConfig(max_layers_per_schema=2)
    too_many = hello()
    too_many.activation_schema.names.extend(["a", "b", "c"])
    with pytest.raises(FrameRejected) as info:
        check_hello(too_many, limits)
    assert info.value.reason == LIMIT_EXCEEDED and info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    mismatched = hello()
    mismatched.activation_schema.names.extend(["a", "b"])
    mismatched.activation_schema.module_types.append("ReLU")
    with pytest.raises(FrameRejected) as info:
        check_hello(mismatched, limits)
    assert info.value.reason == INVALID_SCHEMA
