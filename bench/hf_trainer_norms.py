#!/usr/bin/env python3
"""The Hugging Face Trainer's gradient-norm pass feeding the agent: what the agent adds per optimizer step when
it takes its gradient norms from the Trainer's `Accelerator.clip_grad_norm_` (GradwatchCallback's default)
against measuring them itself (`trainer_norms=False`), and against no agent.

A small GPT-2 (randomly initialised, nothing downloaded) trained by `transformers.Trainer` on random tokens, one
variant after another in one process, each for `--warm` + `--probe` optimizer steps:
- device operations: a TorchDispatchMode counts every aten operation dispatched from the Trainer's
  `on_step_begin` to its `on_step_end` (forward, backward, the Trainer's norm and clip, the optimizer step, the
  callback's `monitor.step()`) over the probe steps; the difference from no agent is what the agent launches;
- training-thread CPU: `time.thread_time()` over the same span of each step, median over the probe steps (the
  probe for operations runs separately from the timed steps, the counter's own cost left out), variants
  interleaved in rounds, a different one first in each.
The agent streams to a real `gradwatch serve` in its own process, a new run id per training; `overhead_budget=0`
and a full-statistics interval longer than the run keep the measured steps ordinary ones (and update-ratio steps,
every 8th), and the server's FULL_STATS commands are ignored: a detector that fires on this synthetic run asks
for full statistics, a diagnosis the user wants, not the agent's running cost.

    python bench/hf_trainer_norms.py [--max-grad-norm 1.0] [--rounds 3] [--warm 10] [--probe 30] [--layers 4]
                                     [--width 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import transformers

from gradwatch.integrations.huggingface import GradwatchCallback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # shared process helpers
from agent_ops import OpCounter  # bench/ is this script's directory

from paging_support import gradwatch_serve

VARIANTS = ("none", "trainer_norms", "own_pass")
_RUNS = itertools.count()


class _Probe(transformers.TrainerCallback):  # type: ignore[misc]
    """Thread CPU per optimizer step after `warm` steps; with `count`, aten operations instead."""

    def __init__(self, warm: int, count: bool, agent: GradwatchCallback | None) -> None:
        self.warm, self.count, self.agent = warm, count, agent
        self.cpu_s: list[float] = []
        self.ops: list[collections.Counter[str]] = []
        self._mode: OpCounter | None = None
        self._t0 = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor = getattr(self.agent, "monitor", None)
        if monitor is not None:  # the agent at its own cadence (see the module docstring)
            monitor._sender._on_command = lambda steps, reason: None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step < self.warm:
            return
        if self.count:
            self._mode = OpCounter()
            self._mode.__enter__()
        self._t0 = time.thread_time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step <= self.warm:
            return
        elapsed = time.thread_time() - self._t0
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.ops.append(self._mode.ops)
            self._mode = None
        else:
            self.cpu_s.append(elapsed)


class _Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int, length: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(variant: str, server: str, opts: argparse.Namespace, count: bool, workdir: pathlib.Path) -> _Probe:
    config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=opts.width, n_layer=opts.layers,
                                     n_head=4)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    steps = opts.warm + opts.probe
    args = transformers.TrainingArguments(
        output_dir=str(workdir), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
        max_grad_norm=opts.max_grad_norm, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    agent = None
    if variant != "none":
        agent = GradwatchCallback(server=server, trainer_norms=variant == "trainer_norms", overhead_budget=0,
                                  full_stats_interval=10_000, run=f"hf-norms-{variant}-{next(_RUNS)}")  # fmt: skip
    probe = _Probe(opts.warm, count, agent)
    callbacks = [agent, probe] if agent else [probe]  # the probe last: its on_step_end follows monitor.step()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(steps * 8, 64, 512),
                                   callbacks=callbacks)  # fmt: skip
    trainer.train()
    return probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="the Trainer's (0: measure, no clip)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", type=int, default=10)
    parser.add_argument("--probe", type=int, default=30)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--json", type=pathlib.Path)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    result: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "max_grad_norm": opts.max_grad_norm, "ops": {}, "cpu_ms": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, gradwatch_serve(pathlib.Path(tmp) / "server") as server:
        work = pathlib.Path(tmp)
        for variant in VARIANTS:
            counts = train(variant, server, opts, True, work / f"ops-{variant}").ops
            totals = sorted(sum(c.values()) for c in counts)
            result["ops"][variant] = {"median": statistics.median(totals), "range": [totals[0], totals[-1]],
                                      "norm_ops": statistics.median(
                                          c["_foreach_norm"] + c["linalg_vector_norm"] for c in counts)}  # fmt: skip
        cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(opts.rounds):
            for variant in VARIANTS[r % 3:] + VARIANTS[: r % 3]:  # each variant first in some round
                probe = train(variant, server, opts, False, work / f"cpu-{variant}-{r}")
                cpu[variant].append(statistics.median(probe.cpu_s) * 1e3)
        result["cpu_ms"] = {v: {"rounds": [round(x, 3) for x in xs], "median": round(statistics.median(xs), 3)}
                            for v, xs in cpu.items()}  # fmt: skip
    base_ops = result["ops"]["none"]["median"]
    base_ms = result["cpu_ms"]["none"]["median"]
    print(f"GPT-2 {opts.layers} layers x {opts.width}, Trainer max_grad_norm={opts.max_grad_norm}, "
          f"{opts.probe} probe steps, {opts.rounds} rounds")  # fmt: skip
    print(f"{'variant':<15}{'ops/step':>10}{'added':>8}{'norm ops':>10}{'CPU ms/step':>13}{'added ms':>10}")
    for v in VARIANTS:
        ops, ms = result["ops"][v], result["cpu_ms"][v]["median"]
        print(f"{v:<15}{ops['median']:>10}{ops['median'] - base_ops:>8}{ops['norm_ops']:>10}{ms:>13.3f}"
              f"{ms - base_ms:>+10.3f}")  # fmt: skip
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
