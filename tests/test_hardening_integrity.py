"""Runs cannot be changed, pushed out or taken over by other clients (issue: hardening, items 1–3).

Every test runs a real server; each fails on a server without these rules (settings changed by a later
Hello, eviction resolving alerts, bindings lost on eviction, unbounded ranks).
"""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
import typing
from pathlib import Path

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.server.config import LimitsConfig, ServerConfig, StorageConfig
from gradwatch.server.detectors import REGISTRY
from gradwatch.server.settings import Settings, bounds
from gradwatch.v1 import gradwatch_pb2 as pb
from hardening_support import NAN, flush_outcome, stream_outcome
from security_support import secure_config, write_tokens
from server_support import AgentStream, hello, hello_frame, metric, report_frame, scrape, server_config, start_app
from wait_support import wait_until

OK = grpc.StatusCode.OK


# ---------------------------------------------------------------------- item 1: settings fixed by the first Hello


def test_a_later_hello_cannot_change_a_runs_detector_settings() -> None:
    """The victim starts without settings (the defaults); another session's `non_finite.enabled=false` is
    refused with a reason and counted, and the victim's NaN still pages."""
    app = start_app()
    victim = AgentStream(app.grpc_target)
    try:
        victim.send(hello_frame(run="victim", world_size=2))
        assert victim.recv().WhichOneof("body") == "welcome"
        attack = hello(run="victim", rank=1, world_size=2, session="evil",
                       detector_settings={"non_finite.enabled": "false"})  # fmt: skip
        code, reason, details = stream_outcome(app.grpc_target, [pb.AgentFrame(hello=attack)])
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "detector_settings_conflict"), details
        assert "non_finite.enabled" in details
        assert flush_outcome(app.grpc_target, attack)[:2] == (code, reason)
        victim.send(report_frame(1, grad_norm=NAN))
        victim.recv_ack(1)
        assert app.alert_book.firing_alert("victim", "non_finite") is not None
        assert metric(scrape(app), "gradwatch_ingest_errors_total", reason="detector_settings_conflict") == 2
        # The same settings as the first Hello (none) are fine for the second rank.
        assert stream_outcome(app.grpc_target, [hello_frame(run="victim", rank=1, world_size=2, session="ok")])[0] == OK
    finally:
        victim.close()
        app.stop(grace=0)


def test_settings_fixed_by_a_first_hello_with_settings_are_compared_by_value() -> None:
    app = start_app()
    try:
        first = {"exploding_gradient.factor": "20", "stalled.floor_s": "600"}
        assert stream_outcome(app.grpc_target, [hello_frame(run="r", detector_settings=first)])[0] == OK
        same = {"exploding_gradient.factor": "20.0", "stalled.floor_s": "6e2"}
        assert stream_outcome(app.grpc_target, [hello_frame(run="r", session="s2", detector_settings=same)])[0] == OK
        for other in ({}, {"exploding_gradient.factor": "20"}, {**first, "loss_spike.factor": "5"}):
            code, reason, _ = stream_outcome(app.grpc_target, [hello_frame(run="r", session="s3",
                                                                           detector_settings=other)])  # fmt: skip
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "detector_settings_conflict"), other
    finally:
        app.stop(grace=0)


def test_a_huge_window_setting_is_refused_and_the_run_keeps_working() -> None:
    """`throughput_drop.window=1e12` once made every later report fail allocating 7 TiB."""
    app = start_app()
    try:
        for value in ("1000000000000", "1e12", "100001"):
            code, reason, details = stream_outcome(
                app.grpc_target, [hello_frame(run="huge", detector_settings={"throughput_drop.window": value})]
            )
            assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_detector_settings"), details
        frames = [hello_frame(run="huge"), *(report_frame(i) for i in range(1, 40))]
        assert stream_outcome(app.grpc_target, frames)[0] == OK
    finally:
        app.stop(grace=0)


def _settings_classes() -> list[type[Settings]]:
    """Every Settings dataclass reachable from ServerConfig, plus every detector's config."""
    found: list[type[Settings]] = []
    todo: list[type] = [ServerConfig, *(spec.config_type for spec in REGISTRY)]
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.append(cls)
        for hint in typing.get_type_hints(cls).values():
            if isinstance(hint, type) and issubclass(hint, Settings):
                todo.append(hint)
    return found


