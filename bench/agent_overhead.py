#!/usr/bin/env python3
"""Agent overhead: training step time with gradwatch and with other tools vs. without any, side by side.

One process, one training thread (torch.set_num_threads, default 1, CPU). For each model, every variant runs
one block of timed steps per round, in alternating order (bench/overhead/rounds.py), so the machine's noise
hits them alike; tables give medians over rounds of wall and training-thread CPU time per step, the ratio and
added time vs. no agent, and wandb.watch's added time over gradwatch's. gradwatch streams to a real
`gradwatch serve` in its own process; wandb runs offline into a temporary folder; the comparators come from
the `bench` extra and are skipped, with a line saying so, when missing.

On CUDA (`--device cuda`, optionally `--bf16`), wall time waits for the device's queued work before and after
each block, and the training thread's CPU time is what launching and Python cost; `gpt2s` (GPT-2-small-sized)
joins the default models there.

Variants: none, gradwatch (defaults), gradwatch-full (full statistics every step, budget off),
gradwatch-nohooks (forward_hooks=False), gradwatch-guard (guard="skip": the gradient norm judged on every
optimizer step; this loop gives no loss to observe_loss), gradwatch-fixed (full statistics every N steps, budget
off),
wandb (wandb.watch(log="all", log_freq=N)), tensorboard (add_histogram of every parameter and gradient every N
steps), anomaly (torch.autograd.detect_anomaly around forward and backward), floor (no agent: only the device
work gradwatch's defaults must do every step, bench/overhead/variants.py); N = gradwatch's default
full-statistics interval. Models: tiny, mlp, cnn, transformer (bench/overhead/models.py).

    python bench/agent_overhead.py [--models mlp,cnn] [--variants none,gradwatch,wandb] [--rounds 7]
                                   [--steps 30] [--warm-steps 60] [--threads 1] [--json out.json] [--quick]
                                   [--system-malloc] [--device cpu|cuda] [--bf16]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import warnings
from typing import Any

import torch

import gradwatch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # shared process helpers
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/overhead/, also under runpy
from overhead.models import MODELS
from overhead.report import model_json, render_model, summarise, targets
from overhead.rounds import run_model
from overhead.variants import CADENCE, VARIANTS, BenchContext

from paging_support import gradwatch_server

QUICK = {"rounds": 2, "steps": CADENCE, "warm_steps": CADENCE}
FULL = {"rounds": 7, "steps": 30, "warm_steps": 60}


def _keys(text: str, known: dict[str, Any], what: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        raise SystemExit(f"unknown {what}: {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return keys


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit


def _pin_malloc() -> str:
    """Keep freed buffers in the heap (glibc): without this, a step's large activation buffers can be unmapped and
    faulted in again on the next step, 1-4 ms of system time per CNN step that varies with the allocator's history
    and drowns 1 % differences. Applies to every variant alike."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except OSError:
        ok = False
    return "glibc malloc pinned (mmap threshold 32 MiB, no trim)" if ok else "system malloc (mallopt unavailable)"


def _progress(line: str) -> None:
    print(line, flush=True)


