"""The agent's cross-rank signals: the exact parameter checksum, the pre-forward time and the replica group."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from agent_support import ScriptableServer, batch, make_mlp, train  # noqa: E402
from gradwatch.agent.monitor import attach  # noqa: E402
from gradwatch.agent.replica import replica_group  # noqa: E402
from gradwatch.agent.schema import build_layout  # noqa: E402
from gradwatch.agent.stats import StatsEngine  # noqa: E402

_INTS = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


@pytest.fixture
def server() -> Iterator[ScriptableServer]:
    with ScriptableServer() as s:
        yield s


def reference_checksum(model: nn.Module) -> int:
    """Each parameter's bytes as little-endian 64-bit words (element by element when they are not whole
    words), summed as wrapping 64-bit integers (numpy, on the host)."""
    total = np.uint64(0)
    for p in model.parameters():
        raw = p.detach().cpu().contiguous().view(-1)
        raw = raw.view(getattr(torch, f"int{8 * raw.element_size()}")).numpy()
        ints = raw.view("<i8") if raw.nbytes % 8 == 0 else raw.astype(np.int64)
        with np.errstate(over="ignore"):
            total = total + ints.sum(dtype=np.int64).astype(np.uint64)
    return int(total)


def checksum_of(model: nn.Module) -> int:
    pieces = StatsEngine(build_layout(model)).checksum()
    return sum(int(piece) << (16 * i) for i, piece in enumerate(pieces))


def test_checksum_is_the_exact_wrapping_sum_of_bit_patterns_for_every_dtype() -> None:
    for width in (16, 15):  # whole 64-bit words (summed as words) and not (summed element by element)
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            model = make_mlp(seed=3, width=width).to(dtype)
            assert checksum_of(model) == reference_checksum(model), (width, dtype)


def test_checksum_of_a_strided_parameter_sums_its_elements_not_its_storage() -> None:
    base = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    model = nn.Module()
    model.strided = nn.Parameter(base[:, ::2])  # a view with stride 2: no 64-bit word view of it exists
    assert not model.strided.is_contiguous()
    assert checksum_of(model) == reference_checksum(model)


def test_checksum_changes_when_one_bit_of_one_weight_flips() -> None:
    model, twin = make_mlp(seed=1), make_mlp(seed=1)
    assert checksum_of(model) == checksum_of(twin)
    for bit in (0, 22, 30):  # lowest mantissa bit, highest mantissa bit, an exponent bit
        flipped = make_mlp(seed=1)
        with torch.no_grad():
            flat = flipped[2].weight.view(-1)
            flat.view(torch.int32)[5] ^= 1 << bit
        assert checksum_of(flipped) != checksum_of(model), bit
        assert checksum_of(flipped) == reference_checksum(flipped)


def test_agent_sends_the_checksum_after_the_optimizer_step_on_full_steps_and_its_cadence(
    server: ScriptableServer,
) -> None:
    model = make_mlp(seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="checksum", full_stats_interval=3)
    expected = {}
    for step in range(1, 8):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        expected[step] = reference_checksum(model)  # the weights this step's report must describe
        monitor.step(loss)
    assert monitor.close(timeout=5)
    sent = {r.step: r.param_checksum for r in server.servicer.reports() if r.HasField("param_checksum")}
    assert sent == {3: expected[3], 6: expected[6]}  # a 7-step job: the checksum's own cadence (32 steps) not reached


def test_agent_reports_the_time_to_the_first_forward_of_each_step(server: ScriptableServer) -> None:
    model = make_mlp(seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="pre-forward")
    for step in range(1, 5):
        time.sleep(0.05 if step == 3 else 0.0)  # "data loading" before the forward pass
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        model(x)  # a second forward in the same step does not move the mark
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
    assert monitor.close(timeout=5)
    reports = {r.step: r for r in server.servicer.reports()}
    assert not reports[1].HasField("pre_forward_s")  # no previous step to measure from
    assert reports[3].pre_forward_s >= 0.05
    for step in (2, 3, 4):
        assert 0.0 <= reports[step].pre_forward_s <= reports[step].step_duration_s


def test_replica_group_without_ddp_or_dtensors_claims_no_replica(server: ScriptableServer) -> None:
    model = make_mlp()
    assert replica_group(model, build_layout(model), rank=1, world_size=4) == (1, 1)
    assert replica_group(model, build_layout(model), rank=0, world_size=1) == (0, 1)
    monitor = attach(model, None, server=server.address, run="plain", rank=1, world_size=2)
    train(model, None, monitor, 1)
    assert monitor.close(timeout=5)
    hello = server.servicer.of_kind("hello")[0].hello
    assert (hello.replica_group, hello.replica_group_size) == (1, 1)
