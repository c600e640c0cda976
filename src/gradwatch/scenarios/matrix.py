"""The generated scenario matrix: training runs drawn from a seed, each with its ground truth.

Beside the fixed catalogue, `draw(seed)` picks, deterministically from the seed: a model family (MLP, CNN,
GRU/LSTM, transformer; with or without normalisation and residual connections where the family allows), an
optimizer and learning-rate schedule, a batch size, a world size (1–4; above 1 the run is real DDP over
torch.multiprocessing spawn + gloo on the CPU), a fault kind, its onset and where in the step it is injected
(the data, a module's forward output, the optimizer, the backward pass, or the weights after the optimizer step).
About a third of the runs are healthy. A learning-rate jump's ground truth is `update_ratio`, the detector that
reads the cause: on the matrix's small, often normalised models a rate 30× or 300× too high mostly neither
explodes the gradients nor diverges the loss (several runs train better), while every update jumps far above
the layer's own level. A loss scaled by 1e4 before backward (`loss_scale`) is the gradient blow-up
`exploding_gradient` must see. A bad batch (labels shifted by one class, float inputs ×6) is a
spike only on a model that has learned something: `MatrixResult.effect` says how far its loss rose over the clean
batch's at the same weights, and one under `VISIBLE` is reported apart from loss_spike's recall. A corrupt rank's
effect is how far its loss left the other ranks' over the next 20 steps.

Too few bad batches are visible among a seed's own draws to measure loss_spike's recall (about one run in 14 is a
bad batch, and at an onset of 45–70 most land on models that learned little: 9 of 24 visible over 320 seeds). So
`draw(seed, extra_bad_batch=True)` gives each seed a second, extra run: the seed's own model, normalisation,
optimizer, schedule, batch size and world size (the same draws), its fault replaced by a bad batch of the same
kind and size (nothing is made larger), at an onset drawn apart from the seed's other draws in `EXTRA_ONSET`
(steps 75–105 of 120: after the fast descent, where most of a real run's steps are, so that wrong labels cost
the model something). About 70 % of those are visible (142 of the 200 tuning seeds 7000–7199 at world size 1).
A matrix report counts them in loss_spike's row and says how many came from each stream; the seeds' own runs,
healthy ones included, are unchanged.

`MatrixRun.expect` / `rank` / `layer` are the ground truth: the detector the fault must
raise at or after the onset, the rank it must name first (rank faults) and the layer or module it must name
(layer faults). `run_matrix(run)` trains it with the real agent against a real embedded server and returns a
`MatrixResult`; `bench/detection_quality.py --matrix` aggregates many, tests/scenarios/test_matrix.py runs a
fixed-seed subset.

Every run is small (seconds on one CPU thread per rank); its own seed drives its data, so reruns agree.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["EXTRA_ONSET", "FAULTS", "SPLIT", "VISIBLE", "MatrixResult", "MatrixRun", "draw", "run_matrix", "trace"]

FAMILIES = ("mlp", "cnn", "rnn", "transformer")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")
STEPS = 120
#: A bad batch is a spike when its loss is at least this × the clean batch's at the same weights (loss_spike's
#: documented factor): below it, it is reported apart from loss_spike's recall (MatrixResult.visible).
VISIBLE = 1.5
#: The extra bad-batch stream's onsets (first, last step): after the warm-up's fast descent, so the model has
#: learned enough for wrong labels to cost it something (see the module docstring).
EXTRA_ONSET = (75, 105)
#: The loss_scale fault's factor on the loss before backward (the loss the monitor sees is the true one).
LOSS_SCALE = 1e4
#: fault kind -> (where in the step it is injected, the smallest world size it needs)
FAULTS: dict[str, tuple[str, int]] = {
    "healthy": ("none", 1),
    "nan_input": ("data", 1),
    "nan_forward": ("forward", 1),
    "lr_jump": ("optimizer", 1),
    "bad_batch": ("data", 1),
    "not_in_optimizer": ("optimizer", 1),
    "bitflip": ("after_step", 2),
    "corrupt_rank": ("data", 2),
    "loss_scale": ("backward", 1),
}
#: Kinds drawn as a share of another kind's draws (so seeds drawn before they existed keep their other faults):
#: kind -> (the kind whose draws it takes, the share).
SPLIT: dict[str, tuple[str, float]] = {"loss_scale": ("lr_jump", 0.5)}
#: Detectors that describe the same fault from another angle: they may fire too (never counted as false).
ALLOW: dict[str, tuple[str, ...]] = {
    "nan_input": ("input_not_normalized",),
    "nan_forward": (),
    "lr_jump": ("exploding_gradient", "loss_divergence", "loss_spike", "non_finite", "dead_relu",
                "output_collapse", "saturated_activation", "frozen_parameters", "loss_not_decreasing",
                "rank_divergence", "activation_not_centered", "vanishing_gradient", "gradients_not_applied"),
    "bad_batch": ("update_ratio",),  # its update is as outsized as its loss (SGD: the gradient's size)
    "not_in_optimizer": ("frozen_parameters",),
    "loss_scale": ("loss_divergence", "loss_spike", "update_ratio", "non_finite", "dead_relu", "output_collapse",
                   "saturated_activation", "frozen_parameters", "loss_not_decreasing", "rank_divergence",
                   "activation_not_centered", "vanishing_gradient", "gradients_not_applied"),
    "bitflip": (),
    "corrupt_rank": ("loss_spike", "loss_divergence", "exploding_gradient", "input_not_normalized",
                     "update_ratio", "class_imbalance", "dead_relu", "output_collapse", "saturated_activation",
                     "activation_not_centered", "non_finite", "loss_not_decreasing"),
}  # fmt: skip


@dataclass(frozen=True)
class MatrixRun:
    """One generated run and its ground truth (see the module docstring)."""

    seed: int
    family: str
    norm: bool
    residual: bool
    optimizer: str
    schedule: str
    batch: int
    world_size: int
    fault: str
    onset: int | None
    where: str
    expect: str | None
    rank: int | None
    layer: str | None
    steps: int = STEPS
    #: Drawn by `draw(extra_bad_batch=True)`: the extra bad-batch stream, not the seed's own fault.
    extra: bool = False

    @property
    def healthy(self) -> bool:
        return self.expect is None

    @property
    def name(self) -> str:
        return f"m{self.seed}{'x' if self.extra else ''}-{self.family}-{self.fault}-w{self.world_size}"


@dataclass
class MatrixResult:
    """What a run raised: every alert (firing and resolved) as the server's dicts, and when the fault began."""

    run: MatrixRun
    alerts: list[dict[str, Any]]
    onset_wall: float | None
    seconds: float
    #: bad_batch: the faulty batch's loss / the loss the clean batch had at the same weights (how visible the
    #: fault is in the loss; a model still at chance gets no higher loss from wrong labels). corrupt_rank: the bad
    #: rank's median loss over the 20 steps from the onset / the other ranks' median over those steps.
    effect: float | None = None

    @property
    def visible(self) -> bool:
        """Whether the fault shows in what its detector reads: a bad batch whose loss stayed under VISIBLE × the
        clean batch's at the same weights is no spike (a model at chance has nothing to lose), and is reported
        apart from loss_spike's recall."""
        return self.run.fault != "bad_batch" or self.effect is None or self.effect >= VISIBLE

    def first(self, detector: str) -> dict[str, Any] | None:
        """The first alert of `detector` that started at or after the onset."""
        found = [a for a in self.alerts if a["detector"] == detector and a["step"] >= (self.run.onset or 0)]
        return min(found, key=lambda a: a["step"]) if found else None

    def caught(self) -> bool:
        return self.run.expect is not None and self.first(self.run.expect) is not None

    def loud(self, allow: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Warning and critical alerts from detectors outside `allow`, less those inhibited by one that fired."""
        from gradwatch.server.detectors import inhibitions

        rules = inhibitions()
        fired = {a["detector"] for a in self.alerts}
        inhibited = {target for source in fired for target in rules.get(source, ())}
        quiet = set(allow) | inhibited
        return [a for a in self.alerts if a["severity"] in ("warning", "critical") and a["detector"] not in quiet]

    def localised(self) -> bool | None:
        """Top-1 localisation of the expected alert: the right rank first, the right layer or module (None when
        the fault has neither, or the alert never fired)."""
        alert = self.first(self.run.expect) if self.run.expect else None
        if alert is None or (self.run.rank is None and self.run.layer is None):
            return None
        ok = True
        if self.run.rank is not None:
            ok &= f"rank {self.run.rank} " in alert["summary"] or (alert["ranks"] or [None])[0] == self.run.rank
        if self.run.layer is not None:  # a DDP-wrapped model's layers are named under "module."
            named = {alert.get("layer"), (alert.get("layer") or "").removeprefix("module.")}
            ok &= self.run.layer in named or f"'{self.run.layer}'" in alert["summary"].replace("'module.", "'")
        return ok


def draw(seed: int, max_world: int = 4, *, extra_bad_batch: bool = False) -> MatrixRun:
    """The run of `seed` (deterministic); world sizes above `max_world` are drawn down to it.

    `extra_bad_batch`: the seed's run with its fault replaced by a bad batch at a late onset (EXTRA_ONSET), for
    an extra stream of loss_spike runs (module docstring); every other draw is the seed's own."""
    rng = random.Random(seed)
    family = rng.choice(FAMILIES)
    norm = family == "transformer" or rng.random() < 0.5
    residual = family == "transformer" or (family in ("mlp", "cnn") and rng.random() < 0.5)
    world = min(max_world, rng.choice((1, 1, 1, 2, 2, 3, 4)))
    kinds = [k for k, (_, need) in FAULTS.items() if need <= world and k not in SPLIT]
    fault = "healthy" if rng.random() < 0.36 else rng.choice([k for k in kinds if k != "healthy"])
    for kind, (parent, share) in SPLIT.items():
        if fault == parent and random.Random(seed * 7919 + 17).random() < share:
            fault = kind
    if extra_bad_batch:
        fault = "bad_batch"
    optimizer = rng.choice(OPTIMIZERS)
    schedule = rng.choice(SCHEDULES)
    batch = rng.choice((16, 32, 64))
    where = FAULTS[fault][0]
    onset: int | None = None if fault == "healthy" else rng.randint(45, 70)
    if extra_bad_batch:  # drawn apart, so that the seed's other draws stay its own
        onset = random.Random(seed * 7919 + 29).randint(*EXTRA_ONSET)
    rank: int | None = None
    layer: str | None = None
    expect: str | None = None
    if fault in ("nan_input", "nan_forward", "bad_batch", "corrupt_rank", "bitflip"):
        rank = rng.randrange(1 if fault == "bitflip" else 0, world)
    if fault in ("nan_input", "nan_forward"):
        expect = "non_finite"
    elif fault == "lr_jump":  # the update ratio reads the cause; the loss and gradients may never show it
        expect = "update_ratio"
    elif fault == "loss_scale":  # gradients 1e4× from the onset (a loss scale never undone): Adam's updates do
        expect = "exploding_gradient"  # not change, SGD's blow up; the gradient norm shows it either way
    elif fault == "bad_batch":
        expect = "loss_spike"
    elif fault == "not_in_optimizer":
        expect, onset = "gradients_not_applied", 1
    elif fault == "bitflip":
        expect = "replica_mismatch"
    elif fault == "corrupt_rank":
        expect = "rank_divergence"
    run = MatrixRun(seed, family, norm, residual, optimizer, schedule, batch, world, fault, onset, where, expect,
                    rank, None, extra=extra_bad_batch)  # fmt: skip
    if fault in ("nan_forward", "not_in_optimizer"):
        names = _layer_names(run)
        layer = names[rng.randrange(len(names))] if fault == "nan_forward" else names[0]
    return dataclasses.replace(run, layer=layer)


# ------------------------------------------------------------------ models and data


class _Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Recurrent(nn.Module):
    def __init__(self, cell: str, norm: bool) -> None:
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(8, 32, batch_first=True)
        self.norm = nn.LayerNorm(32) if norm else nn.Identity()
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.head(self.norm(h[:, -1]))


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 32)
        self.position = nn.Embedding(8, 32)
        self.encoder = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        places = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.encoder(self.embed(tokens) + self.position(places)).mean(dim=1))