def _elsewhere(results: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per variant, the medians over rounds of CPU per step spent outside the training thread: the bench process's
    other threads (gradwatch's sender and gRPC threads) and the gradwatch server process (co-located here)."""
    import statistics

    out = {}
    for key, blocks in results.items():
        others = [p - c for p, c in zip(blocks.process_cpu_s, blocks.cpu_s, strict=True)]
        out[key] = (statistics.median(others), statistics.median(blocks.server_cpu_s))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", help=f"comma list of {', '.join(MODELS)} (default: all but the "
                        "accelerator-only ones on a CPU, all on CUDA)")  # fmt: skip
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models train")
    parser.add_argument("--bf16", action="store_true", help="forward and loss under bfloat16 autocast")
    parser.add_argument("--clip", type=float, help="the loop clips gradients to this norm after backward "
                        "(torch's clip_grad_norm_; gradwatch variants use gradwatch.clip_grad_norm_)")  # fmt: skip
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds (default {FULL['rounds']})")
    parser.add_argument("--steps", type=int, help=f"timed steps per block (default {FULL['steps']})")
    parser.add_argument("--warm-steps", type=int,
                        help=f"untimed steps after each gradwatch attach with the overhead budget on; >= 60 lets "
                             f"it settle (default {FULL['warm_steps']}; budget off: at most N)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--json", type=pathlib.Path, help="also write machine-readable results to this file")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc thresholds alone (default: pin them, see _pin_malloc)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help=f"short blocks for a smoke run: {QUICK} unless given (budget not settled)")  # fmt: skip
    args = parser.parse_args(argv)
    plan = {**(QUICK if args.quick else FULL)}
    for name in plan:
        if getattr(args, name) is not None:
            plan[name] = getattr(args, name)
    if min(plan.values()) < 0 or plan["rounds"] < 1 or plan["steps"] < 1 or args.threads < 1:
        raise SystemExit("--rounds, --steps and --threads must be >= 1, --warm-steps >= 0")
    if plan["steps"] % CADENCE:
        print(f"note: --steps {plan['steps']} is not a multiple of N={CADENCE}: the comparators act "
              f"{plan['steps'] // CADENCE} times per block, not steps/N")  # fmt: skip
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here")
    device = torch.device(args.device)
    default_models = [k for k, m in MODELS.items() if device.type != "cpu" or not m.accelerator_only]
    models = _keys(args.models or ",".join(default_models), MODELS, "model(s)")
    variants = [VARIANTS[k] for k in _keys(args.variants, VARIANTS, "variant(s)")]

    torch.set_num_threads(args.threads)
    allocator = "system malloc (--system-malloc)" if args.system_malloc else _pin_malloc()
    warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
    meta = {
        "command": " ".join(["python", "bench/agent_overhead.py", *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "bfloat16 autocast" if args.bf16 else "float32",
        "torch": str(torch.__version__),
        "gradwatch": gradwatch.__version__,
        "threads": args.threads,
        "cadence": CADENCE,
        "cpus": os.cpu_count(),
        "allocator": allocator,
        "clip": args.clip,
        **plan,
    }
    print(f"torch {meta['torch']}, gradwatch {meta['gradwatch']}, {meta['cpu']}, device {meta['device']} "
          f"({meta['dtype']}), {args.threads} training thread(s), "
          f"{plan['rounds']} rounds x {plan['steps']} steps per variant (+{plan['warm_steps']} untimed after "
          f"each gradwatch attach, budget on), cadence N={CADENCE}; medians over rounds; {allocator}")  # fmt: skip
    skipped: dict[str, str] = {}
    for variant in list(variants):
        reason = variant.available()
        if reason is not None:
            skipped[variant.key] = reason
            variants.remove(variant)
            print(f"skipping {variant.key}: {reason}")
    labels = {v.key: v.label for v in variants}
    document: dict[str, Any] = {"meta": meta, "skipped": skipped, "models": {}}
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as tmp, \
            gradwatch_server(pathlib.Path(tmp)) as (server, server_pid):  # fmt: skip
        ctx = BenchContext(server=server, workdir=pathlib.Path(tmp), device=device, bf16=args.bf16,
                           server_pid=server_pid, clip=args.clip)  # fmt: skip
        try:
            for key in models:
                spec = MODELS[key]
                load_before = os.getloadavg()[0]
                results = run_model(key, spec, variants, ctx, rounds=plan["rounds"], steps=plan["steps"],
                                    warm_steps=plan["warm_steps"], progress=_progress)  # fmt: skip
                summary = summarise(results)
                states = {k: b.states for k, b in results.items()}
                found = targets(spec, summary, states)
                load = (load_before, os.getloadavg()[0])
                print(render_model(key, spec, labels, summary, states, found), flush=True)
                print(f"  machine load average (1 min) before / after this model: {load[0]:.1f} / {load[1]:.1f} "
                      f"on {os.cpu_count()} CPUs", flush=True)  # fmt: skip
                elsewhere = _elsewhere(results)
                for variant_key, (others, served) in elsewhere.items():
                    print(f"  {variant_key}: CPU per step on the process's other threads {others * 1e6:.0f} us, "
                          f"in the gradwatch server {served * 1e6:.0f} us (medians over rounds)",
                          flush=True)  # fmt: skip
                document["models"][key] = {**model_json(spec, results, summary, found), "load_average": load,
                                           "cpu_elsewhere_s": elsewhere}  # fmt: skip
        finally:
            for variant in variants:
                variant.shutdown(ctx)
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
