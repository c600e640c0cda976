#!/usr/bin/env python3
"""Real third-party training programs with gradwatch added, as a user would add it: two lines.

For each program: copy it from a checkout into a temporary folder, make its small data set there (generated
text with structure to learn: nothing is downloaded), run it unpatched, then patched (after its attach anchor
`gradwatch.attach(...)`, after its step anchor `monitor.step(loss)`), both on the CPU for a bounded number of
steps, against a `gradwatch serve` spawned for the run; report each exit code, the reports and alerts the
server got for the patched run, and the patched run's wall time and CPU time (the program's threads, the
agent's sender thread included) over the unpatched one's (medians over `--repeats` alternating pairs; CPU
time is the steadier on a shared machine). Where a program cannot run on a CPU as it stands, the few lines that
keep it from starting are adapted in both runs alike (`Program.adapt`, e.g. distributed/FSDP2's GPU-count check).
Skipped: pytorch/examples mnist, mnist_hogwild and dcgan need
torchvision, which has no build for a CPU-only torch on PyPI. The programs' code is never copied into this
repository: pass the checkouts.

    python bench/real_programs.py --examples PATH/pytorch-examples --nanogpt PATH/nanoGPT
                                  [--programs wlm_lstm,wlm_transformer,nanogpt,nanogpt_compile,time_sequence,
                                   regression,fsdp2,hf_trainer]
                                  [--repeats 1] [--json out.json]

`hf_trainer` needs no checkout: a Transformers `Trainer` on a tiny randomly initialised GPT-2 (its program is
written here, and the patch adds the gradwatch callback). Programs whose checkout is not given are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import pickle
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TIMEOUT_S = 900


@dataclass(frozen=True)
class Patch:
    """Insert `line` (indented like the anchor line) after the first line of `file` matching `anchor`."""

    file: str
    anchor: str
    line: str


@dataclass(frozen=True)
class Program:
    name: str
    checkout: str | None  # "examples", "nanogpt", or None (written here)
    folder: str  # inside the checkout
    command: list[str]
    patches: tuple[Patch, ...]
    prepare: Callable[[pathlib.Path], None]
    notes: str = ""
    env: dict[str, str] = field(default_factory=dict)
    #: Changes both runs need to run here at all (CPU only), applied to the plain and the patched copy alike.
    adapt: tuple[Patch, ...] = ()


def _sentences(count: int, seed: int) -> list[str]:
    """A corpus with structure a small language model learns within a few hundred steps."""
    rng = random.Random(seed)
    nouns = ["cat", "dog", "bird", "fish", "horse", "mouse", "lion", "bear", "wolf", "fox", "owl", "frog"]
    verbs = ["sees", "chases", "likes", "finds", "follows", "watches", "hears", "meets"]
    adjectives = ["big", "small", "red", "old", "young", "quick", "lazy", "brown"]
    out = []
    for _ in range(count):
        a, b = rng.choice(nouns), rng.choice(nouns)
        out.append(f"the {rng.choice(adjectives)} {a} {rng.choice(verbs)} the {b} .")
    return out


def _prepare_wikitext(folder: pathlib.Path) -> None:
    data = folder / "synthetic"
    data.mkdir()
    for name, count, seed in (("train", 3000, 1), ("valid", 300, 2), ("test", 300, 3)):
        (data / f"{name}.txt").write_text("\n".join(_sentences(count, seed)) + "\n", encoding="utf8")


def _prepare_nanogpt(folder: pathlib.Path) -> None:
    data = folder / "data" / "synthetic"
    data.mkdir(parents=True)
    text = "\n".join(_sentences(4000, 4))
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    cut = int(len(ids) * 0.9)
    ids[:cut].tofile(data / "train.bin")
    ids[cut:].tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "stoi": stoi, "itos": dict(enumerate(chars))}, f)


_HF_PROGRAM = """
import os, random, torch, transformers

words = "the big small red old cat dog bird fish sees chases likes finds .".split()
random.seed(0)

class Data(torch.utils.data.Dataset):
    def __init__(self):
        rows = []
        for _ in range(512):
            a, b = random.randrange(4, 8), random.randrange(4, 8)
            rows.append([0, random.randrange(1, 4), a, random.randrange(8, 12), 0, b, 12] * 4)
        self.ids = torch.tensor(rows)
    def __len__(self):
        return len(self.ids)
    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}

torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=len(words), n_positions=32, n_embd=64, n_layer=2, n_head=2)
model = transformers.GPT2LMHeadModel(config)
args = transformers.TrainingArguments(output_dir="out", max_steps=60, per_device_train_batch_size=8,
    gradient_accumulation_steps=4, learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="steps",
    save_steps=30, logging_steps=10, disable_tqdm=True, dataloader_num_workers=0,
    run_name=os.environ.get("GRADWATCH_RUN"))