def test_every_numeric_setting_has_a_finite_range() -> None:
    """Generated over the whole schema: no numeric setting (server file or per-run) is unbounded above."""
    checked = 0
    for cls in _settings_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                lower, upper = bounds(f, hints[f.name])
                assert lower is not None, f"{cls.__name__}.{f.name} has no lower bound"
                assert upper is not None and upper < float("inf"), f"{cls.__name__}.{f.name}"
                checked += 1
    assert checked > 100


def _int_fields() -> list[tuple[str, str, int, int]]:
    out = []
    for spec in REGISTRY:
        hints = typing.get_type_hints(spec.config_type)
        for f in dataclasses.fields(spec.config_type):
            if hints[f.name] is int:
                lower, upper = bounds(f, int)
                out.append((spec.name, f.name, int(lower or 0), int(upper)))
    return out


INT_FIELDS = _int_fields()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(INT_FIELDS), at_max=st.booleans(), data=st.data())
def test_any_accepted_setting_keeps_a_run_within_memory(field, at_max, data) -> None:
    """Property: every integer detector setting, anywhere in its accepted range (often at its maximum), lets
    a run of a few hundred reports through with bounded memory; out of range it is refused."""
    detector, name, lower, upper = field
    value = upper if at_max else data.draw(st.integers(lower, upper))
    app = _shared_app()
    run = f"prop-{detector}-{name}-{value}"
    frames = [hello_frame(run=run, detector_settings={f"{detector}.{name}": json.dumps(value)})]
    frames += [report_frame(i, loss=1.0 + (i % 7) * 0.01) for i in range(1, 200)]
    tracemalloc.start()
    try:
        code, reason, details = stream_outcome(app.grpc_target, frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A cross-field rule (e.g. min_steps ≤ window) may refuse a value; it must say so, not fail later.
    assert code == OK or (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_detector_settings"), details
    assert peak < 64 << 20, f"{detector}.{name}={value}: {peak / 2**20:.0f} MiB"
    code, reason, _ = stream_outcome(app.grpc_target, [hello_frame(run=run + "-over", detector_settings={
        f"{detector}.{name}": json.dumps(upper + 1)})])  # fmt: skip
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_detector_settings")


_APP: list = []


def _shared_app():
    if not _APP:
        _APP.append(start_app(server_config(max_runs=10_000)))
    return _APP[0]


def teardown_module() -> None:
    for app in _APP:
        app.stop(grace=0)


# ---------------------------------------------------------------------- item 2: eviction and bindings


def test_at_the_run_limit_new_runs_are_refused_and_firing_alerts_stay() -> None:
    """1,000 Flush calls once pushed out an idle run and resolved its critical alert."""
    for policy in ("refuse", "evict_idle"):
        app = start_app(server_config(max_runs=3, at_max_runs=policy))
        try:
            frames = [hello_frame(run="victim"), report_frame(1, grad_norm=NAN)]
            assert stream_outcome(app.grpc_target, frames)[0] == OK
            assert app.alert_book.firing_alert("victim", "non_finite") is not None
            outcomes = [flush_outcome(app.grpc_target, hello(run=f"flood-{i}"))[:2] for i in range(50)]
            refused = (grpc.StatusCode.RESOURCE_EXHAUSTED, "run_limit_reached")
            if policy == "refuse":
                assert outcomes[:2] == [(OK, None)] * 2 and set(outcomes[2:]) == {refused}
            else:  # idle runs without alerts make room; the victim is never one of them
                assert set(outcomes) == {(OK, None)}
            alert = app.alert_book.firing_alert("victim", "non_finite")
            assert alert is not None, policy
            assert "victim" in {r["run"] for r in app.runs()}
            text = scrape(app)
            assert metric(text, "gradwatch_ingest_errors_total", reason="run_limit_reached") == (
                48 if policy == "refuse" else 0
            )
        finally:
            app.stop(grace=0)


def test_an_evicted_runs_job_binding_holds_across_eviction_and_restart(tmp_path: Path) -> None:
    """Another team's grant for every run once took an evicted run's name; the owner then got refused."""
    tokens = write_tokens(tmp_path / "tokens.json", [
        {"name": "team-a", "token": "a" * 20, "jobs": ["a-*"]},
        {"name": "team-b", "token": "b" * 20, "jobs": ["*"], "runs": ["*"]},
    ])  # fmt: skip
    config = secure_config(tokens_file=tokens)
    config = dataclasses.replace(
        config,
        limits=LimitsConfig(max_runs=1, at_max_runs="evict_idle"),
        storage=StorageConfig(data_dir=str(tmp_path / "data")),
    )
    a, b = (("authorization", "Bearer " + "a" * 20),), (("authorization", "Bearer " + "b" * 20),)
    for restart in (False, True):
        app = start_app(config)
        try:
            if not restart:
                assert flush_outcome(app.grpc_target, hello(run="shared", job_name="a-train"), metadata=a)[0] == OK
                assert flush_outcome(app.grpc_target, hello(run="other", job_name="b-x"), metadata=b)[0] == OK
                assert [r["run"] for r in app.runs()] == ["other"]  # "shared" was evicted from memory
            code, reason, _ = flush_outcome(app.grpc_target, hello(run="shared", job_name="b-x"), metadata=b)
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "run_bound_to_other_job"), restart
            assert flush_outcome(app.grpc_target, hello(run="shared", job_name="a-train", session="s9"),
                                 metadata=a)[0] == OK  # fmt: skip
        finally:
            app.stop(grace=0)


def test_an_evicted_runs_settings_stay_fixed() -> None:
    app = start_app(server_config(max_runs=1, at_max_runs="evict_idle"))
    try:
        assert flush_outcome(app.grpc_target, hello(run="r1", detector_settings={"loss_spike.factor": "8"}))[0] == OK
        assert flush_outcome(app.grpc_target, hello(run="r2"))[0] == OK  # evicts r1 (idle, no alert)
        code, reason, _ = flush_outcome(app.grpc_target, hello(run="r1", session="s2"))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "detector_settings_conflict")
    finally:
        app.stop(grace=0)


