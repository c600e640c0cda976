"""Two real torch.distributed (gloo) processes stream to one server; one of them goes bad."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from gradwatch.server.alerts import Alert  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402
from paging_support import released_port  # noqa: E402

NAN_STEP = 25
STEPS = 40


def _worker(rank: int, world_size: int, master_port: int, target: str, bad_rank: int) -> None:
    import gradwatch
    from gradwatch.demo import DemoTraining

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(master_port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        training = DemoTraining(seed=rank)
        # Rank and world size come from torch.distributed, not from arguments.
        with gradwatch.attach(training.model, training.optimizer, run="ddp-job", server=target) as monitor:
            assert (monitor.rank, monitor.world_size) == (rank, world_size)
            for step in range(1, STEPS + 1):
                fault = "nan" if rank == bad_rank and step == NAN_STEP else "none"
                monitor.step(training.step(fault))
                dist.barrier()
            assert monitor.close(timeout=10)
    finally:
        dist.destroy_process_group()


def test_e2e_distributed_nan_on_one_rank_names_that_rank() -> None:
    app = ServerApp(ServerConfig.local())
    fired: list[dict[str, Any]] = []
    lock = threading.Lock()

    def listen(alert: Alert) -> None:
        with lock:
            fired.append(alert.to_json())

    app.add_alert_listener(listen)
    app.start()
    try:
        mp.spawn(_worker, args=(2, released_port(), app.grpc_target, 1), nprocs=2, join=True)
        (run,) = app.runs()
        assert run["run"] == "ddp-job"
        assert run["world_size"] == 2
        alerts = app.alerts(run="ddp-job")
        # The NaN sits in rank 1's input batch: input_not_normalized (a warning that non_finite inhibits) sees it too.
        assert [a["detector"] for a in alerts] in (["non_finite"], ["non_finite", "input_not_normalized"]), alerts
        for alert in alerts:
            assert alert["ranks"] == [1] and alert["step"] == NAN_STEP, alert
    finally:
        app.stop()


# ---------------------------------------------------------------------- exact global gradient norm across ranks

GLOBAL_STEPS = 4


def _global_worker(rank: int, world_size: int, master_port: int, target: str, out_dir: str) -> None:
    import json

    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(master_port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)

    def model() -> nn.Module:
        torch.manual_seed(0)  # the same initial weights on every rank
        return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))

    def true_sum_squares(net: nn.Module) -> float:
        total = 0.0
        for p in net.parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # a collective: test only
            total += float(grad.double().pow(2).sum())
        return total

    try:
        ddp = DistributedDataParallel(model())
        fsdp = model()
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in list(fsdp)[::2]:
            fully_shard(layer, mesh=mesh)
        fully_shard(fsdp, mesh=mesh)
        # HSDP: shards along "shard" (size 1 here), replicas along "replicate": every rank holds the same values.
        hsdp = model()
        fully_shard(hsdp, mesh=init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("replicate", "shard")))
        truth: dict[str, list[float]] = {}
        for name, net in (("ddp", ddp), ("fsdp", fsdp), ("hsdp", hsdp)):
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            truth[name] = []
            # Full statistics every other step: parameter checksums at steps 2 and 4, compared across replicas.
            with gradwatch.attach(net, opt, run=f"global-{name}", server=target, full_stats_interval=2) as monitor:
                for step in range(1, GLOBAL_STEPS + 1):
                    generator = torch.Generator().manual_seed(100 * step + rank)  # different data per rank
                    x = torch.randn(16, 8, generator=generator)
                    loss = nn.functional.mse_loss(net(x), x.sum(dim=1, keepdim=True).sin())
                    opt.zero_grad()
                    loss.backward()
                    truth[name].append(true_sum_squares(net))
                    opt.step()
                    monitor.step(loss)
                assert monitor.close(timeout=10)
        if rank == 0:
            with open(os.path.join(out_dir, "truth.json"), "w") as f:
                json.dump(truth, f)
    finally:
        dist.destroy_process_group()


def test_e2e_distributed_ddp_and_fsdp2_global_grad_norm_is_exact(tmp_path: Any) -> None:
    import json
    import math
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    app = ServerApp(ServerConfig.local()).start()
    try:
        mp.spawn(_global_worker, args=(2, released_port(), app.grpc_target, str(tmp_path)), nprocs=2, join=True)
        truth = json.loads((tmp_path / "truth.json").read_text())
        text = urllib.request.urlopen(f"{app.http_url}/metrics", timeout=5).read().decode()
        exported = {
            s.labels["run"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "gradwatch_run_grad_norm" and s.labels.get("agg") == "global"
        }
        # Replica groups: DDP and HSDP replicate across both ranks (their checksums agreed: no alert), FSDP shards.
        groups = {name: app.store.get(f"global-{name}").table.replica_group_size.tolist()  # type: ignore[union-attr]
                  for name in ("ddp", "fsdp", "hsdp")}  # fmt: skip
        assert groups == {"ddp": [2, 2], "fsdp": [1, 1], "hsdp": [2, 2]}
        assert app.alerts() == []
        for name in ("ddp", "fsdp", "hsdp"):
            run = app.store.get(f"global-{name}")
            assert run is not None
            expected = [math.sqrt(v) for v in truth[name]]
            steps, norms = zip(*run.global_grad_norms, strict=True)
            assert list(steps) == list(range(1, GLOBAL_STEPS + 1))
            assert list(norms) == pytest.approx(expected, rel=1e-5), name
            assert exported[f"global-{name}"] == pytest.approx(expected[-1], rel=1e-5)
            if name == "fsdp":  # sharded: a rank's own norm is not the model's
                assert all(r.last_grad_norm < expected[-1] for r in run.ranks.values())
    finally:
        app.stop()
