"""The sender against a scriptable peer: acks, reconnects, replay, commands, rejections and closing."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

torch = pytest.importorskip("torch")

from agent_support import ScriptableServer, make_mlp, train, wait_until  # noqa: E402
from gradwatch.agent.config import RetryPolicy, resolve_config  # noqa: E402
from gradwatch.agent.counters import DROP_REASONS  # noqa: E402
from gradwatch.agent.monitor import AgentMonitor, Monitor, attach  # noqa: E402
from gradwatch.agent.replay import ReplayBuffer  # noqa: E402
from gradwatch.v1 import gradwatch_pb2 as pb  # noqa: E402
from gradwatch.v1 import gradwatch_pb2_grpc as pb_grpc  # noqa: E402
from paging_support import refused_port  # noqa: E402

# A step that waited on the network would take a connect or Welcome timeout (seconds); the bound leaves room
# for a loaded 2-core machine descheduling the training thread, which is not what these tests are about.
STEP_NEVER_WAITS_S = 0.25
FAST_RETRY = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, rejected_backoff_s=0.3)


@pytest.fixture
def server() -> Iterator[ScriptableServer]:
    with ScriptableServer() as s:
        yield s


def _model_and_optimizer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_mlp(seed=seed)
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def _timed_steps(monitor: Monitor, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    """Train `steps` steps; return how long each monitor.step() took."""
    durations = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(torch.randn(16, 8)), torch.zeros(16, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        started = time.perf_counter()
        monitor.step(loss)
        durations.append(time.perf_counter() - started)
    return durations


def _seqs(server: ScriptableServer) -> list[int]:
    return [f.seq for f in server.servicer.frames()]


# ---------------------------------------------------------------------- units


def test_replay_buffer_evicts_oldest_but_keeps_the_pinned_frame() -> None:
    buffer: ReplayBuffer[str] = ReplayBuffer(3)
    assert buffer.append(1, "a") == 0
    assert buffer.append(2, "nan", pin=True) == 0
    assert buffer.append(3, "c") == 0
    assert buffer.append(4, "d") == 1  # evicts 1
    assert buffer.append(5, "e") == 1  # evicts 3, not the pinned 2
    assert [seq for seq, _ in buffer] == [2, 4, 5]
    assert buffer.ack(4) == 2  # cumulative: an ack releases the pinned frame too
    assert [seq for seq, _ in buffer] == [5]
    assert buffer.pinned() == frozenset()
    with pytest.raises(ValueError, match="increase"):
        buffer.append(5, "again")


def test_retry_policy_delays_grow_with_jitter_and_stay_bounded() -> None:
    policy = RetryPolicy()
    rng = random.Random(7)
    delays = [policy.delay_s(n, rng) for n in range(30)]
    assert 0.4 <= delays[0] <= 0.6
    assert 0.64 <= delays[1] <= 0.96
    assert all(24.0 <= d <= 36.0 for d in delays[15:])
    assert 24.0 <= policy.rejected_delay_s(rng) <= 36.0


# ---------------------------------------------------------------------- against a peer


def test_agent_delivers_every_report_in_order_and_says_goodbye(server: ScriptableServer) -> None:
    model, opt = _model_and_optimizer()
    with attach(model, opt, server=server.address, run="happy", job_name="unit", rank=0, world_size=1) as monitor:
        train(model, opt, monitor, 6)
        monitor.event("checkpoint_saved", "epoch 1", path="/tmp/ckpt")
        train(model, opt, monitor, 6)
        assert monitor.close(timeout=5)
    assert _seqs(server) == list(range(1, 14))  # reports and the event share one sequence
    assert [r.step for r in server.servicer.reports()] == list(range(1, 13))
    (event,) = [f for f in server.servicer.frames() if f.WhichOneof("body") == "event"]
    assert event.seq == 7 and event.event.kind == "checkpoint_saved" and event.event.step == 6
    assert dict(event.event.attributes) == {"path": "/tmp/ckpt"} and event.event.message == "epoch 1"
    hello = server.servicer.of_kind("hello")[0].hello
    assert (hello.run_id, hello.job_name, hello.rank, hello.world_size) == ("happy", "unit", 0, 1)
    assert hello.protocol_version == pb.PROTOCOL_VERSION_CURRENT
    assert hello.session_id == monitor.session_id and hello.device_kind == "cpu"
    (goodbye,) = server.servicer.of_kind("goodbye")
    assert goodbye.seq == 0 and goodbye.goodbye.final_step == 12
    counters = monitor.counters()
    assert counters["acked"] == 13 and counters["stream_state"] == "closed"
    assert sum(counters["dropped"].values()) == 0


def test_agent_without_server_keeps_training_and_closes_in_time() -> None:
    model, opt = _model_and_optimizer()
    with refused_port() as port:  # nothing listens there
        monitor = attach(model, opt, server=f"127.0.0.1:{port}", run="alone", replay_buffer_size=16,
                         retry=FAST_RETRY)  # fmt: skip
        durations = _timed_steps(monitor, model, opt, 60)
        assert monitor.step_count == 60
        started = time.perf_counter()
        assert monitor.close(timeout=0.5) is False
        assert time.perf_counter() - started < 0.8
    counters = monitor.counters()
    assert counters["acked"] == 0
    assert counters["dropped"]["replay_overflow"] == 60 - 16
    assert counters["stream_failures"] >= 1
    assert max(durations) < STEP_NEVER_WAITS_S, max(durations)  # no step waited on the network


def test_agent_reconnects_and_resends_without_gaps_after_peer_restart(server: ScriptableServer) -> None:
    model, opt = _model_and_optimizer()
    monitor = attach(model, opt, server=server.address, run="phoenix", retry=FAST_RETRY)
    train(model, opt, monitor, 10)
    assert wait_until(lambda: monitor.counters()["acked"] == 10)
    server.stop()
    train(model, opt, monitor, 10)  # buffered while the peer is away
    assert wait_until(lambda: monitor.counters()["buffered"] == 10)
    server.start()  # same port, same state: Welcome says 10 are held
    assert wait_until(lambda: monitor.counters()["reconnects"] == 1)
    train(model, opt, monitor, 5)
    assert monitor.close(timeout=5)
    assert _seqs(server) == list(range(1, 26))  # no gap
    assert [r.step for r in server.servicer.reports()] == list(range(1, 26))
    counters = monitor.counters()
    assert counters["sent"] - counters["resent"] == 25  # every frame went out once, plus resends
    # Welcome said 1..10 were held: none of those was sent again.
    assert all(f.seq > 10 for f in server.servicer.stream_frames[12:] if f.seq) or counters["resent"] <= 10


def test_agent_resends_everything_unacknowledged_to_a_peer_that_lost_its_state() -> None:
    first = ScriptableServer().start()
    model, opt = _model_and_optimizer()
    monitor = attach(model, opt, server=first.address, run="amnesia", retry=FAST_RETRY)
    try:
        first.servicer.acking = False  # received, never acknowledged
        train(model, opt, monitor, 6)
        assert first.servicer.wait_for(lambda: len(first.servicer.frames()) == 6)
        first.stop()
        second = ScriptableServer(port=first.port).start()  # a fresh peer: Welcome.acked_seq == 0
        try:
            assert wait_until(lambda: monitor.counters()["reconnects"] == 1)
            train(model, opt, monitor, 4)
            assert monitor.close(timeout=5)
            assert _seqs(second) == list(range(1, 11))
            assert monitor.counters()["resent"] >= 6
        finally:
            second.stop()
    finally:
        monitor.close(timeout=1)
        first.stop()


def test_agent_first_non_finite_frame_survives_replay_overflow(server: ScriptableServer) -> None:
    server.stop()  # the peer is away while the run goes bad
    model, opt = _model_and_optimizer(seed=2)
    monitor = attach(model, opt, server=server.address, run="pinned", replay_buffer_size=4, retry=FAST_RETRY)
    train(model, opt, monitor, 20, nan_at=3)  # step 3 and every later step are non-finite
    assert wait_until(lambda: monitor.counters()["buffered"] == 4)
    server.start()
    assert monitor.close(timeout=5) is False  # frames were dropped, so not everything was acknowledged
    steps = [r.step for r in server.servicer.reports()]
    assert steps == [3, 18, 19, 20]
    assert server.servicer.reports()[0].non_finite & pb.NON_FINITE_FLAG_GRADIENT
    assert monitor.counters()["dropped"]["replay_overflow"] == 16


def test_agent_writes_ordinary_reports_together_but_a_non_finite_one_and_events_at_once(
    server: ScriptableServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradwatch.agent.sender as sender

    monkeypatch.setattr(sender, "PUSH_INTERVAL_S", 600.0)  # ordinary reports wait for something urgent
    model, opt = _model_and_optimizer(seed=4)
    monitor = attach(model, opt, server=server.address, run="coalesced")
    assert wait_until(lambda: monitor.counters()["stream_state"] == "ready")
    sent = monitor._sender
    train(model, opt, monitor, 5)
    # The sender's round that made the fifth frame has ended: whatever it decided to write is written.
    assert wait_until(lambda: sent.settled[0] == 5)
    assert sent.settled[1] == 0 and server.servicer.reports() == []  # the five are made but not written
    monitor.event("checkpoint_saved")  # an event goes at once, and the reports before it with it
    assert server.servicer.wait_for(lambda: len(server.servicer.stream_frames) >= 7, timeout=10)
    assert _seqs(server) == list(range(1, 7))
    batch = sender.PUSH_BATCH_FRAMES  # once that many frames wait, they are written without waiting longer
    train(model, opt, monitor, batch + 2)
    assert server.servicer.wait_for(lambda: len(server.servicer.reports()) == 5 + batch, timeout=10)
    assert wait_until(lambda: sent.settled[0] == 8 + batch)  # 5 reports, the event, batch + 2 reports made
    assert sent.settled[1] == 6 + batch and len(server.servicer.reports()) == 5 + batch  # the last two wait
    train(model, opt, monitor, 1, nan_at=1)  # a non-finite report: written at once, with the two before it
    assert server.servicer.wait_for(lambda: len(server.servicer.reports()) == 8 + batch, timeout=10)
    reports = server.servicer.reports()
    assert [r.step for r in reports] == list(range(1, 9 + batch)) and reports[-1].non_finite != 0
    assert reports[-2].non_finite == 0
    assert monitor.close(timeout=5)


def test_agent_full_stats_command_makes_the_next_steps_full(server: ScriptableServer) -> None:
    model, opt = _model_and_optimizer()
    monitor = attach(model, opt, server=server.address, run="command", full_stats_interval=1000)
    train(model, opt, monitor, 3)
    assert wait_until(lambda: monitor.counters()["stream_state"] == "ready")
    server.servicer.send_command(steps=4, reason="investigate")
    assert wait_until(lambda: monitor.counters()["commands"] == 1)
    train(model, opt, monitor, 6)
    assert monitor.close(timeout=5)
    assert [r.step for r in server.servicer.reports() if r.HasField("layers")] == [4, 5, 6, 7]
    (event,) = [f.event for f in server.servicer.frames() if f.WhichOneof("body") == "event"]
    assert event.kind == "cadence_changed" and event.step == 3
    assert event.attributes["full_stats_steps"] == "4" and event.attributes["reason"] == "investigate"


def test_agent_rejected_stream_is_logged_once_backs_off_and_recovers(
    server: ScriptableServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.servicer.reject_streams_with = grpc.StatusCode.FAILED_PRECONDITION
    model, opt = _model_and_optimizer()
    with caplog.at_level(logging.DEBUG, logger="gradwatch.agent"):
        monitor = attach(model, opt, server=server.address, run="rejected", retry=FAST_RETRY)
        train(model, opt, monitor, 5)
        assert wait_until(lambda: monitor.counters()["rejections"] >= 2, timeout=5)
        server.servicer.reject_streams_with = None
        assert wait_until(lambda: monitor.counters()["acked"] == 5, timeout=5)
        assert monitor.close(timeout=5)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "rejected" in r.getMessage()]
    assert len(warnings) == 1 and "FAILED_PRECONDITION" in warnings[0].getMessage()
    assert [r.step for r in server.servicer.reports()] == [1, 2, 3, 4, 5]


class _CounterAtLog(logging.Handler):
    """Reads a monitor counter at the moment a matching line is emitted (on the sender's thread)."""

    def __init__(self, needle: str, counter: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle, self.counter, self.seen = needle, counter, []
        self.monitor: Monitor | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage() and self.monitor is not None:
            time.sleep(0.05)  # widen the window a counter-first ordering would lose in
            self.seen.append(self.monitor.counters()[self.counter])


@pytest.mark.parametrize(
    ("needle", "counter"), [("rejected the stream", "rejections"), ("reachable again", "reconnects")]
)
def test_agent_says_a_rejection_or_a_reconnection_before_it_counts_it(
    server: ScriptableServer, needle: str, counter: str
) -> None:
    """Whoever waits on the counter (a test, a supervisor reading counters()) can rely on the line being out."""
    handler = _CounterAtLog(needle, counter)
    agent_logger = logging.getLogger("gradwatch.agent")
    agent_logger.addHandler(handler)
    previous = agent_logger.level
    agent_logger.setLevel(logging.DEBUG)
    try:
        model, opt = _model_and_optimizer()
        monitor = attach(model, opt, server=server.address, run="said-then-counted", retry=FAST_RETRY)
        handler.monitor = monitor
        if counter == "reconnects":
            train(model, opt, monitor, 2)
            assert wait_until(lambda: monitor.counters()["acked"] == 2, timeout=5)
            server.stop()  # the outage is reported ("unavailable"), so its end is said too
            train(model, opt, monitor, 3)
            assert wait_until(lambda: monitor.counters()["stream_failures"] >= 1, timeout=5)
            server.start()
        else:
            server.servicer.reject_streams_with = grpc.StatusCode.FAILED_PRECONDITION
            train(model, opt, monitor, 3)
            assert wait_until(lambda: monitor.counters()["stream_failures"] >= 1, timeout=5)
            server.servicer.reject_streams_with = None
        assert wait_until(lambda: monitor.counters()[counter] >= 1, timeout=5)
        assert handler.seen == [0], handler.seen  # the line came first, while the counter still read 0
        assert monitor.close(timeout=5)
    finally:
        agent_logger.removeHandler(handler)
        agent_logger.setLevel(previous)


def test_agent_close_uses_unary_flush_when_the_stream_is_down(server: ScriptableServer) -> None:
    server.servicer.reject_streams_with = grpc.StatusCode.UNAVAILABLE  # streams fail, Flush works
    model, opt = _model_and_optimizer()
    monitor = attach(model, opt, server=server.address, run="flushed", retry=FAST_RETRY)
    train(model, opt, monitor, 7)
    assert wait_until(lambda: monitor.counters()["stream_failures"] >= 1)
    assert monitor.close(timeout=3)
    (request,) = server.servicer.flush_requests
    assert request.hello.run_id == "flushed" and len(request.hello.schema.names) == 3
    assert [f.seq for f in request.frames] == [*range(1, 8), 0]
    # The Goodbye last, as over a stream: the server sees the rank (and a one-rank run) finish.
    assert [f.WhichOneof("body") for f in request.frames] == ["report"] * 7 + ["goodbye"]
    assert request.frames[-1].goodbye.final_step == 7
    assert monitor.counters()["flushes"] == 1


def test_agent_close_with_withheld_acks_returns_false_at_the_deadline(server: ScriptableServer) -> None:
    server.servicer.acking = False
    model, opt = _model_and_optimizer()
    monitor = attach(model, opt, server=server.address, run="unacked")
    train(model, opt, monitor, 5)
    started = time.perf_counter()
    assert monitor.close(timeout=0.5) is False
    assert 0.3 < time.perf_counter() - started < 0.9
    assert len(server.servicer.frames()) == 5  # delivered, just never acknowledged


def test_agent_close_never_waits_past_its_timeout_for_a_silent_server(server: ScriptableServer) -> None:
    server.servicer.welcome_gate.clear()  # accepts the stream, never says Welcome
    server.servicer.reject_flush_with = grpc.StatusCode.UNAVAILABLE
    model, opt = _model_and_optimizer()
    monitor = attach(model, opt, server=server.address, run="silent")
    durations = _timed_steps(monitor, model, opt, 20)
    started = time.perf_counter()
    assert monitor.close(timeout=0.6) is False
    assert time.perf_counter() - started < 0.9
    assert max(durations) < STEP_NEVER_WAITS_S, max(durations)
    server.servicer.welcome_gate.set()


def test_agent_heartbeats_carry_cumulative_drop_counts(server: ScriptableServer) -> None:
    model, opt = _model_and_optimizer()
    monitor = attach(model, opt, server=server.address, run="heartbeat", heartbeat_interval_s=0.05)
    train(model, opt, monitor, 3)
    # The sender may beat once more before it has taken step 3 off its queue: wait for a beat that has.
    assert server.servicer.wait_for(
        lambda: any(b.heartbeat.step == 3 for b in server.servicer.of_kind("heartbeat"))
    )
    assert monitor.close(timeout=5)
    beat = next(b for b in server.servicer.of_kind("heartbeat") if b.heartbeat.step == 3)
    assert beat.seq == 0
    assert beat.heartbeat.step == 3
    assert dict(beat.heartbeat.dropped) == dict.fromkeys(DROP_REASONS, 0)


def test_agent_queue_full_drops_newest_while_the_sender_is_stuck(server: ScriptableServer) -> None:
    release = threading.Event()

    def stuck_then_real(target: str) -> grpc.Channel:
        release.wait(10)  # the sender thread is stuck here; the training thread must not notice
        return grpc.insecure_channel(target)

    model, opt = _model_and_optimizer()
    config = resolve_config({"server": server.address, "run": "stuck", "queue_size": 5})
    monitor = AgentMonitor(model, opt, config, channel_factory=stuck_then_real)
    durations = _timed_steps(monitor, model, opt, 30)
    counters = monitor.counters()
    assert counters["queued"] <= 5
    assert counters["dropped"]["queue_full"] >= 30 - 5 - 1  # at most one report got through before the jam
    assert max(durations) < STEP_NEVER_WAITS_S, max(durations)
    release.set()
    assert monitor.close(timeout=5) is False  # delivered what it kept, but drops were counted
    delivered = [r.step for r in server.servicer.reports()]
    assert delivered == sorted(delivered) and len(delivered) == 30 - counters["dropped"]["queue_full"]


def test_agent_reports_the_loss_of_its_step_even_if_the_caller_changes_the_tensor_afterwards(
    server: ScriptableServer,
) -> None:
    # On the CPU the report vector is joined on the sender thread, after step() returned: the loss it carries
    # must be the value at step(), not what an in-place update (`total = loss; total += x`) made of it later.
    model, opt = _model_and_optimizer()
    expected = []
    with attach(model, opt, server=server.address, run="inplace-loss") as monitor:
        for step in range(1, 6):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            expected.append(float(loss.detach()))
            monitor.step(loss)
            with torch.no_grad():
                loss.add_(1000.0)
        assert monitor.close(timeout=5)
    got = [r.loss for r in server.servicer.reports()]
    assert got == pytest.approx(expected, rel=1e-6)


def test_a_fresh_agent_channel_connects_at_once_while_another_to_the_same_server_backs_off() -> None:
    """The final Flush after a server came back: an older channel of the process to that server is still in gRPC's
    reconnect backoff (it failed while the server was down). The agent's channels have connections of their own,
    so the Flush's channel tries at once instead of failing with the older one's last error."""
    from gradwatch.agent.stream import flush, insecure_channel
    from paging_support import released_port

    port = released_port()
    target = f"127.0.0.1:{port}"
    backing_off = insecure_channel(target)
    try:
        stub = pb_grpc.IngestStub(backing_off)
        for _ in range(6):  # the server is down: each attempt fails and the connection backs off further
            with pytest.raises(grpc.RpcError):
                stub.Flush(pb.FlushRequest(), timeout=0.3)
            time.sleep(0.2)
        server = ScriptableServer(port=port).start()
        try:
            hello = pb.Hello(run_id="back", session_id="s", protocol_version=1, world_size=1)
            frames = [pb.AgentFrame(seq=1, report=pb.StepReport(step=1))]
            assert flush(insecure_channel, target, hello, frames, timeout_s=5.0) == 1
        finally:
            server.stop()
    finally:
        backing_off.close()
