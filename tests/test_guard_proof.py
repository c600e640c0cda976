"""The guard's proof on a small transformer (bench/guard_proof.py, shortened): corrupted batches leave far less
damage with guard="skip" than without, a NaN batch kills the unguarded run but not the guarded one, and the
alert of an injected batch names its ids with the corrupted samples among the top-k."""

from __future__ import annotations

import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")

from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402
from server_support import get_json  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import guard_proof  # noqa: E402


# Five 300-step runs: about 35 s of CPU; the wall time grows with the machine's load.
@pytest.mark.timeout(600)
def test_guard_removes_most_of_the_damage_of_corrupted_and_nan_batches() -> None:
    torch.set_num_threads(1)
    app = ServerApp(ServerConfig.local()).start()
    try:
        result = guard_proof.prove(steps=300, every=100, window=40, seed=1, server=app.grpc_target)
        alerts = get_json(f"{app.http_url}/api/v1/alerts")["alerts"]
    finally:
        app.stop()
    assert result["injections"] == [100, 200]
    for area in result["areas"]:
        assert area["unguarded"] > 0.5, area  # the corruption does real damage without the guard
    assert result["reduction"] >= 0.9, result
    nan = result["nan"]
    assert not nan["unguarded_finite"] and nan["guarded_finite"], nan
    assert nan["relative_gap"] <= 0.05, nan

    # The guarded corrupted run's skip alert names the first injected batch and its corrupted samples.
    skips = sorted((a for a in alerts if a["detector"] == "guard_skip" and a["run"] == "guard-proof-1"),
                   key=lambda a: a["step"])  # fmt: skip
    assert [a["step"] for a in skips] == [100, 200]  # each skip its own alert (resolved in between)
    (autopsy,) = skips[0]["autopsy"]
    step = autopsy["step"]
    assert step == 100
    batch = guard_proof.make_batch(step, 1, "corrupt")
    assert autopsy["batch_ids"] == batch.ids
    top = [s["id"] for s in autopsy["top_samples"]]
    assert set(top) == {batch.ids[i] for i in batch.corrupted}  # top_k 8 = the 8 corrupted samples
