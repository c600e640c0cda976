"""Turn agent items into gradwatch.v1 frames (sender thread only).

Contract: pure functions from plain data to protobuf messages; they decide nothing about when to send. The
non-finite flags and `first_non_finite_layer` are derived here, on the host, from the per-layer norms the
device computed every step: a layer's gradient is non-finite when its norm is. A step the loss scaler
skipped keeps its (scaled, non-finite) gradient flags and says `skipped_step`: the server decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from gradwatch.agent.activations import INPUT, STATS_PER_MODULE, VALUES_PER_MODULE, ActivationItem
from gradwatch.agent.autopsy import TailItem, read_tail
from gradwatch.agent.items import AgentIdentity, EventItem, ReportItem
from gradwatch.v1 import gradwatch_pb2 as pb
from gradwatch.v1.vocabulary import ACTIVATION_STATISTICS, first_non_finite

__all__ = [
    "event_frame",
    "goodbye_frame",
    "heartbeat_frame",
    "hello",
    "hello_frame",
    "report_frame",
]

_LE_F32 = np.dtype("<f4")
_U64 = (1 << 64) - 1
# LayerStats fields, as fold.LayerFold names its columns.
LAYER_COLUMNS = tuple(
    f"{source}_{name}"
    for source in ("grad", "weight")
    for name in ("norm", "max_abs", "mean", "non_finite", "zero_fraction", "min", "max")
)


def hello(identity: AgentIdentity) -> pb.Hello:
    """The Hello for a stream (or a Flush) of this agent, schema included."""
    schema = identity.schema
    return pb.Hello(
        protocol_version=pb.PROTOCOL_VERSION_CURRENT,
        run_id=identity.run_id,
        job_name=identity.job_name,
        rank=identity.rank,
        world_size=identity.world_size,
        local_rank=identity.local_rank,
        host=identity.host,
        pid=identity.pid,
        session_id=identity.session_id,
        agent_version=identity.agent_version,
        torch_version=identity.torch_version,
        device_kind=identity.device_kind,
        full_stats_interval=identity.full_stats_interval,
        replica_group=identity.replica_group,
        replica_group_size=identity.replica_group_size,
        schema=pb.LayerSchema(
            names=schema.names,
            module_types=schema.module_types,
            param_counts=schema.param_counts,
            local_param_counts=schema.local_param_counts,
        ),
        activation_schema=pb.LayerSchema(names=identity.activation_names, module_types=identity.activation_types),
        detector_settings=dict(identity.detector_settings),
    )


def hello_frame(identity: AgentIdentity) -> pb.AgentFrame:
    return pb.AgentFrame(seq=0, hello=hello(identity))


def report_frame(seq: int, item: ReportItem, values: np.ndarray) -> tuple[pb.AgentFrame, int]:
    """The frame for one report given its host values; also returns its NonFiniteFlag bits."""
    layout = item.payload.layout
    folded = item.payload.fold.fold(values, layout)
    columns = folded.columns

    flags = 0
    loss = float(values[layout.LOSS]) if item.payload.loss_in_vector else item.payload.loss
    if item.payload.has_loss and not math.isfinite(loss):
        flags |= pb.NON_FINITE_FLAG_LOSS
        loss = math.nan  # the wire carries NaN for any non-finite loss
    first_bad_layer = first_non_finite(columns["grad_norm"])
    if first_bad_layer is not None:
        flags |= pb.NON_FINITE_FLAG_GRADIENT
    if first_non_finite(columns["weight_norm"]) is not None:
        flags |= pb.NON_FINITE_FLAG_WEIGHT

    learning_rates = list(item.payload.learning_rates)
    for slot, value in zip(item.payload.tensor_lr_slots, values[layout.tensor_lrs], strict=True):
        learning_rates[slot] = float(value)

    report = pb.StepReport(
        step=item.step,
        wall_time=item.wall_time,
        step_duration_s=item.step_duration_s,
        loss=loss if item.payload.has_loss else 0.0,
        has_loss=item.payload.has_loss,
        learning_rates=learning_rates,
        grad_sum_squares=folded.grad_sum_squares,
        non_finite=flags,
        optimizer_step=item.payload.optimizer_step,
        agent_time_s=item.agent_time_s,
        micro_steps=item.payload.micro_steps,
        full_stats_interval=item.full_stats_interval,
        over_budget=item.over_budget,
        grad_global_share=folded.grad_global_share,
    )
    if layout.checksum:
        pieces = values[layout.checksum_pieces]
        report.param_checksum = sum(int(piece) << (16 * i) for i, piece in enumerate(pieces)) & _U64
    if item.pre_forward_s is not None:
        report.pre_forward_s = item.pre_forward_s
    if item.between_collectives_s is not None:
        report.between_collectives_s = item.between_collectives_s
    if layout.scaler:
        report.skipped_step = bool(values[layout.scaler_skipped] > 0)
        report.loss_scale = float(values[layout.scaler_scale])
    if first_bad_layer is not None:
        report.first_non_finite_layer = first_bad_layer
    if item.payload.tail is not None:
        _tail_fields(report, item.payload.tail, values)
    if item.payload.activations is not None:
        report.non_finite |= _activation_fields(report, item.payload.activations, values)
        flags = report.non_finite
    if layout.full:
        report.layers.CopyFrom(pb.LayerStats(**{name: _column_bytes(columns[name]) for name in LAYER_COLUMNS}))
        for name in ("update_ratio", "grad_log2_histogram"):
            if name in columns:
                setattr(report.layers, name, _column_bytes(columns[name]))
    elif "update_ratio" in columns:  # the update ratio's own cadence (update_cadence.py), between full steps
        report.update_ratio = _column_bytes(columns["update_ratio"])
    return pb.AgentFrame(seq=seq, report=report), flags


def _activation_fields(report: pb.StepReport, item: ActivationItem, values: np.ndarray) -> int:
    """Fill the report's activation fields from the vector; returns the non-finite flags they add."""
    m, at, k = item.num_modules, item.offset, len(item.calls)
    flags = 0
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(values[at : at + k])
        if not finite.all():
            calls = np.asarray(item.calls)
            broken = set(calls[~finite].tolist())
            bad = [i for i in item.order if i in broken]
            if bad:
                report.first_non_finite_module = bad[0]  # first in forward order
                flags |= pb.NON_FINITE_FLAG_ACTIVATION
            if INPUT in broken:
                flags |= pb.NON_FINITE_FLAG_INPUT
        if not item.full:
            return flags
        at += k
        stats = values[at : at + m * VALUES_PER_MODULE].reshape(m, VALUES_PER_MODULE)
        at += m * VALUES_PER_MODULE
        report.activations.CopyFrom(
            pb.ActivationStats(
                **{name: _column_bytes(stats[:, k]) for k, name in enumerate(ACTIVATION_STATISTICS)},
                log2_histogram=_column_bytes(stats[:, STATS_PER_MODULE:]),
            )
        )
        if item.has_output_spread:
            report.output_spread = float(values[at])
            report.output_rms = float(values[at + 1])
        at += 2
        f = item.input_features
        if f:
            report.input_mean = _column_bytes(values[at : at + f])
            report.input_std = _column_bytes(values[at + f : at + 2 * f])
        at += 2 * f
        if item.label_bins:
            counts = values[at : at + item.label_bins]
            used = np.flatnonzero(counts)
            report.label_histogram = _column_bytes(counts[: used[-1] + 1] if used.size else counts[:0])
    return flags


