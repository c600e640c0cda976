"""Forward hooks: activation statistics, input statistics and NaN provenance, computed on the device.

Which modules: the layers of the schema (modules that own parameters) and activation modules (ReLU, GELU,
Sigmoid, Tanh, ...: `ACTIVATION_TYPES`), in `named_modules()` order: the *activation schema* sent in Hello.
The root module's forward pre-hook sees the model's input; a forward hook on the root sees the model's output
(used on full-statistics steps only). The hooks are process-wide ones filtered to these modules (dispatch.py):
nothing is stored on the model, so copies and pickles of it carry no agent. Forwards run with gradients
disabled (evaluation) are not observed. Hooks only queue device kernels: nothing here reads a tensor value.
While torch.compile, torch.export, torch.jit.trace, torch.fx or a functorch transform traces, and for forwards
re-run inside a backward pass (activation checkpointing), the hooks step aside (dispatch.stepping_aside): a
compiled region reports gradients, weights and the loss as usual, without activation statistics or NaN
provenance, and a checkpointed module is counted once per step.

Every observed step: NaN provenance from a value per module call (and one for the input) that is non-finite exactly
when some element of that output is NaN/Inf (or its sum, of magnitudes in the multi-tensor norm, runs past float32's
range, ~1e38: an explosion anyway), so the sender can name, on the step itself, the first module *in forward order*
whose output went non-finite, or the input batch. Forward order is recorded on the host as the order of first calls.
The outputs are not reduced one by one: the hooks keep references to them and, at the end of the model's forward (or
when PENDING_BYTES or PENDING_CALLS are reached, or at `take()`), one multi-tensor L1 norm (`torch._foreach_norm`,
float32 accumulation) per (device, dtype) reduces them all: a constant number of device operations per forward
whatever the model's size. On a CPU, kept outputs of SUM_ALONE_BYTES or more are each summed alone instead (torch's
CPU `_foreach_norm` reads at a quarter to half a sum's speed; an operation per such output costs less than the time
saved), so there the count grows with the number of large outputs. Exactness under in-place operations: each kept
output carries its version counter (`Tensor._version`, bumped by every in-place write to it or a view of it); an
output written in place after its module returned (`out += identity`, an in-place activation, `masked_fill_`) makes
that module *eager*: from then on its output is reduced when it returns (its own float32 sum), so no later in-place
write can add or hide a non-finite value. Which modules are eager is learned on the first report after `install()`
(there every output is reduced when it returns, and versions are still checked at each flush), and on every report
from each flush's version checks. The bounds count every observed call, kept or not, so a forward's early flushes fall
at the same calls on every report of the same shapes: a write that comes after such a flush finds the output already
reduced, on learning and ordinary reports alike (each forward counts from 0, also when nothing was kept at its end:
with gradient accumulation a learning report keeps less in its later forwards than an ordinary one). The one inexact
case: an output first written in place (after its module returned, before the next flush) on a report after the first
is reduced (and, on a full report, measured) as written on that one report (a NaN in it is still reported, possibly at
that module rather than a later one), and when its module returns from then on. Extra memory: the outputs observed
since the last flush, kept alive until it beyond what autograd keeps anyway, at most PENDING_BYTES (and PENDING_CALLS
references). Outputs not kept at all, without changing that answer (`_implied`): an output whose elements are elements
of the previously observed module's output, unwritten since (version counters; a container handing on its last child's
output, a view or slice of it), and the output of a *contracting* activation (`CONTRACTING_TYPES` with torch's own
forward: elementwise, no parameters, |f(x)| ≤ max(|x|, c) for a finite c, so a finite input gives a finite output)
whose input is such a part of it, unwritten since, or written once by the activation itself in place. Either can only
be non-finite if that previous output was, and the module vouching for it must come no later in forward order (a
reused activation first called earlier keeps its own value). NaN born in functional code between the two gives the
module another tensor, or moves the version, so it is kept as usual.

Full-statistics steps add, per module (first call of the step; units are the last dimension, or dimension 1
(channels) for tensors of 4 or more dimensions): mean, std, max |a|, non-finite count, fraction of zeros, fraction
of dead units (never positive across the batch), fraction of saturated units (for bounded activations: most outputs
of the unit, over the batch, within 1 % of the range's ends; NaN for unbounded modules), the spread across units
(mean over samples and positions of the std across units; near 0 when every unit computes the same value, i.e.
symmetric neurons; NaN for one-unit outputs): `STATS_PER_MODULE` = 8 values in that order
(gradwatch.v1.vocabulary.ACTIVATION_STATISTICS), then a log2-magnitude histogram of the output (histogram.py).
Outputs larger than SAMPLE_ELEMENTS values give their mean, std, zero fraction, non-finite count and histogram from
a fixed sample of that many positions, and their spread across units from about SPREAD_ELEMENTS values; max |a|,
dead and saturated units are always exact (module_stats.py). Launches: on full reports after the first, the CPU
outputs of modules not known to be eager that stacks.stackable() accepts (contiguous, at most STACK_ELEMENTS
values) are kept like an ordinary report's and measured at the flush, with their provenance sums, in same-shape
stacks (per shape, dtype, output bounds and STACK_BYTES: a constant number of launches each; the values of one
output at a time, module_stats.py; on an accelerator each output's float sums are still taken alone, stacks.py);
eager, larger and non-contiguous outputs are measured as their module returns. Plus: the spread of the model's
output across the batch (mean over units of the batch std) and its root mean square, the per-feature mean and std
of the input (first `MAX_INPUT_FEATURES` features) and, when labels are given, a class histogram of `LABEL_BINS`
bins (labels above the range count in the last bin; negative labels, e.g. an ignore_index of -100, are not
counted).

Contract: `take()` returns the capture since the last call, or None when no training forward ran.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwatch.agent import dispatch, errors
from gradwatch.agent import stacks as stacks_module
from gradwatch.agent.histogram import LOG2_BINS
from gradwatch.agent.module_stats import module_stats, reduce_dims, sample_positions, stacked_module_stats, unit_dim_of
from gradwatch.agent.snapshot import Segment
from gradwatch.agent.stacks import stackable, stacks
from gradwatch.v1.vocabulary import ACTIVATION_MODULE_TYPES, ACTIVATION_STATISTICS

__all__ = [
    "ACTIVATION_TYPES",
    "CONTRACTING_TYPES",
    "INPUT",
    "LABEL_BINS",
    "MAX_INPUT_FEATURES",
    "PENDING_BYTES",
    "PENDING_CALLS",
    "STATS_PER_MODULE",
    "SUM_ALONE_BYTES",
    "VALUES_PER_MODULE",
    "ActivationCapture",
    "ActivationItem",
    "ActivationTap",
    "assemble",
    "label_histogram",
]

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = tuple(getattr(nn, name) for name in ACTIVATION_MODULE_TYPES)
#: Activations whose output is finite whenever their input is (elementwise, parameter-free, never larger in
#: magnitude than max(|x|, c)); see the module docstring. Not SELU (its scale > 1), PReLU (a parameter),
#: Softplus/LogSigmoid (no need); LeakyReLU and RReLU only with slopes within [-1, 1] (`_contracting`).
CONTRACTING_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.RReLU, nn.ELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softsign,
)  # fmt: skip
STATS_PER_MODULE = len(ACTIVATION_STATISTICS)
VALUES_PER_MODULE = STATS_PER_MODULE + LOG2_BINS  # the statistics, then the log2-magnitude histogram
MAX_INPUT_FEATURES = 1024
LABEL_BINS = 1024
#: Output sizes whose sample positions are cached (variable-shape inputs beyond this start the cache over).
_MAX_SAMPLE_SIZES = 256
#: A report whose values outnumber this many per watched module (forwards without the model's own end, i.e.
#: submodules called directly) folds them (`ActivationTap._fold`).
_FOLD_VALUES = 4
_F32 = torch.float32
_clock = time.perf_counter


def _bounds(module: nn.Module) -> tuple[float, float] | None:
    """The output range of a bounded activation, else None."""
    if isinstance(module, nn.Sigmoid | nn.Hardsigmoid):
        return 0.0, 1.0
    if isinstance(module, nn.Tanh | nn.Softsign):
        return -1.0, 1.0
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return float(module.min_val), float(module.max_val)
    return None


def _contracting(module: nn.Module) -> bool:
    """Whether `module` maps finite inputs to finite outputs (CONTRACTING_TYPES with torch's own forward, slopes
    checked): a subclass that overrides `forward` may compute anything."""
    if not isinstance(module, CONTRACTING_TYPES) or any(True for _ in module.parameters(recurse=False)):
        return False
    if not any(type(module).forward is kind.forward for kind in CONTRACTING_TYPES):
        return False
    if isinstance(module, nn.LeakyReLU):
        return abs(module.negative_slope) <= 1.0
    if isinstance(module, nn.RReLU):
        return abs(module.lower) <= 1.0 and abs(module.upper) <= 1.0
    return True


#: The model's input, in `ActivationCapture.calls`.
INPUT = -1
#: Bytes of module outputs kept for one multi-tensor reduction at most (then they are reduced early), and calls.
PENDING_BYTES = 256 * 1024 * 1024
PENDING_CALLS = 4096
#: Kept CPU outputs of at least this many bytes are reduced one by one with a float sum instead of joining the
#: multi-tensor L1 norm: on a CPU torch's `_foreach_norm` loops over a vector norm that reads about 4 GB/s on one
#: thread, a sum about 17-21 GB/s (bench/provenance_pass.py), so from here on the saving exceeds an operation's
#: dispatch (a few µs). Either value is non-finite when the output holds a NaN or an infinity.
SUM_ALONE_BYTES = 64 * 1024


@dataclass
class ActivationCapture:
    """What the hooks queued for one report. Tensors are on the device; the rest is host bookkeeping."""

    calls: list[int] = field(default_factory=list)  # module index (INPUT: the input) of each value, in call order
    values: list[torch.Tensor] = field(default_factory=list)  # 0-d float32: non-finite iff that output was
    order: list[int] = field(default_factory=list)  # module indexes in order of first call
    seen: dict[int, int] = field(default_factory=dict)  # the same indexes -> their position in `order`
    full: bool = False
    eager: bool = False  # every output reduced when its module returns (full and learning reports)
    # Outputs kept until the next flush: the tensor, its version when its module returned, the call's index and,
    # for eager calls, the value already taken (then the tensor is kept only to learn of later in-place writes).
    pending: list[tuple[torch.Tensor, int, int, torch.Tensor | None]] = field(default_factory=list)
    # Full reports: outputs whose statistics are computed at the next flush, in same-shape stacks (the tensor, its
    # version when its module returned, the call's index, the module's output bounds).
    deferred: list[tuple[torch.Tensor, int, int, tuple[float, float] | None]] = field(default_factory=list)
    pending_bytes: int = 0  # bytes and calls observed since the last flush (kept or not)
    pending_calls: int = 0
    forwards: int = 0  # forwards of the model that ended in this report
    # From the second forward of a report on (gradient accumulation, forwards without monitor.step()): the values
    # folded per call index (position index + 1), so that a report holds O(modules) values whatever the forwards.
    folded: torch.Tensor | None = None
    stats: dict[int, torch.Tensor] = field(default_factory=dict)  # module index -> STATS_PER_MODULE values
    output_spread: torch.Tensor | None = None
    output_rms: torch.Tensor | None = None
    input_mean: torch.Tensor | None = None  # per feature, at most MAX_INPUT_FEATURES
    input_std: torch.Tensor | None = None
    # What the previously observed module returned (one tensor held until the next observed call or `take()`), its
    # version then, and the position in `order` of the module whose counted value vouches for it (its own, or for
    # an implied output the one that implied it): `_implied`.
    last_output: tuple[torch.Tensor, int, int] | None = None

    @property
    def sums(self) -> dict[int, torch.Tensor]:
        """Per module index, its reduced value (calls of a reused module added), after the last flush."""
        out: dict[int, torch.Tensor] = {}
        if self.folded is not None:
            out = {i: self.folded[i + 1] for i in self.seen}
        for index, value in zip(self.calls, self.values, strict=True):
            if index != INPUT:
                out[index] = value if index not in out else out[index] + value
        return out

    @property
    def has_input(self) -> bool:
        return self.folded is not None or INPUT in self.calls or any(entry[2] == INPUT for entry in self.pending)


class ActivationTap:
    """Forward hooks on the watched modules of one model (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        layer_names: set[str],
        is_full: Callable[[], bool],
        add_agent_time: Callable[[float], None],
    ) -> None:
        """`layer_names`: the schema's module names ("" for the root); `is_full()` says whether the report
        being prepared is a full-statistics one; hook time is handed to `add_agent_time`. Nothing is hooked
        until `install()`."""
        self._model = weakref.ref(model)
        self._is_full = is_full
        self._add_agent_time = add_agent_time
        self._capture: ActivationCapture | None = None
        self._watches: list[dispatch.Watch] = []
        self._samples: dict[tuple[int, torch.device], torch.Tensor | None] = {}
        self._eager: set[int] = set()  # call indexes whose outputs are written in place later (module docstring)
        self._learning = True  # the first report reduces every output when it returns, and learns `_eager`
        self._fold_index: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        # Weak references: a closed tap must not keep a deleted model alive.
        self._watched = [(name, weakref.ref(module)) for name, module in model.named_modules()
                         if name in layer_names or isinstance(module, ACTIVATION_TYPES)]  # fmt: skip
        self.names = tuple(name or "<root>" for name, _ in self._watched)
        self._fold_limit = _FOLD_VALUES * (len(self._watched) + 1)
        self.module_types = tuple(type(ref()).__name__ for _, ref in self._watched)

    def install(self) -> None:
        """Register the hooks (once)."""
        if self._watches:
            return
        for index, (_, ref) in enumerate(self._watched):
            module = ref()
            if module is not None:
                hook = self._output_hook(index, _bounds(module), _contracting(module))
                self._watches.append(dispatch.watch_module(module, post=hook))
        model = self._model()
        if model is not None:
            self._watches.append(dispatch.watch_module(model, pre=self._input_hook, post=self._model_output_hook))

    def take(self) -> ActivationCapture | None:
        """The capture since the last call (its kept outputs reduced now), or None when no forward ran."""
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.last_output = None  # the one output held for `_implied`: not beyond its report
            self._learning = False
            if capture.pending or capture.deferred:
                self._flush(capture)
        return capture

    def remove(self) -> None:
        watches, self._watches = self._watches, []
        for watch in watches:
            watch.remove()

    # ------------------------------------------------------------------ hooks (training thread)

    def _current(self) -> ActivationCapture:
        capture = self._capture
        if capture is None:
            full = self._is_full()
            capture = self._capture = ActivationCapture(full=full, eager=full or self._learning)
        return capture

    def _positions(self, a: torch.Tensor) -> torch.Tensor | None:
        """The cached sample positions for outputs the size of `a` (see `sample_positions`)."""
        key = (a.numel(), a.device)
        if key not in self._samples:
            if len(self._samples) >= _MAX_SAMPLE_SIZES:  # a model with ever-changing shapes: start over
                self._samples.clear()
            self._samples[key] = sample_positions(a.numel(), a.device)
        return self._samples[key]

    def _keep(self, capture: ActivationCapture, t: torch.Tensor, index: int, value: torch.Tensor | None) -> None:
        """Keep output `t` of call `index` until the next flush (`value`: already reduced, kept to learn only)."""
        capture.pending.append((t, t._version, index, value))

    def _tick(self, capture: ActivationCapture, t: torch.Tensor) -> None:
        """Count an observed call towards the bounds, kept or not (so that a forward's flushes fall at the same
        calls on learning and ordinary reports), and flush when one is reached."""
        capture.pending_bytes += t.numel() * t.element_size()
        capture.pending_calls += 1
        if capture.pending_bytes >= PENDING_BYTES or capture.pending_calls >= PENDING_CALLS:
            self._flush(capture)
        if len(capture.values) > self._fold_limit:
            self._fold(capture)

    def _flush(self, capture: ActivationCapture) -> None:
        """Reduce the kept outputs (one multi-tensor norm per device and dtype; large CPU outputs a sum each) and
        learn which modules' outputs were written in place since they returned (reduced eagerly from now on)."""
        pending, capture.pending, capture.pending_bytes, capture.pending_calls = capture.pending, [], 0, 0
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]] = {}
        alone: list[tuple[torch.Tensor, int]] = []
        for t, version, index, value in pending:
            if t._version != version:
                self._eager.add(index)
            if value is not None:
                capture.calls.append(index)
                capture.values.append(value)
                continue
            if t.is_cpu and t.nbytes >= SUM_ALONE_BYTES:
                alone.append((t, index))
                continue
            group = groups.get((t.device, t.dtype))
            if group is None:
                group = groups[(t.device, t.dtype)] = ([], [])
            group[0].append(t)
            group[1].append(index)
        with torch.no_grad():
            for (_, dtype), (tensors, indexes) in groups.items():
                accumulate = torch.float64 if dtype == torch.float64 else _F32
                capture.calls += indexes
                capture.values += torch._foreach_norm(tensors, 1, dtype=accumulate)
            for t, index in alone:
                capture.calls.append(index)
                capture.values.append(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else _F32))
            if capture.deferred:
                self._flush_deferred(capture)

    def _flush_deferred(self, capture: ActivationCapture) -> None:
        """A full report's deferred outputs: their provenance sums and statistics by same-shape stacks
        (module_stats.py; per (shape, dtype, bounds) and STACK_BYTES, a constant number of launches each), the
        values `module_stats` gives for each one alone. An output written in place since its module returned
        (its version moved) makes the module eager, as in `_flush`, and is measured as written on this report."""
        deferred, capture.deferred = capture.deferred, []
        by_bounds: dict[tuple[float, float] | None, tuple[list[torch.Tensor], list[int]]] = {}
        for t, version, index, bounds in deferred:
            if t._version != version:
                self._eager.add(index)
            tensors, indexes = by_bounds.setdefault(bounds, ([], []))
            tensors.append(t)
            indexes.append(index)
        for bounds, (tensors, indexes) in by_bounds.items():
            chunks, rest = stacks(tensors)
            for positions, x in chunks:
                x32 = x.to(_F32).view(x.shape[0], *tensors[positions[0]].shape)
                if stacks_module.rows_sum_alike(x.device):
                    totals, alone = x.sum(1, dtype=_F32), None
                else:  # float sums of each output alone (stacks.py); the order-free reductions stacked
                    totals = torch.stack([tensors[i].sum(dtype=_F32) for i in positions])
                    alone = [tensors[i].to(_F32) for i in positions]
                rows = stacked_module_stats(x32, bounds, totals, alone)
                capture.calls += [indexes[i] for i in positions]
                capture.values += totals.unbind()
                for i, row in zip(positions, rows.unbind(), strict=True):
                    capture.stats[indexes[i]] = row
            for i in rest:  # no longer stackable: made non-contiguous in place (t_(), as_strided_()) since it returned
                a = tensors[i].detach()
                total = a.sum(dtype=_F32)
                capture.calls.append(indexes[i])
                capture.values.append(total)
                capture.stats[indexes[i]] = module_stats(a.to(_F32), bounds, total, self._positions(a))

    def _fold(self, capture: ActivationCapture) -> None:
        """Add the report's values into one vector indexed by call index + 1 (a stack and an index_add)."""
        if not capture.values:
            return
        device = capture.values[0].device
        values = [v if v.device == device else v.to(device, non_blocking=True) for v in capture.values]
        key = (tuple(capture.calls), device)
        index = self._fold_index.get(key)
        if index is None:
            if len(self._fold_index) >= _MAX_SAMPLE_SIZES:
                self._fold_index.clear()
            index = self._fold_index[key] = torch.tensor([c + 1 for c in capture.calls], device=device)
        if capture.folded is None:
            capture.folded = torch.zeros(len(self.names) + 1, dtype=_F32, device=device)
        elif capture.folded.device != device:
            capture.folded = capture.folded.to(device, non_blocking=True)
        capture.folded.index_add_(0, index, torch.stack(values).to(_F32))
        capture.calls, capture.values = [], []

    def _input_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None or not torch.is_grad_enabled() or not x.is_floating_point() or not x.numel():
            return
        # No grad-mode context: everything here derives from the detached input.
        with errors.guarded("input_hook", self._add_agent_time):
            capture = self._current()
            if capture.eager or INPUT in self._eager or not _deferrable(x):
                a = x.detach() if x.requires_grad else x
                s = a.sum(dtype=_F32)
                if capture.eager:
                    self._keep(capture, x, INPUT, s)
                else:
                    capture.calls.append(INPUT)
                    capture.values.append(s)
                if capture.full and capture.input_mean is None and x.dim() >= 2:
                    capture.input_mean, capture.input_std = _feature_moments(a)
            else:
                self._keep(capture, x, INPUT, None)
            self._tick(capture, x)

    def _model_output_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        capture = self._capture
        if capture is None or not torch.is_grad_enabled():
            return
        with errors.guarded("output_hook", self._add_agent_time):
            if capture.pending or capture.deferred:  # the end of a forward: one reduction for the outputs kept
                self._flush(capture)
            else:  # each forward counts its calls from 0 whatever was kept (the same flushes on every report)
                capture.pending_bytes = capture.pending_calls = 0
            capture.forwards += 1
            if capture.forwards > 1:
                self._fold(capture)
            out = _first_tensor(output) if capture.full and capture.output_spread is None else None
            if out is not None and out.dim() >= 2 and out.shape[0] > 1:
                with torch.no_grad():
                    o = out.detach().to(_F32).reshape(out.shape[0], -1)
                    capture.output_spread = o.std(dim=0, correction=0).mean()
                    capture.output_rms = torch.linalg.vector_norm(o) / math.sqrt(o.numel())

    def _output_hook(self, index: int, bounds: tuple[float, float] | None, contracting: bool) -> Callable[..., None]:
        # Runs for every watched module on every training step: on ordinary steps a few attribute reads and a
        # list append (the output is reduced with the others at the end of the forward, see the module
        # docstring). No grad-mode context: every value derives from a detached tensor, so autograd records nothing.
        # errors.guarded's work written out (a try and two clock reads, no context-manager object): this runs on
        # every watched module call.
        eager = self._eager
        add_time = self._add_agent_time

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            if isinstance(output, torch.Tensor):
                out = output if output.is_floating_point() and output.numel() else None
            else:
                out = _first_tensor(output)
            if out is None:
                return
            started = _clock()
            try:
                capture = self._current()
                position = capture.seen.get(index)
                first = position is None
                if position is None:
                    position = capture.seen[index] = len(capture.order)
                    capture.order.append(index)
                last = capture.last_output
                anchor = None  # below: the common fresh output of a non-contracting module skips the call
                if last is not None and (contracting or out is last[0] or out._base is not None):
                    anchor = _implied(last, position, out, args, contracting)
                implied = anchor is not None
                capture.last_output = (out, out._version, position if anchor is None else anchor)
                if capture.eager and first and (capture.full or not implied):
                    if capture.full and not self._learning and index not in eager and stackable(out):
                        capture.deferred.append((out, out._version, index, bounds))  # see _flush_deferred
                        if not implied:
                            self._tick(capture, out)
                        return
                    a = out.detach()
                    s = a.sum(dtype=_F32)
                    self._keep(capture, out, index, s)  # kept to learn of in-place writes after it
                    if capture.full:
                        capture.stats[index] = module_stats(a.to(_F32), bounds, s, self._positions(a))
                elif implied:
                    return
                elif capture.eager:  # a later call on a learning or full report: kept to learn of writes after it
                    self._keep(capture, out, index, out.detach().sum(dtype=_F32))
                elif index in eager or not _deferrable(out):
                    capture.calls.append(index)
                    capture.values.append(out.detach().sum(dtype=_F32))
                else:
                    self._keep(capture, out, index, None)
                if not implied:
                    self._tick(capture, out)
            except Exception as exc:
                errors.report(exc, "forward_hook")
            finally:
                add_time(_clock() - started)

        return hook


