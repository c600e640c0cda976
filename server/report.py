"""One rank's step report as the server sees it: decoded once, shared by store and detectors.

`build_report` turns a validated StepReport into a `RankReport`: the gradient norm
is sqrt(grad_sum_squares), per-layer columns become read-only float32 numpy views
on the frame's bytes (no copy), and what was non-finite (loss, gradient, weight)
and where (the first layer) is decided here, once, with vectorised checks, so
metrics and every detector agree.

A step a loss scaler skipped (`skipped_step`) carries statistics of the *scaled*
gradients: they say nothing about training health, so its gradient norm is NaN
(no detector judges it, no gauge shows it), its gradient columns are dropped and
only a non-finite loss or weight counts as non-finite. The skip itself is counted.

Full-statistics steps with forward hooks also carry what the model saw and produced:
`activations` (ActivationStats column -> float32 view indexed by the observed modules,
`modules` / `module_types`; the log2 histogram as a (modules, LOG2_HISTOGRAM_BINS) view), the output's
spread across the batch and RMS, the per-feature input mean and std, and the label
class histogram. All are zero-copy numpy views on the frame's bytes, decoded without a
Python loop per module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch.v1 import gradwatch_pb2 as pb
from gradwatch.v1.vocabulary import LOG2_HISTOGRAM_BINS, first_non_finite

__all__ = [
    "ACTIVATION_COLUMN_NAMES",
    "COLUMN_NAMES",
    "KIND_GRADIENT",
    "KIND_LOSS",
    "KIND_WEIGHT",
    "NON_FINITE_KINDS",
    "ModuleSchema",
    "RankReport",
    "build_report",
]

#: LayerStats columns in proto order; each holds len(schema) little-endian float32.
COLUMN_NAMES: tuple[str, ...] = tuple(f.name for f in pb.LayerStats.DESCRIPTOR.fields)
#: float32 values per layer (or module) of the columns that hold more than one; 1 for every other column.
COLUMN_WIDTHS: dict[str, int] = {"grad_log2_histogram": LOG2_HISTOGRAM_BINS, "log2_histogram": LOG2_HISTOGRAM_BINS}
#: ActivationStats columns in proto order; each holds len(activation_schema) little-endian float32.
ACTIVATION_COLUMN_NAMES: tuple[str, ...] = tuple(f.name for f in pb.ActivationStats.DESCRIPTOR.fields)
LAYER_DTYPE = np.dtype("<f4")

KIND_LOSS = "loss"
KIND_GRADIENT = "gradient"
KIND_WEIGHT = "weight"
#: Label values of gradwatch_non_finite_events_total{kind}.
NON_FINITE_KINDS: tuple[str, ...] = (KIND_LOSS, KIND_GRADIENT, KIND_WEIGHT)

_EMPTY_COLUMNS: Mapping[str, np.ndarray] = {}
_NO_NAMES: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModuleSchema:
    """Hello.activation_schema decoded once per stream: module names and types (types padded to the names).

    Every report of the stream shares these tuples, so per-schema caches (the detectors' type masks) hit by
    identity instead of comparing hundreds of strings per report."""

    names: tuple[str, ...]
    types: tuple[str, ...]

    @classmethod
    def of(cls, schema: pb.LayerSchema) -> ModuleSchema:
        names, types = tuple(schema.names), tuple(schema.module_types)
        return cls(names, types if len(types) == len(names) else ("",) * len(names))


@dataclass(slots=True)
class RankReport:
    """A decoded StepReport of one rank.

    `loss` is None when the agent passed no loss; it may be NaN/Inf otherwise.
    `columns` maps LayerStats field name -> float32 array of len(layer_names),
    present only on full-statistics steps. `non_finite_kinds` is the subset of
    NON_FINITE_KINDS observed; `non_finite_layer` the schema index of the first
    layer with a non-finite gradient (else weight), when known.

    Read-only by contract: the store, the flight recorder and every detector share one report, and none
    assigns to it (tests/test_server_detector_needs.py checks every detector). Not a frozen dataclass only
    because its __init__ would cost three times as much (one object.__setattr__ per field, on every report).
    """

    run: str
    rank: int
    step: int
    wall_time: float
    step_duration_s: float
    loss: float | None
    grad_norm: float
    non_finite_flags: int
    columns: Mapping[str, np.ndarray]
    layer_names: tuple[str, ...]
    non_finite_kinds: tuple[str, ...]
    non_finite_layer: int | None
    received_at: float
    skipped: bool = False
    grad_global_share: float | None = None
    #: NaN provenance from forward hooks: "input batch", or the first module (forward order) with a
    #: non-finite output, e.g. "module 'net.2' (Linear)"; None when unknown or nothing was non-finite.
    origin: str | None = None
    #: The agent's full-statistics interval in force (0: not said) and whether it is over its overhead budget.
    full_stats_interval: int = 0
    over_budget: bool = False
    #: ActivationStats field name -> float32 view of len(modules) values (log2_histogram: (modules, 32 bins)),
    #: present only on full-statistics steps with forward hooks; `modules` / `module_types` index them
    #: (Hello.activation_schema; empty when the report carries no activation columns).
    activations: Mapping[str, np.ndarray] = field(default_factory=dict)
    modules: tuple[str, ...] = _NO_NAMES
    module_types: tuple[str, ...] = _NO_NAMES
    #: Mean over output units of the batch std of the model's output, and the output's RMS (full steps).
    output_spread: float | None = None
    output_rms: float | None = None
    #: Per-feature (channel for images) mean and std of the input batch (full steps), equal lengths.
    input_mean: np.ndarray | None = None
    input_std: np.ndarray | None = None
    #: Label counts for classes 0..n-1 of the labels passed since the previous full report.
    label_histogram: np.ndarray | None = None

    @property
    def input_non_finite(self) -> bool:
        """The agent saw NaN/Inf in the model's input batch at this step (every step, not only full ones)."""
        return bool(self.non_finite_flags & pb.NON_FINITE_FLAG_INPUT)

    #: Elements of each layer this rank holds (Hello.schema.local_param_counts; None when not said). 0: the rank
    #: holds nothing of the layer (an FSDP2 shard can be empty), so its all-zero columns say nothing.
    local_param_counts: np.ndarray | None = None
    #: Exact checksum of the rank's parameters after this step (full-statistics steps), as an unsigned 64-bit int.
    param_checksum: int | None = None
    #: Seconds from the previous step to this step's first forward pass, when the agent saw one.
    pre_forward_s: float | None = None
    #: The agent's guard did not apply this step's update: OR of GuardSkipReason bits (0: applied or no guard).
    guard_skip_reasons: int = 0
    #: The optimizer step a guard rollback restored since the previous report, when one happened.
    guard_rolled_back_to: int | None = None
    #: Autopsy: the batch's ids and its top samples by loss as (id, loss, index), highest first.
    batch_ids: tuple[str, ...] = _NO_NAMES
    top_samples: tuple[tuple[str, float, int], ...] = ()
    #: Per-layer |Δw| / |w| of this step's update, on every report that measured it: full steps
    #: (columns["update_ratio"]) and the agent's own update cadence between them (StepReport.update_ratio).
    update_ratio: np.ndarray | None = None

    def held_layers(self, n: int) -> np.ndarray:
        """Boolean mask of the `n` layers this rank holds elements of (all True when the agent did not say): an
        FSDP2 rank's empty shard of a layer reads as all-zero statistics, which say nothing about the layer."""
        local = self.local_param_counts
        return np.ones(n, dtype=bool) if local is None or local.size != n else local > 0

    @property
    def layer_name(self) -> str | None:
        """Schema name of `non_finite_layer`, when known."""
        if self.non_finite_layer is None or self.non_finite_layer >= len(self.layer_names):
            return None
        return self.layer_names[self.non_finite_layer]


def build_report(
    run: str,
    rank: int,
    msg: pb.StepReport,
    layer_names: tuple[str, ...],
    received_at: float,
    modules: ModuleSchema | pb.LayerSchema | None = None,
    local_param_counts: np.ndarray | None = None,
) -> RankReport:
    """Decode a StepReport already checked by gradwatch.server.validate; `modules`: Hello.activation_schema
    (decoded once per stream by the ingest path); `local_param_counts`: Hello.schema.local_param_counts as an
    array (decoded once per stream)."""
    if isinstance(modules, pb.LayerSchema):
        modules = ModuleSchema.of(modules)
    columns = _decode_columns(msg) if msg.HasField("layers") else _EMPTY_COLUMNS
    loss = msg.loss if msg.has_loss else None
    grad_norm = math.sqrt(msg.grad_sum_squares) if msg.grad_sum_squares >= 0 else math.nan
    flags = msg.non_finite
    first = msg.first_non_finite_layer if msg.HasField("first_non_finite_layer") else None
    share = msg.grad_global_share if msg.HasField("grad_global_share") else None
    skipped = msg.skipped_step
    if skipped:  # scaled gradients: not evidence of anything (module docstring)
        grad_norm, share, first = math.nan, None, None
        flags &= ~pb.NON_FINITE_FLAG_GRADIENT
        columns = {name: values for name, values in columns.items() if not name.startswith("grad_")}

    grad_layer = first_non_finite(columns.get("grad_norm"), columns.get("grad_non_finite"))
    weight_layer = first_non_finite(columns.get("weight_norm"), columns.get("weight_non_finite"))
    kinds = []
    if flags & pb.NON_FINITE_FLAG_LOSS or (loss is not None and not math.isfinite(loss)):
        kinds.append(KIND_LOSS)
    if not skipped and (
        flags & pb.NON_FINITE_FLAG_GRADIENT
        or not math.isfinite(msg.grad_sum_squares)
        or first is not None
        or grad_layer is not None
    ):
        kinds.append(KIND_GRADIENT)
    if flags & pb.NON_FINITE_FLAG_WEIGHT or weight_layer is not None:
        kinds.append(KIND_WEIGHT)
    # The agent's own provenance wins; the columns are the fallback, gradients first
    # because a bad gradient is what poisons the weights on the next optimizer step.
    layer = first if first is not None else grad_layer if grad_layer is not None else weight_layer
    return RankReport(
        run=run,
        rank=rank,
        step=msg.step,
        wall_time=msg.wall_time,
        step_duration_s=msg.step_duration_s,
        loss=loss,
        grad_norm=grad_norm,
        non_finite_flags=flags,
        columns=columns,
        layer_names=layer_names,
        non_finite_kinds=tuple(kinds),
        non_finite_layer=layer,
        received_at=received_at,
        skipped=skipped,
        grad_global_share=share,
        origin=_origin(msg, modules),
        full_stats_interval=msg.full_stats_interval,
        over_budget=msg.over_budget,
        **_decode_model_io(msg, modules),
        local_param_counts=local_param_counts,
        param_checksum=msg.param_checksum if msg.HasField("param_checksum") else None,
        pre_forward_s=msg.pre_forward_s if msg.HasField("pre_forward_s") else None,
        guard_skip_reasons=msg.guard_skip_reasons,
        guard_rolled_back_to=msg.guard_rolled_back_to if msg.HasField("guard_rolled_back_to") else None,
        batch_ids=tuple(msg.batch_ids) if msg.batch_ids else _NO_NAMES,
        top_samples=tuple((s.id, s.loss, s.index) for s in msg.top_samples) if msg.top_samples else (),
        update_ratio=columns.get("update_ratio", _ratio_column(msg)),
    )


def _ratio_column(msg: pb.StepReport) -> np.ndarray | None:
    """StepReport.update_ratio (between full steps) as a float32 view, None when absent."""
    return np.frombuffer(msg.update_ratio, dtype=LAYER_DTYPE) if msg.update_ratio else None


def _decode_model_io(msg: pb.StepReport, modules: ModuleSchema | None) -> dict[str, Any]:
    """RankReport's activation, output, input and label fields (only those the report carries)."""
    out: dict[str, Any] = {}
    if msg.HasField("activations") and modules is not None:
        m = len(modules.names)
        columns: dict[str, np.ndarray] = {}
        for name in ACTIVATION_COLUMN_NAMES:
            raw = getattr(msg.activations, name)
            width = COLUMN_WIDTHS.get(name, 1)
            if raw and len(raw) == 4 * m * width:  # the validator checked this; a hand-built report may not be
                values = np.frombuffer(raw, dtype=LAYER_DTYPE)
                columns[name] = values if width == 1 else values.reshape(m, width)
        if columns:
            out["activations"] = columns
            out["modules"] = modules.names
            out["module_types"] = modules.types
    if msg.HasField("output_spread"):
        out["output_spread"] = msg.output_spread
    if msg.HasField("output_rms"):
        out["output_rms"] = msg.output_rms
    if msg.input_mean and len(msg.input_mean) == len(msg.input_std):
        out["input_mean"] = np.frombuffer(msg.input_mean, dtype=LAYER_DTYPE)
        out["input_std"] = np.frombuffer(msg.input_std, dtype=LAYER_DTYPE)
    if msg.label_histogram:
        out["label_histogram"] = np.frombuffer(msg.label_histogram, dtype=LAYER_DTYPE)
    return out


def _origin(msg: pb.StepReport, modules: ModuleSchema | None) -> str | None:
    """Where the non-finite values of this step came from first, per the agent's forward hooks."""
    if msg.non_finite & pb.NON_FINITE_FLAG_INPUT:
        return "input batch"
    if not msg.HasField("first_non_finite_module") or modules is None:
        return None
    index = msg.first_non_finite_module
    if index >= len(modules.names):
        return None
    kind = f" ({modules.types[index]})" if modules.types[index] else ""
    return f"module {modules.names[index]!r}{kind}"


def _decode_columns(msg: pb.StepReport) -> dict[str, np.ndarray]:
    layers = msg.layers
    out: dict[str, np.ndarray] = {}
    for name in COLUMN_NAMES:
        raw = getattr(layers, name)
        if raw:
            values = np.frombuffer(raw, dtype=LAYER_DTYPE)
            width = COLUMN_WIDTHS.get(name, 1)
            out[name] = values if width == 1 else values.reshape(-1, width)
    return out
