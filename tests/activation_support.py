"""Hand-built reports carrying activation, input, output and label statistics, decoded by the real server code."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from gradwatch.server.report import RankReport, build_report
from gradwatch.v1 import gradwatch_pb2 as pb

#: A small MLP as the agent would describe it: the layers and the activation modules, in named_modules() order.
MODULES = ("net.0", "net.1", "net.2", "net.3", "net.4")
MODULE_TYPES = ("Linear", "ReLU", "Linear", "ReLU", "Linear")
LAYERS = ("net.0", "net.2", "net.4")


def f32(values: Iterable[float] | np.ndarray) -> bytes:
    return np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype="<f4").tobytes()


def schema(names: Sequence[str] = MODULES, types: Sequence[str] = MODULE_TYPES) -> pb.LayerSchema:
    return pb.LayerSchema(names=list(names), module_types=list(types))


def activation_report(
    step: int,
    *,
    rank: int = 0,
    acts: Mapping[str, Sequence[float]] | None = None,
    modules: pb.LayerSchema | None = None,
    layers: Mapping[str, Sequence[float]] | None = None,
    layer_names: tuple[str, ...] = LAYERS,
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
    labels: Sequence[float] | None = None,
    flags: int = 0,
    **fields: Any,
) -> RankReport:
    """A decoded report; `acts` maps ActivationStats fields to per-module values (others left empty)."""
    msg = pb.StepReport(step=step, wall_time=1.7e9 + step, loss=0.5, has_loss=True, grad_sum_squares=1.0,
                        non_finite=flags, **fields)  # fmt: skip
    if acts is not None:
        msg.activations.CopyFrom(pb.ActivationStats(**{k: f32(v) for k, v in acts.items()}))
    if layers is not None:
        msg.layers.CopyFrom(pb.LayerStats(**{k: f32(v) for k, v in layers.items()}))
    if input_mean is not None and input_std is not None:
        msg.input_mean, msg.input_std = f32(input_mean), f32(input_std)
    if labels is not None:
        msg.label_histogram = f32(labels)
    return build_report("run", rank, msg, layer_names, 0.0, modules if modules is not None else schema())