def _implied(
    last: tuple[torch.Tensor, int, int], position: int, out: torch.Tensor, args: Any,
    contracting: bool,
) -> int | None:  # fmt: skip
    """The position of the module that vouches for `out` (the output of the call at `position` in forward order),
    or None when `out` needs its own value (module docstring). `last`: the previously observed output, its version
    when it returned and the position of the module vouching for it. `out` is implied when it can only be
    non-finite if that module's counted value is, and that module comes no later in forward order:
    - its elements are elements of the last output, unwritten since (a container returning its last child's
      output, a view or slice of it, the same tensor handed on), or
    - the module is contracting and its input is such a part of the last output, unwritten since it returned
      (out of place), or written once since, by this module itself (in place: `out` is its input, one version on).
    """
    kept, version, anchor = last
    if position < anchor:
        return None
    if (out is kept or (out._base is not None and _within(out, kept))) and out._version == version:
        return anchor
    if contracting and args:
        x = args[0]
        if (x is kept or (isinstance(x, torch.Tensor) and x._base is not None and _within(x, kept))) and (
            x._version == version or (x is out and x._version == version + 1)
        ):
            return anchor
    return None


def _within(x: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether every element of `x` is an element of `t`, read as the same dtype, with one version counter
    shared by both (so equal versions mean no in-place write to either in between): `x` is `t`, or both are
    views of one base and `x`'s elements lie in `t`'s (contiguous `t`: its address range; otherwise the very
    same geometry)."""
    if x is t:
        return True
    xb, tb = x._base, t._base
    if (x if xb is None else xb) is not (t if tb is None else tb) or x.dtype != t.dtype:
        return False
    if not t.is_contiguous():
        return x.data_ptr() == t.data_ptr() and x.shape == t.shape and x.stride() == t.stride()
    size = t.element_size()
    start, misaligned = divmod(x.data_ptr() - t.data_ptr(), size)
    if start < 0 or misaligned or any(s < 0 for s in x.stride()):
        return False
    return start + sum((n - 1) * s for n, s in zip(x.shape, x.stride(), strict=True)) < t.numel()


def _deferrable(t: torch.Tensor) -> bool:
    """Whether `t` can join the multi-tensor reduction: a plain dense tensor (a subclass such as DTensor, or a
    sparse output, is reduced on its own when its module returns)."""
    return type(t) is torch.Tensor and t.layout is torch.strided


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() and output.numel() else None
    if isinstance(output, tuple | list) and output:
        return _first_tensor(output[0])
    return None


def _feature_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (population) of each of the first MAX_INPUT_FEATURES units of `x` (2+-D), reduced in
    place over the other dimensions (NaN for an empty batch). Moments of the differences from the first
    sample's values: close to a two-pass std when that sample is typical (within a few standard deviations of
    the mean), e.g. for features far from zero, at one-tenth of a CPU's std_mean (a slow loop)."""
    unit_dim = unit_dim_of(x.shape)
    assert unit_dim is not None
    x = x.narrow(unit_dim, 0, min(MAX_INPUT_FEATURES, x.shape[unit_dim])).to(_F32)
    if x.numel() == 0:
        missing = torch.full((x.shape[unit_dim],), float("nan"), device=x.device)
        return missing, missing
    reduce = reduce_dims(x.shape)
    first = x
    for d in reduce:
        first = first.narrow(d, 0, 1)
    shifted = x - first
    mean = shifted.mean(dim=reduce)
    variance = shifted.square().mean(dim=reduce) - mean.square()
    return mean + first.reshape(-1), variance.clamp_(min=0.0).sqrt_()


def label_histogram(labels: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """LABEL_BINS class counts of integer `labels` on `device`; None for float labels. Labels above the range
    count in the last bin; negative ones (an ignore_index such as -100) count nowhere."""
    if labels.is_floating_point() or labels.is_complex() or labels.numel() == 0:
        return None
    with torch.no_grad():
        flat = labels.detach().reshape(-1).to(device=device, dtype=torch.long, non_blocking=True)
        counts = torch.zeros(LABEL_BINS, dtype=_F32, device=device)
        return counts.index_add_(0, flat.clamp(0, LABEL_BINS - 1), (flat >= 0).to(_F32))


@dataclass(slots=True)  # not frozen: built on every step, and a frozen __init__ costs 5x
class ActivationItem:
    """Where one report's activation values sit in its vector (from `offset`), for the sender thread:

    one provenance value per observed call (`calls`: the module index of each, INPUT for the model's input;
    forward `order` gives the modules in order of first call), then on full steps M × VALUES_PER_MODULE values
    (module-major: the statistics, then the log2 histogram), the output spread and RMS, `input_features` means
    and as many stds, and `label_bins` label counts.
    """

    offset: int
    num_modules: int
    order: tuple[int, ...]
    calls: tuple[int, ...]
    full: bool
    has_output_spread: bool = False
    input_features: int = 0
    label_bins: int = 0

    @property
    def has_input(self) -> bool:
        return INPUT in self.calls

    @property
    def length(self) -> int:
        n = len(self.calls)
        if self.full:
            n += self.num_modules * VALUES_PER_MODULE + 2 + 2 * self.input_features + self.label_bins
        return n


def _to_device(capture: ActivationCapture, device: torch.device) -> None:
    """Move values to the report's device: the process-wide pre-hook sees the input before the model's own
    pre-hooks, which may move it (FSDP2's does)."""
    for name in ("input_mean", "input_std"):
        value = getattr(capture, name)
        if value is not None and value.device != device:
            setattr(capture, name, value.to(device, non_blocking=True))
    if any(v.device != device for v in capture.values):
        capture.values = [v if v.device == device else v.to(device, non_blocking=True) for v in capture.values]


def assemble(
    capture: ActivationCapture | None,
    num_modules: int,
    labels: torch.Tensor | None,
    offset: int,
    zero: torch.Tensor,
) -> tuple[list[Segment], ActivationItem | None]:
    """The segments (snapshot.py) to append to a report vector at `offset`, and their description.

    Nothing when no training forward ran and no labels came; placeholders are NaN (statistics of a module
    not called at this step). `capture` comes from `ActivationTap.take()` (its outputs reduced).
    """
    if capture is None and labels is None:
        return [], None
    capture = capture or ActivationCapture(full=True)
    _to_device(capture, zero.device)
    parts: list[Segment] = [list(capture.values)] if capture.values else []
    calls = tuple(capture.calls)
    if capture.folded is not None:
        folded = capture.folded if capture.folded.device == zero.device else capture.folded.to(zero.device)
        parts.insert(0, folded)
        calls = (INPUT, *range(num_modules), *calls)
    item = ActivationItem(offset, num_modules, tuple(capture.order), calls, capture.full)
    if not capture.full:
        return parts, item
    missing = torch.full((VALUES_PER_MODULE,), float("nan"), device=zero.device)
    stats = [capture.stats.get(i, missing) for i in range(num_modules)]
    if stats:
        parts.append(torch.cat(stats))
    spread, rms = capture.output_spread, capture.output_rms
    parts.append(torch.stack([zero if spread is None else spread, zero if rms is None else rms]))
    features = 0
    if capture.input_mean is not None and capture.input_std is not None:
        features = capture.input_mean.numel()
        parts += [capture.input_mean, capture.input_std]
    if labels is not None:
        parts.append(labels)
    item = ActivationItem(offset, num_modules, item.order, item.calls, True, spread is not None, features,
                          0 if labels is None else labels.numel())  # fmt: skip
    return parts, item
