"""bench/agent_overhead.py --quick runs end to end and writes its tables and JSON (structure, never speed)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "agent_overhead.py"


def test_bench_overhead_quick_tiny_model_reports_tables_targets_and_json(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "overhead.json"
    command = [sys.executable, str(BENCH), "--quick", "--models", "tiny", "--variants", "none,gradwatch"]
    done = subprocess.run([*command, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    assert "tiny MLP 2x64, batch 32 (tiny)" in text
    assert "wall time per step" in text and "training-thread CPU time per step" in text
    assert "no agent" in text and "gradwatch, defaults" in text
    assert "target added share of step time" in text

    document = json.loads(out.read_text())
    assert document["meta"]["rounds"] == 2 and document["meta"]["threads"] == 1
    assert "malloc" in document["meta"]["allocator"]
    assert document["meta"]["command"].startswith("python bench/agent_overhead.py --quick")
    assert document["skipped"] == {}
    assert list(document["models"]) == ["tiny"]
    model = document["models"]["tiny"]
    assert model["large"] is False and model["cadence"] >= 1
    assert list(model["variants"]) == ["none", "gradwatch"]
    for key, variant in model["variants"].items():
        assert len(variant["wall_ms_per_round"]) == 2 and len(variant["cpu_ms_per_round"]) == 2
        for clock in ("wall", "cpu"):
            summary = variant[clock]
            assert summary["q1_ms"] <= summary["median_ms"] <= summary["q3_ms"]
            assert summary["median_ms"] > 0
            assert isinstance(summary["ratio"], float) and isinstance(summary["added_ms"], float)
            assert len(summary["ratio_iqr"]) == 2 and len(summary["added_iqr_ms"]) == 2
            assert (summary["wandb_factor"] is None) == (key == "none" or "wandb" not in model["variants"])
    assert model["variants"]["none"]["wall"]["ratio"] == 1.0
    # The agent's own view of its cost, read from each gradwatch block, and every report delivered.
    states = model["variants"]["gradwatch"]["agent"]
    assert len(states) == 2
    for state in states:
        assert state["budget"] == 0.01 and state["interval"] >= 1 and isinstance(state["over_budget"], bool)
        assert state["acknowledged"] is True and state["dropped"] == 0 and state["reports"] > 0
    budget_targets = [t for t in model["targets"] if t["name"].startswith("added share of step time")]
    assert [t["clock"] for t in budget_targets] == ["wall", "cpu"]
    assert all(t["verdict"] in ("PASS", "MISS") and t["limit"] == 0.015 for t in budget_targets)
    assert all(isinstance(t["within_noise"], bool) for t in budget_targets)
    assert len(model["load_average"]) == 2


def test_bench_overhead_skips_a_comparator_that_is_not_installed(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "overhead.json"
    # sys.modules[name] = None makes the package look absent to importlib (as on a machine without the extra).
    code = (
        "import runpy, sys; sys.modules['wandb'] = None; sys.modules['tensorboard'] = None; "
        f"sys.argv = ['agent_overhead.py', '--quick', '--models', 'tiny', '--variants', 'none,wandb,tensorboard', "
        f"'--rounds', '1', '--json', {str(out)!r}]; runpy.run_path({str(BENCH)!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipping wandb: wandb is not installed (pip install 'gradwatch[bench]')" in done.stdout
    assert "skipping tensorboard: tensorboard is not installed (pip install 'gradwatch[bench]')" in done.stdout
    document = json.loads(out.read_text())
    assert set(document["skipped"]) == {"wandb", "tensorboard"}
    assert list(document["models"]["tiny"]["variants"]) == ["none"]


def test_bench_gpt2_small_model_has_gpt2_small_size_and_stays_out_of_the_cpu_defaults() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import torch
        from overhead.models import MODELS
    finally:
        sys.path.remove(str(ROOT / "bench"))
    spec = MODELS["gpt2s"]
    with torch.device("meta"):  # shapes only: no 124 M parameters allocated here
        model = spec.build()
    count = sum(p.numel() for p in model.parameters())
    assert 120e6 < count < 130e6, count  # GPT-2 small: 124 M
    assert spec.large and spec.accelerator_only
    assert not any(m.accelerator_only for k, m in MODELS.items() if k != "gpt2s")


def test_bench_asks_for_a_cuda_device_it_cannot_see_with_a_clear_error() -> None:
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: scripts/gpu_check.sh runs the bench on it")
    done = subprocess.run([sys.executable, str(BENCH), "--device", "cuda", "--bf16", "--models", "gpt2s"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "no CUDA device is visible" in done.stderr


def test_bench_floor_variant_queues_exactly_the_every_step_kernels_and_removes_its_hooks() -> None:
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT / "bench"))
    from overhead.variants import VARIANTS, BenchContext

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = VARIANTS["floor"].open(model, optimizer, BenchContext(server="", workdir=ROOT))
    x = torch.randn(4, 6)
    with torch.no_grad():  # not observed: the floor, like the agent, watches training forwards only
        expected = [float(x.sum()), float(model[0](x).sum()), float(model(x).sum())]
    loss = model(x).square().mean()
    loss.backward()
    expected += [float(p.grad.norm()) for p in model.parameters()]
    optimizer.step()
    session.after(loss)
    kept_loss, values = session._kept  # type: ignore[attr-defined]
    assert kept_loss is not loss and float(kept_loss) == float(loss)
    # The input's sum, each Linear's output sum (not the ReLU's) in forward order, then the 4 gradient norms.
    assert len(values) == 7
    assert [float(v) for v in values] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    session.close()
    assert not model._forward_pre_hooks and not model[0]._forward_hooks and not optimizer._optimizer_step_pre_hooks