def _model(run: MatrixRun) -> nn.Module:
    rng = random.Random(run.seed + 1)
    if run.family == "mlp":
        block: Callable[[], nn.Module] = lambda: nn.Sequential(  # noqa: E731
            nn.Linear(64, 64), nn.LayerNorm(64) if run.norm else nn.Identity(), nn.ReLU()
        )
        body = [(_Residual(block()) if run.residual else block()) for _ in range(2)]
        return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), *body, nn.Linear(64, 4))
    if run.family == "cnn":

        def conv() -> nn.Module:
            return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8) if run.norm else nn.Identity(),
                                 nn.ReLU())  # fmt: skip

        body = [(_Residual(conv()) if run.residual else conv()) for _ in range(2)]
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), *body, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 4))  # fmt: skip
    if run.family == "rnn":
        return _Recurrent(rng.choice(("gru", "lstm")), run.norm)
    return _Transformer()


def _layer_names(run: MatrixRun) -> list[str]:
    """Modules that own parameters directly (the agent's layer schema) and whose forward runs in training (a
    fused attention reads its output projection's weight without calling it), in order."""
    torch.manual_seed(0)
    model = _model(run)
    ran: list[str] = []
    owners = [(n, m) for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: ran.append(n)) for n, m in owners]
    model(_data(run, 0)(1)[0])
    for handle in handles:
        handle.remove()
    return [n for n, _ in owners if n in ran]