trainer = transformers.Trainer(model=model, args=args, train_dataset=Data())
trainer.train()
"""


def _prepare_sine(folder: pathlib.Path) -> None:
    """time_sequence_prediction's own data generator, run in the copy."""
    subprocess.run([sys.executable, "generate_sine_wave.py"], cwd=folder, check=True, timeout=120)


def _prepare_hf(folder: pathlib.Path) -> None:
    (folder / "train_hf.py").write_text(textwrap.dedent(_HF_PROGRAM))


_WLM_ARGS = ["--data", "synthetic", "--epochs", "2", "--emsize", "32", "--nhid", "32", "--nlayers", "2", "--bptt",
             "20", "--batch_size", "10", "--log-interval", "50", "--save", "model.pt", "--lr", "5"]  # fmt: skip
_WLM_PATCHES = (
    Patch("main.py", r"^criterion = nn\.NLLLoss\(\)", "import gradwatch; _gw = gradwatch.attach(model)"),
    Patch("main.py", r"^\s+total_loss \+= loss\.item\(\)", "_gw.step(loss)"),
)
_NANOGPT_ARGS = ["--device=cpu", "--dataset=synthetic", "--eval_interval=50", "--eval_iters=4", "--log_interval=25",
                 "--block_size=64", "--batch_size=8", "--n_layer=2", "--n_head=2", "--n_embd=64", "--max_iters=150",
                 "--lr_decay_iters=150", "--warmup_iters=10", "--learning_rate=3e-3", "--dropout=0.0",
                 "--gradient_accumulation_steps=2", "--dtype=float32", "--out_dir=out"]  # fmt: skip
_NANOGPT_PATCHES = (
    Patch("train.py", r"^optimizer = model\.configure_optimizers\(",
          "import gradwatch; _gw = gradwatch.attach(model, optimizer)"),
    Patch("train.py", r"^\s+scaler\.update\(\)", "_gw.step(loss.detach() * gradient_accumulation_steps)"),
)  # fmt: skip

_REGRESSION_PATCHES = (
    Patch("main.py", r"^fc = torch\.nn\.Linear\(", "import gradwatch; _gw = gradwatch.attach(fc)"),
    Patch("main.py", r"^\s+# Stop criterion", "_gw.step(loss)"),
)
#: distributed/FSDP2 on two CPU processes (gloo): its GPU-count check is bypassed and `device_id` (which must name
#: an accelerator) is dropped from init_process_group; nothing else changes.
_FSDP2_ADAPT = (
    Patch("example.py", r"^\s+_min_gpu_count = 2", "verify_min_gpu_count = lambda min_gpus=2: True  # noqa"),
    Patch("example.py", r"^\s+backend = torch\.distributed\.get_default_backend_for_device\(",
          "_init_pg = torch.distributed.init_process_group; "
          "torch.distributed.init_process_group = lambda backend, device_id=None: _init_pg(backend=backend)"),
)
_FSDP2_PATCHES = (
    Patch("example.py", r"^\s+optim = torch\.optim\.Adam\(", "import gradwatch; _gw = gradwatch.attach(model, optim)"),
    Patch("example.py", r"^\s+optim\.step\(\)", "_gw.step(loss.detach())"),
)

