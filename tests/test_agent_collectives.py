"""The agent's collective tracking (agent/collectives.py) in a real one-rank gloo DDP job in a fresh process,
against a scriptable server: reports carry the process group's sequence numbers and the time worked between
collectives (the DDP hook), heartbeats carry a declared pause and, once the training thread idles past its
threshold, its stack with the idle line; the option switches all of it off. Multi-rank behaviour:
tests/test_e2e_hang.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from agent_support import ScriptableServer
from gradwatch.agent.config import resolve_config
from paging_support import released_port

JOB = '''
import os, sys, time
import torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
import gradwatch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
model = DistributedDataParallel(nn.Linear(4, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
monitor = gradwatch.attach(model, opt, server=sys.argv[1], run="collectives", track_collectives=sys.argv[3] == "on",
                           ddp_comm_hook=sys.argv[3] == "on")
print("hooked", monitor._collectives.hooked)
for step in range(6):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    monitor.step(loss)
with monitor.pause("checkpoint"):
    time.sleep(3.0)
time.sleep(5.0)  # IDLE
monitor.step()
assert monitor.close(timeout=5)
dist.destroy_process_group()
'''


def _run(tmp_path: Path, server: ScriptableServer, tracking: str) -> str:
    job = tmp_path / "job.py"
    job.write_text(JOB)
    result = subprocess.run([sys.executable, str(job), server.address, str(released_port()), tracking],
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.timeout(240)
def test_reports_and_heartbeats_carry_collective_progress_pause_and_the_idle_stack(tmp_path: Path) -> None:
    with ScriptableServer() as server:
        assert "hooked True" in _run(tmp_path, server, "on")
        reports = server.servicer.reports()
        beats = [f.heartbeat for f in server.servicer.of_kind("heartbeat")]
    assert [r.step for r in reports] == list(range(1, 8))
    entered = [r.collectives.groups[0].entered for r in reports[:6]]
    assert all(r.collectives.groups[0].group == "0" and r.collectives.groups[0].size == 1 for r in reports[:6])
    assert entered == sorted(entered) and entered[-1] >= 6  # DDP's all-reduce per step, at least
    assert all(r.collectives.completions_known for r in reports)  # the flight recorder answered, also at close
    # Between collectives: from step 2 on (the first all-reduce has no completion before it), never negative.
    assert all(r.HasField("between_collectives_s") and r.between_collectives_s >= 0 for r in reports[1:6])
    assert any(b.collectives.paused == "checkpoint" for b in beats)
    idle_line = JOB.splitlines().index("time.sleep(5.0)  # IDLE") + 1
    assert all(b.collectives.idle_s >= 2.0 for b in beats if b.collectives.stack)  # past the 2 s floor only
    stuck = [b for b in beats if b.collectives.stack and not b.collectives.paused]
    assert stuck, beats
    top = stuck[-1].collectives.stack[0]
    assert (Path(top.file).name, top.line, top.function) == ("job.py", idle_line, "<module>")


@pytest.mark.timeout(240)
def test_track_collectives_off_sends_none_and_hooks_nothing(tmp_path: Path) -> None:
    with ScriptableServer() as server:
        assert "hooked False" in _run(tmp_path, server, "off")
        reports = server.servicer.reports()
        beats = [f.heartbeat for f in server.servicer.of_kind("heartbeat")]
    assert reports and not any(r.HasField("collectives") or r.HasField("between_collectives_s") for r in reports)
    assert not any(b.HasField("collectives") for b in beats)


def test_track_collectives_option_from_keyword_and_environment() -> None:
    assert resolve_config({}, env={}).track_collectives is True
    assert resolve_config({}, env={"GRADWATCH_TRACK_COLLECTIVES": "off"}).track_collectives is False
    assert resolve_config({"track_collectives": True}, env={"GRADWATCH_TRACK_COLLECTIVES": "0"}).track_collectives
    with pytest.raises(ValueError, match="GRADWATCH_TRACK_COLLECTIVES"):
        resolve_config({}, env={"GRADWATCH_TRACK_COLLECTIVES": "maybe"})