def _data(run: MatrixRun, rank: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(run.seed * 7919 + rank)
    fixed = torch.Generator().manual_seed(run.seed)
    b = run.batch
    if run.family == "mlp":
        centres = torch.randn(4, 16, generator=fixed) * 1.5
        return lambda step: _blobs(centres, b, gen)
    if run.family == "cnn":
        patterns = torch.randn(4, 1, 8, 8, generator=fixed)

        def images(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, 4, (b,), generator=gen)
            return patterns[y] + 0.7 * torch.randn(b, 1, 8, 8, generator=gen), y

        return images
    if run.family == "rnn":
        weights = torch.randn(8, generator=fixed)

        def sequences(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(b, 8, 8, generator=gen)
            score = (x @ weights).sum(dim=1)
            return x, torch.bucketize(score, torch.tensor([-3.0, 0.0, 3.0]))

        return sequences

    def tokens(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, 16, (b, 8), generator=gen)
        return t, torch.bucketize(t.sum(dim=1), torch.tensor([50, 60, 70]))  # four classes of about equal size

    return tokens


def _blobs(centres: torch.Tensor, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 4, (b,), generator=gen)
    return centres[y] + 0.5 * torch.randn(b, centres.shape[1], generator=gen), y


def _optimizer(run: MatrixRun, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if run.optimizer == "sgd":
        return torch.optim.SGD(params, lr=0.02, momentum=0.9)
    if run.optimizer == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def _scheduler(run: MatrixRun, optimizer: torch.optim.Optimizer) -> Any:
    if run.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=run.steps)
    if run.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=40, gamma=0.5)
    if run.schedule == "warmup_cosine":
        warm = 20

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / (run.steps - warm))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None


