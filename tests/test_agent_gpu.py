"""On CUDA the training thread never synchronises with the device (skipped without a GPU)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from agent_support import ScriptableServer, batch, make_mlp  # noqa: E402
from gradwatch.agent.monitor import attach  # noqa: E402
from gradwatch.v1 import gradwatch_pb2 as pb  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def server() -> Iterator[ScriptableServer]:
    with ScriptableServer() as s:
        yield s


def test_agent_gpu_hundred_steps_without_a_sync_under_sync_debug_error(server: ScriptableServer) -> None:
    device = torch.device("cuda")
    model = make_mlp(seed=0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, foreach=True)
    batches = [tuple(t.to(device) for t in batch(step)) for step in range(1, 101)]
    batches[59][0][0, 0] = math.nan  # step 60 goes non-finite
    # overhead_budget=0: the cadence asserted below must not be stretched by the budget controller.
    monitor = attach(model, opt, server=server.address, run="cuda", full_stats_interval=7, overhead_budget=0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call on the device now raises
    try:
        for x, y in batches:
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            monitor.step(loss, labels=(y > 0).long().reshape(-1))  # the label histogram is sync-free too
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert monitor.close(timeout=10)
    reports = server.servicer.reports()
    assert [r.step for r in reports] == list(range(1, 101))
    assert server.servicer.of_kind("hello")[0].hello.device_kind == "cuda"
    assert [r.step for r in reports if r.HasField("layers")] == list(range(7, 101, 7))
    assert all(r.non_finite == 0 for r in reports[:59])
    assert reports[59].non_finite & pb.NON_FINITE_FLAG_GRADIENT and reports[59].first_non_finite_layer == 0
    norms = np.frombuffer(reports[6].layers.grad_norm, dtype="<f4")
    assert norms.shape == (3,) and np.isfinite(norms).all() and (norms > 0).all()
    # Forward-hook statistics (activations, labels) and NaN provenance came through without a sync as well.
    assert reports[6].HasField("activations") and sum(np.frombuffer(reports[6].label_histogram, "<f4")) == 32
    assert reports[59].non_finite & pb.NON_FINITE_FLAG_INPUT
    # The parameter checksum of full steps and of its own cadence (every 32 steps on fast steps: integer sums on the
    # device) did not sync either.
    assert all(r.HasField("param_checksum") == (r.HasField("layers") or r.step % 32 == 0) for r in reports)


def test_agent_gpu_checksum_matches_the_same_weights_on_the_cpu() -> None:
    from gradwatch.agent.schema import build_layout
    from gradwatch.agent.stats import StatsEngine

    def checksum(model: torch.nn.Module) -> int:
        pieces = StatsEngine(build_layout(model)).checksum()
        return sum(int(piece) << (16 * i) for i, piece in enumerate(pieces))

    for dtype in (torch.float32, torch.bfloat16):
        model = make_mlp(seed=3).to(dtype)
        on_cpu = checksum(model)
        assert checksum(model.to("cuda")) == on_cpu, dtype  # Module.to moves in place


def test_agent_gpu_gpt2_small_bf16_with_the_clip_drop_in_never_syncs(server: ScriptableServer) -> None:
    """The GPT-2-small-sized model of the overhead bench in bfloat16 autocast, clipped with gradwatch's drop-in,
    full statistics every 5 steps: the provenance flush, the clip's norm hand-over and the full steps never sync."""
    import pathlib
    import sys

    import gradwatch

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
    from overhead.models import MODELS

    spec = MODELS["gpt2s"]
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = spec.build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = spec.batch().to(device), torch.randint(0, 10, (8,), device=device)
    monitor = attach(model, opt, server=server.address, run="cuda-gpt2s", full_stats_interval=5, overhead_budget=0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(12):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gradwatch.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            monitor.step(loss)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert monitor.close(timeout=30)
    reports = server.servicer.reports()
    assert [r.step for r in reports] == list(range(1, 13)) and all(r.non_finite == 0 for r in reports)
    assert [r.step for r in reports if r.HasField("layers")] == [5, 10]
