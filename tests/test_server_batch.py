"""AgentFrame.batch: one message per push group, each inner frame applied, deduplicated and acknowledged as if sent
alone; malformed batches rejected whole; old single-frame agents unchanged (the rest of the stream tests)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.server.app import ServerApp
from gradwatch.server.validate import MAX_BATCH_FRAMES
from gradwatch.v1 import gradwatch_pb2 as pb
from server_support import acks, hello_frame, metric, report_frame, run_stream, scrape, start_app


@pytest.fixture(scope="module")
def app() -> Iterator[ServerApp]:
    app = start_app()
    yield app
    app.stop(grace=0)


def _batch(frames: list[pb.AgentFrame]) -> pb.AgentFrame:
    return pb.AgentFrame(batch=pb.FrameBatch(frames=frames))


def _reports(app: ServerApp, run: str) -> int:
    [found] = [r for r in app.runs() if r["run"] == run]
    return int(found["ranks"][0]["reports"])


def test_welcome_says_the_batch_limits(app: ServerApp) -> None:
    [welcome] = run_stream(app.grpc_target, [hello_frame(run="limits")])
    assert welcome.welcome.max_batch_frames == MAX_BATCH_FRAMES
    assert welcome.welcome.max_frame_bytes == app.config.limits.max_message_bytes


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 30), min_size=1, max_size=6), replay_from=st.integers(1, 40))
def test_batches_mixed_with_single_frames_apply_every_report_once(app: ServerApp, cuts: list[int],
                                                                   replay_from: int) -> None:  # fmt: skip
    """Any split of seqs into batches and single frames, then a replay from an earlier seq: each report applied once."""
    run = f"mixed-{'-'.join(map(str, cuts))}-{replay_from}"
    total, seq, messages = sum(cuts), 1, [hello_frame(run=run)]
    for i, size in enumerate(cuts):
        frames = [report_frame(s) for s in range(seq, seq + size)]
        messages.extend([_batch(frames)] if i % 2 == 0 else frames)
        seq += size
    before = metric(scrape(app), "gradwatch_ingest_frames_total", kind="batch")
    assert acks(run_stream(app.grpc_target, messages))[-1] == total
    assert metric(scrape(app), "gradwatch_ingest_frames_total", kind="batch") == before + len(cuts[::2])
    replay_from = min(replay_from, total)
    replayed = run_stream(app.grpc_target, [hello_frame(run=run), _batch([report_frame(s)
                                            for s in range(replay_from, total + 3)])])  # fmt: skip
    assert replayed[0].welcome.acked_seq == total and acks(replayed)[-1] == total + 2
    assert _reports(app, run) == total + 2


@pytest.mark.parametrize(
    "bad",
    [
        pb.FrameBatch(),
        pb.FrameBatch(frames=[report_frame(1), hello_frame()]),
        pb.FrameBatch(frames=[report_frame(1), pb.AgentFrame(heartbeat=pb.Heartbeat(step=1))]),
        pb.FrameBatch(frames=[pb.AgentFrame(batch=pb.FrameBatch(frames=[report_frame(1)]))]),
        pb.FrameBatch(frames=[report_frame(s) for s in range(1, MAX_BATCH_FRAMES + 2)]),
    ],
    ids=["empty", "hello", "heartbeat", "nested", "too-long"],
)
def test_malformed_batches_are_rejected_whole_with_their_reason(app: ServerApp, bad: pb.FrameBatch) -> None:
    run = f"bad-{len(bad.frames)}-{bad.frames[-1].WhichOneof('body') if bad.frames else 'none'}"
    with pytest.raises(grpc.RpcError) as err:
        run_stream(app.grpc_target, [hello_frame(run=run), pb.AgentFrame(batch=bad)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("gradwatch-reason", "invalid_batch") in err.value.trailing_metadata()
    assert _reports(app, run) == 0  # nothing of a rejected batch is applied


def test_a_bad_report_inside_a_batch_is_rejected_like_a_single_one(app: ServerApp) -> None:
    frames = [report_frame(1), report_frame(2), report_frame(2, step=3)]  # seq 2 twice: not rising
    with pytest.raises(grpc.RpcError) as err:
        run_stream(app.grpc_target, [hello_frame(run="bad-inner"), _batch(frames)])
    assert ("gradwatch-reason", "non_monotonic") in err.value.trailing_metadata()
    assert _reports(app, "bad-inner") == 2  # what came before the bad frame was applied (and acknowledged)