# ---------------------------------------------------------------------- item 3: ranks bounded


def test_ranks_in_total_are_bounded_and_counted() -> None:
    app = start_app(server_config(max_ranks_total=8, max_runs=100))
    try:
        for rank in range(8):
            assert flush_outcome(app.grpc_target, hello(run="big", rank=rank, world_size=16384))[0] == OK
        code, reason, details = flush_outcome(app.grpc_target, hello(run="big", rank=8, world_size=16384))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "rank_limit_reached"), details
        assert flush_outcome(app.grpc_target, hello(run="small", rank=0))[:2] == (code, reason)
        assert flush_outcome(app.grpc_target, hello(run="big", rank=3, world_size=16384, session="again"))[0] == OK
        assert metric(scrape(app), "gradwatch_ingest_errors_total", reason="rank_limit_reached") == 2
        assert [r["run"] for r in app.runs()] == ["big"]  # the refused Hello registered nothing
    finally:
        app.stop(grace=0)


def test_ranks_known_only_from_flush_calls_cannot_page_stalled() -> None:
    """A Flush flood registers ranks, with or without reports; none of them may page `stalled` (a Flush is an
    agent's final act), while a streaming rank that reported and then stopped does."""
    app = start_app()
    quick = {"stalled.floor_s": "0.3", "stalled.silent_after_s": "0.3", "stalled.factor": "1.5"}
    real = AgentStream(app.grpc_target)
    try:
        for rank in range(16):
            flush_outcome(app.grpc_target, hello(run="ghosts", rank=rank, world_size=32, detector_settings=quick))
        for rank in range(16, 32):
            flush_outcome(app.grpc_target, hello(run="ghosts", rank=rank, world_size=32, detector_settings=quick),
                          [report_frame(1)])  # fmt: skip
        real.send(hello_frame(run="real", detector_settings=quick))
        real.send(report_frame(1))
        real.recv_ack(1)
        wait_until(lambda: app.alert_book.firing_alert("real", "stalled"), what="the streaming rank to page stalled")
        after = app.ingestor.ticks
        wait_until(lambda: app.ingestor.ticks >= after + 2, what="two more ticks for the ghosts")
        assert app.alert_book.firing_alert("ghosts", "stalled") is None
    finally:
        real.close()
        app.stop(grace=0)