# ------------------------------------------------------------------ one rank's training


def _train_rank(rank: int, run: MatrixRun, target: str, port: int, onset_file: str) -> None:
    """Train `run` as `rank` (a spawned process when world_size > 1), injecting its fault."""
    import gradwatch

    torch.set_num_threads(1)
    distributed = run.world_size > 1
    if distributed:
        import torch.distributed as dist

        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=run.world_size)
    try:
        torch.manual_seed(run.seed)
        model = _model(run)
        module = model
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model)
        params = list(module.parameters())
        if run.fault == "not_in_optimizer":
            skipped = {id(p) for p in dict(module.named_modules())[run.layer].parameters(recurse=False)}
            params = [p for p in params if id(p) not in skipped]
        optimizer = _optimizer(run, params)
        scheduler = _scheduler(run, optimizer)
        data = _data(run, rank)
        hook = None
        if run.fault == "nan_forward" and rank == run.rank:
            state = {"step": 0}
            assert run.layer is not None and run.onset is not None  # a nan_forward run names both (draw())

            hook = _nan_after(module, run.layer, state, run.onset)
        losses: list[float] = []
        norms: list[float] = []
        watch = gradwatch.attach(model, optimizer, run=run.name, server=target) if target else _Unwatched()
        with watch as monitor:
            for step in range(1, run.steps + 1):
                if hook is not None:
                    state["step"] = step
                x, y = data(step)
                at = run.onset is not None and step == run.onset
                if at and rank == (run.rank or 0):
                    with open(onset_file, "w") as f:
                        f.write(repr(time.time()))
                mine = run.rank is None or rank == run.rank
                if at and mine and run.fault == "nan_input":
                    x = x.clone().float() if x.is_floating_point() else x
                    if x.is_floating_point():
                        x.view(-1)[0] = float("nan")
                    else:  # token inputs cannot hold a NaN: the embedding's output does
                        state = {"step": step}
                        hook = _nan_after(module, "embed", state, step)
                clean = None
                if at and mine and run.fault == "bad_batch":  # a label-mapping bug and a decode bug in one batch
                    clean = _clean_loss(module, x, y)
                    y = (y + 1) % 4
                    x = x * 6.0 if x.is_floating_point() else x
                if run.fault == "corrupt_rank" and mine and run.onset is not None and step >= run.onset:
                    y = torch.randint(0, 4, y.shape, generator=torch.Generator().manual_seed(step))
                    x = x * 25.0 + 40.0 if x.is_floating_point() else (x * 7 + 3) % 16
                if at and run.fault == "lr_jump":
                    for group in optimizer.param_groups:
                        group["lr"] *= 30.0 if run.optimizer == "sgd" else 300.0
                    if scheduler is not None:
                        scheduler.base_lrs = [lr * (30.0 if run.optimizer == "sgd" else 300.0)
                                              for lr in scheduler.base_lrs]  # fmt: skip
                loss = nn.functional.cross_entropy(model(x), y)
                if clean is not None:
                    with open(onset_file, "a") as f:
                        f.write(f" {float(loss.detach()) / clean!r}")
                optimizer.zero_grad(set_to_none=True)
                scaled = run.fault == "loss_scale" and run.onset is not None and step >= run.onset
                (loss * LOSS_SCALE if scaled else loss).backward()
                if not target:  # traced without the agent: the gradient norm the agent would report
                    grads = [torch.linalg.vector_norm(p.grad) for p in module.parameters() if p.grad is not None]
                    norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if at and mine and run.fault == "bitflip":
                    with torch.no_grad():
                        weight = next(p for p in module.parameters() if p.dim() >= 2)
                        weight.view(-1).view(torch.int32)[3] ^= 1 << 20
                monitor.step(loss)
                losses.append(float(loss.detach()))
            monitor.close(timeout=60)
        if run.fault == "corrupt_rank" or not target:
            with open(f"{onset_file}.{rank}", "w") as f:
                f.write(" ".join(repr(v) for v in losses))
        if not target:
            with open(f"{onset_file}.{rank}.norms", "w") as f:
                f.write(" ".join(repr(v) for v in norms))
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