PROGRAMS: dict[str, Program] = {
    "wlm_lstm": Program("wlm_lstm", "examples", "word_language_model", ["main.py", "--model", "LSTM", *_WLM_ARGS],
                        _WLM_PATCHES, _prepare_wikitext,
                        "pytorch/examples word_language_model, LSTM, torch.save(model)"),
    "wlm_transformer": Program("wlm_transformer", "examples", "word_language_model",
                               ["main.py", "--model", "Transformer", *_WLM_ARGS], _WLM_PATCHES, _prepare_wikitext,
                               "the same, Transformer model"),
    "nanogpt": Program("nanogpt", "nanogpt", ".", ["train.py", "--compile=False", *_NANOGPT_ARGS], _NANOGPT_PATCHES,
                       _prepare_nanogpt, "karpathy/nanoGPT, attach then train, checkpoints"),
    "nanogpt_compile": Program("nanogpt_compile", "nanogpt", ".", ["train.py", "--compile=True", *_NANOGPT_ARGS],
                               _NANOGPT_PATCHES, _prepare_nanogpt, "the same with torch.compile after attach"),
    # LBFGS: optimizer.step(closure) re-runs forward and backward up to 20 times a step; no monitor.step(loss):
    # the loop keeps no loss outside its closure. Needs matplotlib (it plots); its data is a numpy array saved
    # with torch.save, which torch >= 2.6 loads only without weights_only.
    "time_sequence": Program("time_sequence", "examples", "time_sequence_prediction", ["train.py", "--steps", "2"],
                             (Patch("train.py", r"^\s+optimizer = optim\.LBFGS\(",
                                    "import gradwatch; _gw = gradwatch.attach(seq, optimizer)"),
                              Patch("train.py", r"^\s+optimizer\.step\(closure\)", "_gw.step()")),
                             _prepare_sine, "pytorch/examples time_sequence_prediction: LSTMCells, LBFGS, closure",
                             {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}),
    # No optimizer: the loop updates `param.data` by hand until the loss is under 1e-3; `monitor.step(loss)` gets
    # the float of `output.item()`. Its batch losses are heavy-tailed (features up to x^4).
    "regression": Program("regression", "examples", "regression", ["main.py"], _REGRESSION_PATCHES, lambda _: None,
                          "pytorch/examples regression: Linear on x..x^4, manual SGD, no optimizer"),
    # FSDP2 (fully_shard per block and root, meta-device init, clip_grad_norm_ on DTensors, DCP checkpoint) on two
    # gloo processes under torchrun. On a CPU its loss is NaN from the first step without gradwatch too:
    # Transformer.reset_parameters does not reset the blocks, which to_empty left uninitialised.
    "fsdp2": Program("fsdp2", "examples", "distributed/FSDP2",
                     ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "example.py"],
                     _FSDP2_PATCHES, lambda _: None, "pytorch/examples distributed/FSDP2, 2 ranks, gloo",
                     adapt=_FSDP2_ADAPT),
    "hf_trainer": Program("hf_trainer", None, ".", ["train_hf.py"],
                          (Patch("train_hf.py", r"^trainer = transformers\.Trainer\(",
                                 "from gradwatch.integrations.huggingface import GradwatchCallback; "
                                 "trainer.add_callback(GradwatchCallback())"),),
                          _prepare_hf, "Transformers Trainer, tiny random GPT-2, gradient_accumulation_steps=4"),
}  # fmt: skip


def apply_patches(folder: pathlib.Path, patches: tuple[Patch, ...]) -> None:
    """Insert each patch line after its anchor; raises if an anchor is missing (the program changed)."""
    for patch in patches:
        path = folder / patch.file
        lines = path.read_text().splitlines(keepends=True)
        index = next((i for i, line in enumerate(lines) if re.search(patch.anchor, line)), None)
        if index is None:
            raise ValueError(f"{patch.file}: no line matches {patch.anchor!r}")
        anchor = lines[index]
        end, depth = index, anchor.count("(") - anchor.count(")")
        while depth > 0 and end + 1 < len(lines):  # a statement over several lines: insert after its last
            end += 1
            depth += lines[end].count("(") - lines[end].count(")")
        indent = anchor[: len(anchor) - len(anchor.lstrip())]
        lines.insert(end + 1, f"{indent}{patch.line}\n")
        path.write_text("".join(lines))


