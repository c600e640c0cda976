"""Relayed reports as packed columns (RelayedColumns): packed by a relay's link, read with numpy by the aggregator.

Contract
--------
* `columnar(frame)`: whether a compact report can travel as columns: one without collective progress, NaN
  provenance indices, autopsy samples or a guard rollback (those stay RelayedFrames, applied one by one).
  Learning rates and the per-layer update ratios are not forwarded in columns: the aggregator runs no per-rank
  detector on relayed ranks and keeps neither.
* `pack(reports)` packs (ref, position, AgentFrame) triples in order; `Columns.of(message)` reads them back as
  numpy arrays (a length mismatch between columns raises ValueError: the aggregator rejects the batch's
  columns as malformed); `Columns.frame(i)` rebuilds report i as the AgentFrame the relay compacted, for the
  per-record path (what the columns carry, nothing more).
* `Columns.take(index)` is the subset at `index` (order kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["Columns", "columnar", "pack"]

HAS_LOSS = pb.RELAYED_COLUMN_FLAG_HAS_LOSS
HAS_SHARE = pb.RELAYED_COLUMN_FLAG_HAS_SHARE
HAS_CHECKSUM = pb.RELAYED_COLUMN_FLAG_HAS_CHECKSUM
HAS_PRE_FORWARD = pb.RELAYED_COLUMN_FLAG_HAS_PRE_FORWARD
HAS_BETWEEN = pb.RELAYED_COLUMN_FLAG_HAS_BETWEEN
SKIPPED_STEP = pb.RELAYED_COLUMN_FLAG_SKIPPED_STEP
OVER_BUDGET = pb.RELAYED_COLUMN_FLAG_OVER_BUDGET
HAS_LOSS_SCALE = pb.RELAYED_COLUMN_FLAG_HAS_LOSS_SCALE
HAS_OUTPUT_SPREAD = pb.RELAYED_COLUMN_FLAG_HAS_OUTPUT_SPREAD
HAS_OUTPUT_RMS = pb.RELAYED_COLUMN_FLAG_HAS_OUTPUT_RMS

#: Column name -> little-endian dtype on the wire.
DTYPES: dict[str, str] = {
    "ref": "<u8", "position": "<u4", "seq": "<u8", "step": "<u8", "wall_time": "<f8", "step_duration_s": "<f8",
    "loss": "<f8", "grad_sum_squares": "<f8", "grad_global_share": "<f8", "param_checksum": "<u8",
    "pre_forward_s": "<f8", "between_collectives_s": "<f8", "non_finite": "<u4", "flags": "<u4",
    "optimizer_step": "<u8", "agent_time_s": "<f8", "full_stats_interval": "<u4", "guard_skip_reasons": "<u4",
    "micro_steps": "<u4", "loss_scale": "<f8", "output_spread": "<f8", "output_rms": "<f8",
}  # fmt: skip
#: Optional StepReport fields and the flag that says a report has one.
_OPTIONAL = {"grad_global_share": HAS_SHARE, "param_checksum": HAS_CHECKSUM, "pre_forward_s": HAS_PRE_FORWARD,
             "between_collectives_s": HAS_BETWEEN, "loss_scale": HAS_LOSS_SCALE,
             "output_spread": HAS_OUTPUT_SPREAD, "output_rms": HAS_OUTPUT_RMS}  # fmt: skip
_PLAIN = ("step", "wall_time", "step_duration_s", "grad_sum_squares", "non_finite", "optimizer_step",
          "agent_time_s", "full_stats_interval", "guard_skip_reasons", "micro_steps")  # fmt: skip
#: Report fields that keep a report out of the columns (each needs the per-record path).
_FRAME_ONLY = ("collectives", "first_non_finite_layer", "first_non_finite_module", "guard_rolled_back_to")


def columnar(frame: pb.AgentFrame) -> bool:
    """Whether a compact report frame can travel as columns (see the module docstring)."""
    report = frame.report
    return not (any(report.HasField(f) for f in _FRAME_ONLY) or report.batch_ids or report.top_samples)


def pack(reports: Sequence[tuple[int, int, pb.AgentFrame]]) -> pb.RelayedColumns:
    """(ref, position, frame) of each report, in order, as one RelayedColumns."""
    values: dict[str, list[float | int]] = {name: [] for name in DTYPES}
    for ref, position, frame in reports:
        report = frame.report
        values["ref"].append(ref)
        values["position"].append(position)
        values["seq"].append(frame.seq)
        for name in _PLAIN:
            values[name].append(getattr(report, name))
        flags = (HAS_LOSS if report.has_loss else 0) | (SKIPPED_STEP if report.skipped_step else 0) | (
            OVER_BUDGET if report.over_budget else 0)  # fmt: skip
        values["loss"].append(report.loss)
        for name, flag in _OPTIONAL.items():
            if report.HasField(name):
                flags |= flag
                values[name].append(getattr(report, name))
            else:
                values[name].append(0)
        values["flags"].append(flags)
    return pb.RelayedColumns(**{name: np.asarray(v, dtype=DTYPES[name]).tobytes() for name, v in values.items()})


@dataclass
class Columns:
    """One batch's relayed reports as arrays (native dtypes), element i being report i."""

    ref: np.ndarray
    position: np.ndarray
    seq: np.ndarray
    step: np.ndarray
    wall_time: np.ndarray
    step_duration_s: np.ndarray
    loss: np.ndarray
    grad_sum_squares: np.ndarray
    grad_global_share: np.ndarray
    param_checksum: np.ndarray
    pre_forward_s: np.ndarray
    between_collectives_s: np.ndarray
    non_finite: np.ndarray
    flags: np.ndarray
    optimizer_step: np.ndarray
    agent_time_s: np.ndarray
    full_stats_interval: np.ndarray
    guard_skip_reasons: np.ndarray
    micro_steps: np.ndarray
    loss_scale: np.ndarray
    output_spread: np.ndarray
    output_rms: np.ndarray

    @classmethod
    def of(cls, message: pb.RelayedColumns) -> Columns:
        arrays = {name: np.frombuffer(getattr(message, name), dtype=dtype) for name, dtype in DTYPES.items()}
        sizes = {a.size for a in arrays.values()}
        if len(sizes) != 1 or any(len(getattr(message, n)) % np.dtype(d).itemsize for n, d in DTYPES.items()):
            raise ValueError("RelayedColumns: columns of different lengths")
        return cls(**arrays)

    def __len__(self) -> int:
        return int(self.ref.size)

    def take(self, index: np.ndarray | slice) -> Columns:
        return Columns(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def has(self, flag: int) -> np.ndarray:
        return (self.flags & flag) != 0

    def frame(self, i: int) -> pb.AgentFrame:
        """Report i as the compact AgentFrame it was packed from (fields the columns carry)."""
        flags = int(self.flags[i])
        report = pb.StepReport(**{name: getattr(self, name)[i].item() for name in _PLAIN})
        if flags & HAS_LOSS:
            report.has_loss, report.loss = True, float(self.loss[i])
        report.skipped_step = bool(flags & SKIPPED_STEP)
        report.over_budget = bool(flags & OVER_BUDGET)
        for name, flag in _OPTIONAL.items():
            if flags & flag:
                setattr(report, name, getattr(self, name)[i].item())
        return pb.AgentFrame(seq=int(self.seq[i]), report=report)
