"""The flight recorder's memory: the bytes it keeps alive, measured by tracemalloc, stay within its budget.

Frames are built by hand (no torch); reports go through the real ingest path (validation is not needed for the
recorder) or straight into FlightRecorder.observe, so the measured growth is the recorder's alone.
"""

from __future__ import annotations

import dataclasses
import gc
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.server.app import ServerApp
from gradwatch.server.config import RecorderConfig
from gradwatch.server.report import ModuleSchema, build_report
from gradwatch.v1 import gradwatch_pb2 as pb
from server_support import columns, hello, report_frame, server_config

MiB = 1 << 20


def _full_layers(n: int) -> pb.LayerStats:
    stats = columns(n, grad_norm=1.0, grad_max_abs=0.5, grad_mean=0.0, grad_non_finite=0.0, grad_zero_fraction=0.0,
                    weight_norm=2.0, weight_max_abs=0.1, weight_mean=0.0, weight_non_finite=0.0,
                    weight_zero_fraction=0.0, grad_min=-0.5, grad_max=0.5, weight_min=-0.1, weight_max=0.1,
                    update_ratio=1e-3)  # fmt: skip
    stats.grad_log2_histogram = np.ones((n, 32), dtype="<f4").tobytes()
    return stats


def _activations(n: int) -> pb.ActivationStats:
    one = np.full(n, 0.5, dtype="<f4").tobytes()
    return pb.ActivationStats(mean=one, std=one, max_abs=one, non_finite=np.zeros(n, "<f4").tobytes(),
                              zero_fraction=one, dead_fraction=one, saturated_fraction=one, unit_spread=one,
                              log2_histogram=np.ones((n, 32), dtype="<f4").tobytes())  # fmt: skip


def _feed(app: ServerApp, ranks: int, layers: int, reports: int, full_every: int) -> int:
    """Reports of `ranks` ranks, interleaved as in training, into the recorder alone; traced bytes it grew by."""
    observed = pb.LayerSchema(names=[f"m{i}" for i in range(layers)], module_types=["ReLU"] * layers)
    hellos = [hello(rank=r, world_size=ranks, layers=layers, session=f"s{r}", activation_schema=observed)
              for r in range(ranks)]  # fmt: skip
    states = [app.store.join(h)[:2] for h in hellos]
    modules = [ModuleSchema.of(h.activation_schema) for h in hellos]
    full, acts = _full_layers(layers), _activations(layers)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for seq in range(1, reports + 1):
            for r, (run, state) in enumerate(states):
                frame = report_frame(seq, layers=full if seq % full_every == 0 else None)
                if seq % full_every == 0:
                    frame.report.activations.CopyFrom(acts)
                report = build_report(run.run_id, r, frame.report, state.schema.names, float(seq), modules[r])
                app.recorder.observe(run, state, report, frame.report, hellos[r])
                del frame, report
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_recorder_keeps_under_1_mib_per_rank_at_200_layers_with_default_settings() -> None:
    app = ServerApp(server_config())  # default recorder settings, default cadence (full every 10th report)
    grown = _feed(app, ranks=8, layers=200, reports=300, full_every=10)
    assert grown / 8 <= MiB, f"{grown / 8 / MiB:.2f} MiB per rank"
    assert app.recorder.kept_bytes() <= grown  # what it counts is really held


@pytest.mark.parametrize("full_every", [1, 10])
def test_recorder_budget_holds_with_2000_layer_reports(full_every: int) -> None:
    budget = 4 * MiB
    config = dataclasses.replace(server_config(), recorder=RecorderConfig(max_bytes=budget))
    app = ServerApp(config)
    grown = _feed(app, ranks=12, layers=2000, reports=120, full_every=full_every)
    kept = app.recorder.kept_bytes()
    assert kept <= budget
    # The scalar rows (80 × 60 bytes per rank) and bookkeeping come on top of the columns; frame bytes must not.
    assert grown <= budget + 12 * 64 * 1024, f"recorder grew {grown / MiB:.1f} MiB for a {budget / MiB:.0f} MiB budget"
    for windows in app.recorder._windows.values():
        for window in windows.values():
            assert len(window.columns) >= 1  # every rank keeps at least its latest full report
            for _, _, layers, modules in window.columns:
                assert all(a.base is None for a in (*layers.values(), *modules.values()))  # owns its bytes


@settings(max_examples=25, deadline=None)
@given(ranks=st.integers(1, 24), layers=st.integers(1, 600), budget_kib=st.integers(1024, 4096),
       full_every=st.integers(1, 12))  # fmt: skip
def test_recorder_counted_bytes_never_exceed_the_budget(ranks: int, layers: int, budget_kib: int,
                                                        full_every: int) -> None:  # fmt: skip
    budget = budget_kib * 1024
    app = ServerApp(dataclasses.replace(server_config(), recorder=RecorderConfig(max_bytes=budget)))
    stats = _full_layers(layers)
    sessions = [app.ingestor.open(hello(rank=r, world_size=ranks, layers=layers, session=f"s{r}"))
                for r in range(ranks)]  # fmt: skip
    entry = 0
    for seq in range(1, 41):
        for session in sessions:
            app.ingestor.apply(session, report_frame(seq, layers=stats if seq % full_every == 0 else None), "report")
        windows = app.recorder._windows.get("run-a", {})
        real = sum(a.nbytes for w in windows.values() for e in w.columns for a in (*e[2].values(), *e[3].values()))
        assert real == app.recorder.kept_bytes()
        entry = max([entry, *(e for w in windows.values() for e in [w.bytes // max(1, len(w.columns))])])
        # At least the latest full report of each rank is kept, whatever the budget.
        assert real <= max(budget, ranks * entry)