@contextlib.contextmanager
def gradwatch_serve(workdir: pathlib.Path) -> Iterator[tuple[str, str]]:
    """A real `gradwatch serve` for the run on ports the system chooses (it reports them in its port file);
    yields (gRPC target, HTTP base URL)."""
    port_file = workdir / "server.ports.json"
    command = [sys.executable, "-m", "gradwatch", "serve", "--host", "127.0.0.1", "--grpc-port", "0", "--http-port",
               "0", "--port-file", str(port_file), "--data-dir", str(workdir / "server-data")]  # fmt: skip
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GRADWATCH_CONFIG": ""})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ports = json.loads(port_file.read_text())  # written once both ports listen
                grpc_port, url = ports["grpc"], f"http://127.0.0.1:{ports['http']}"
                urllib.request.urlopen(url + "/healthz", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    log_text = (workdir / "server.log").read_text()
                    raise RuntimeError(f"gradwatch serve did not start: {log_text}") from None
                time.sleep(0.2)
        yield f"127.0.0.1:{grpc_port}", url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _reports(url: str, run: str) -> int:
    """Reports the server applied for `run` (all ranks)."""
    with urllib.request.urlopen(f"{url}/api/v1/runs", timeout=10) as response:
        runs = [r for r in json.load(response)["runs"] if r["run"] == run]
    return sum(int(rank.get("reports", 0)) for r in runs for rank in r.get("ranks", []))


def _losses(url: str, run: str) -> dict[str, list[list[float]]]:
    """Each rank's recent [step, loss] pairs the server holds for `run` (its ring: the last 1,024 reports), for
    judging detector settings offline on a real program's losses."""
    with urllib.request.urlopen(f"{url}/api/v1/runs/{run}/series?last=1024", timeout=10) as response:
        ranks = json.load(response)["ranks"]
    return {str(r["rank"]): [[s, v] for s, v in zip(r["step"], r["loss"], strict=True)] for r in ranks}


def _alerts(url: str, run: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v1/alerts?run={run}", timeout=10) as response:
        return list(json.load(response)["alerts"])


def run_once(program: Program, source: pathlib.Path | None, patched: bool, target: str, run: str,
             workdir: pathlib.Path) -> tuple[int, float, float, str]:  # fmt: skip
    """Copy, prepare, (patch,) run; returns exit code, wall seconds, the program's CPU seconds (all its
    threads and waited-for children: the agent's sender thread included) and the output's tail."""
    folder = workdir / ("patched" if patched else "plain")
    if folder.exists():
        shutil.rmtree(folder)
    if source is None:
        folder.mkdir(parents=True)
    else:
        shutil.copytree(source / program.folder, folder)
    program.prepare(folder)
    apply_patches(folder, program.adapt)
    if patched:
        apply_patches(folder, program.patches)
    env = {**os.environ, "GRADWATCH_SERVER": target, "GRADWATCH_RUN": run, "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **program.env}  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *program.command], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)  # fmt: skip
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.returncode, wall, cpu, (done.stdout + done.stderr)[-2000:]


def measure(program: Program, source: pathlib.Path | None, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"gw-{program.name}-") as tmp:
        workdir = pathlib.Path(tmp)
        with gradwatch_serve(workdir) as (target, url):
            plain_walls, patched_walls, codes, tails, alerts, reports = [], [], [], [], [], []
            plain_cpu, patched_cpu, losses = [], [], {}
            for repeat in range(repeats):
                run = f"real-{program.name}-{repeat}"
                for patched in (False, True) if repeat % 2 == 0 else (True, False):
                    code, wall, cpu, tail = run_once(program, source, patched, target, run, workdir)
                    codes.append((patched, code))
                    (patched_walls if patched else plain_walls).append(wall)
                    (patched_cpu if patched else plain_cpu).append(cpu)
                    if code != 0:
                        tails.append(f"{'patched' if patched else 'plain'} exit {code}: {tail}")
                time.sleep(2.0)  # the server judges the last reports
                reports.append(_reports(url, run))
                with contextlib.suppress(OSError, KeyError, ValueError):  # the series is for offline study only
                    losses[run] = _losses(url, run)
                alerts += [{"detector": a.get("detector"), "severity": a.get("severity"), "state": a.get("state"),
                            "summary": str(a.get("summary", ""))[:160]} for a in _alerts(url, run)]  # fmt: skip
    ratio = statistics.median(patched_walls) / statistics.median(plain_walls)
    cpu_ratio = statistics.median(patched_cpu) / statistics.median(plain_cpu)
    return {
        "program": program.name,
        "notes": program.notes,
        "plain_exit": [c for p, c in codes if not p],
        "patched_exit": [c for p, c in codes if p],
        "plain_wall_s": plain_walls,
        "patched_wall_s": patched_walls,
        "plain_cpu_s": plain_cpu,
        "patched_cpu_s": patched_cpu,
        "overhead": ratio - 1.0,
        "cpu_overhead": cpu_ratio - 1.0,
        "reports": reports,
        "alerts": alerts,
        "above_info": [a for a in alerts if a["severity"] in ("warning", "critical")],
        "failures": tails,
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=pathlib.Path, help="a checkout of pytorch/examples")
    parser.add_argument("--nanogpt", type=pathlib.Path, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--programs", default=",".join(PROGRAMS))
    parser.add_argument("--repeats", type=int, default=1, help="alternating plain/patched pairs per program")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    sources = {"examples": args.examples, "nanogpt": args.nanogpt, None: None}
    results = []
    for name in args.programs.split(","):
        program = PROGRAMS[name]
        source = sources[program.checkout]
        if program.checkout is not None and source is None:
            print(f"{name}: skipped (no --{program.checkout} checkout)")
            continue
        result = measure(program, source, args.repeats)
        results.append(result)
        above = ", ".join(f"{a['detector']}/{a['severity']}" for a in result["above_info"]) or "none"
        print(f"{name:16s} exit plain {result['plain_exit']} patched {result['patched_exit']}  "
              f"wall plain {statistics.median(result['plain_wall_s']):6.1f} s patched "
              f"{statistics.median(result['patched_wall_s']):6.1f} s  overhead {result['overhead']:+.1%}  "
              f"CPU {statistics.median(result['plain_cpu_s']):6.1f} s / "
              f"{statistics.median(result['patched_cpu_s']):6.1f} s ({result['cpu_overhead']:+.1%})  "
              f"reports {result['reports']}  alerts {len(result['alerts'])} (above info: {above})",
              flush=True)  # fmt: skip
        for failure in result["failures"]:
            print(textwrap.indent(failure, "    "))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    bad = [r for r in results if any(r["patched_exit"]) or any(r["plain_exit"]) or r["above_info"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