def _tail_fields(report: pb.StepReport, tail: TailItem, values: np.ndarray) -> None:
    """The guard's verdict and the autopsy (autopsy.py)."""
    reasons, ids, top = read_tail(tail, values)
    report.guard_skip_reasons = reasons
    if tail.rolled_back_to is not None:
        report.guard_rolled_back_to = tail.rolled_back_to
    report.batch_ids.extend(ids)
    report.top_samples.extend(pb.SampleLoss(id=i, loss=loss, index=index) for i, loss, index in top)


def event_frame(seq: int, item: EventItem) -> pb.AgentFrame:
    return pb.AgentFrame(
        seq=seq,
        event=pb.Event(
            kind=item.kind,
            step=item.step,
            wall_time=item.wall_time,
            message=item.message,
            attributes=item.attributes,
        ),
    )


def heartbeat_frame(wall_time: float, step: int, dropped: Mapping[str, int]) -> pb.AgentFrame:
    return pb.AgentFrame(seq=0, heartbeat=pb.Heartbeat(wall_time=wall_time, step=step, dropped=dict(dropped)))


def goodbye_frame(final_step: int, reason: str) -> pb.AgentFrame:
    return pb.AgentFrame(seq=0, goodbye=pb.Goodbye(final_step=final_step, reason=reason))


def _column_bytes(column: np.ndarray | float) -> bytes:
    return np.asarray(column).astype(_LE_F32).tobytes()