class _Unwatched:
    """The monitor's place in a run traced without the agent (`trace`)."""

    def __enter__(self) -> _Unwatched:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def step(self, loss: torch.Tensor) -> None:
        return None

    def close(self, timeout: float) -> None:
        return None


def trace(run: MatrixRun) -> tuple[list[float], list[float], float | None]:
    """Train a world-size-1 `run` without the agent or a server: (its loss and its gradient norm at every step,
    the bad batch's effect). For tuning loss detectors offline on the same runs the matrix draws."""
    if run.world_size != 1:
        raise ValueError(f"trace runs one process; {run.name} has world size {run.world_size}")
    with tempfile.TemporaryDirectory() as tmp:
        onset_file = os.path.join(tmp, "onset")
        _train_rank(0, run, "", 0, onset_file)
        with open(f"{onset_file}.0") as f:
            losses = [float(v) for v in f.read().split()]
        with open(f"{onset_file}.0.norms") as f:
            norms = [float(v) for v in f.read().split()]
        effect = None
        if os.path.exists(onset_file):
            with open(onset_file) as f:
                _, *rest = f.read().split()
            effect = float(rest[0]) if rest else None
    return losses, norms, effect


def _clean_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The loss the clean batch has at the current weights, on a copy (the run's own modules and buffers, batch
    norm's running statistics included, stay as they are)."""
    import copy

    with torch.no_grad():
        return max(float(nn.functional.cross_entropy(copy.deepcopy(module)(x), y)), 1e-12)


def _nan_after(module: nn.Module, name: str, state: dict[str, int], step: int) -> Any:
    """For one step, `name` itself puts a NaN into its output (token models: the input's first module).

    The module's forward is wrapped (not a forward hook): the NaN is then the module's own output, as a numerical
    fault inside it would be, for every observer of that module, whatever order hooks run in."""
    target = dict(module.named_modules())[name]
    forward = target.forward

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        if state["step"] != step:
            return out
        state["step"] = -1
        first = out[0] if isinstance(out, tuple) else out
        first = first.contiguous().clone()  # an output may be a non-contiguous view (a transposed RNN state)
        first.view(-1)[-1] = float("nan")  # the last element: an RNN's last time step, which its head reads
        return (first, *out[1:]) if isinstance(out, tuple) else first

    target.forward = poisoned  # type: ignore[method-assign]
    return target


def run_matrix(run: MatrixRun, config: Any = None) -> MatrixResult:
    """Train `run` (spawned ranks when its world size is above 1) against a fresh embedded server (`config`, a
    ServerConfig; default: ServerConfig.local(), every detector at its defaults)."""
    import torch.multiprocessing as mp

    from gradwatch.server.app import ServerApp
    from gradwatch.server.config import ServerConfig

    started = time.perf_counter()
    app = ServerApp(config or ServerConfig.local())
    app.start()
    with tempfile.TemporaryDirectory() as tmp:
        onset_file = os.path.join(tmp, "onset")
        try:
            if run.world_size == 1:
                _train_rank(0, run, app.grpc_target, 0, onset_file)
            else:
                port = _free_port()
                mp.spawn(_train_rank, args=(run, app.grpc_target, port, onset_file), nprocs=run.world_size)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and not _settled(app, run):
                time.sleep(0.05)
            time.sleep(1.1)  # one tick of the cross-rank detectors (non_finite waits at most hold_s for peers)
            alerts = app.alerts(run=run.name)
        finally:
            app.stop()
        onset_wall = effect = None
        if os.path.exists(onset_file):
            with open(onset_file) as f:
                wall, *rest = f.read().split()
            onset_wall, effect = float(wall), (float(rest[0]) if rest else None)
        if run.fault == "corrupt_rank" and run.onset is not None:
            effect = _rank_effect(onset_file, run, run.onset)
    return MatrixResult(run, alerts, onset_wall, time.perf_counter() - started, effect)


def _rank_effect(onset_file: str, run: MatrixRun, onset: int) -> float | None:
    """corrupt_rank: the bad rank's median loss over the 20 steps from the onset / the other ranks' median over the
    same steps (how far its loss left theirs)."""
    window = slice(onset - 1, onset + 19)
    per_rank = []
    for rank in range(run.world_size):
        try:
            with open(f"{onset_file}.{rank}") as f:
                per_rank.append([float(v) for v in f.read().split()][window])
        except (OSError, ValueError):
            return None
    bad = statistics.median(per_rank[run.rank or 0])
    others = statistics.median(v for r, values in enumerate(per_rank) if r != run.rank for v in values)
    return bad / others if others > 0 else None


def _settled(app: Any, run: MatrixRun) -> bool:
    return any(view.get("run") == run.name and int(view.get("step") or 0) >= run.steps for view in app.runs())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
