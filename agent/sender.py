"""The background sender: one daemon thread that owns the gRPC channel, the stream and the replay buffer.

Contract
- The training thread only calls `submit()` (a non-blocking put; when `queue_size` items are waiting the
  newest is dropped and counted as "queue_full") and, once, `close(timeout_s)`, which never blocks longer
  than its timeout.
- Everything else happens on the sender thread: it waits for each report's values to reach the host
  (snapshot.py), numbers reports and events 1, 2, 3, … (Hello, Heartbeat and Goodbye carry 0), keeps the
  unacknowledged ones in a bounded replay buffer (replay.py), and streams them over `Ingest.Stream`. A frame
  larger than the server's Welcome.max_frame_bytes is dropped and counted ("frame_too_large"), never written.
- The channel is created lazily on the sender thread, a fresh one per attempt so the RetryPolicy is the only
  backoff in play. After a failure the thread waits (exponential backoff with jitter; longer when the server
  rejected the stream) and, on the next Welcome, resends every frame the server does not hold yet.
- The thread waits in two places only, a timed get on its inbox (which receives the training thread's items,
  the stream's responses and the close request) and a short batching wait on an Event that close() sets:
  close() interrupts any backoff at once.
- Server commands go to the Monitor's callbacks on this thread: FULL_STATS to `on_command`, ALERT to
  `on_alert`; unknown kinds are logged once and ignored.
- close(): Goodbye after the last frame, wait for the acks until the deadline; if the stream is down, one
  unary Flush with what is left; then the channel is closed. True only if everything was acknowledged and
  nothing was dropped.

All state belongs to the sender thread (stream.py explains the two helper loops gRPC needs), which is why
nothing here takes a lock.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from gradwatch.agent import errors, wire
from gradwatch.agent.config import AgentConfig
from gradwatch.agent.counters import Counters
from gradwatch.agent.items import AgentIdentity, EventItem, ReportItem
from gradwatch.agent.replay import ReplayBuffer
from gradwatch.agent.stream import ChannelFactory, OpenStream, Response, StreamEnded, flush, insecure_channel
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["Sender"]

logger = logging.getLogger("gradwatch.agent")

CommandSink = Callable[[int, str], None]

# While closing, how long to wait for the server to end the stream after our half-close.
HALF_CLOSE_GRACE_S = 1.0
# Longest single wait of the loop (bounds the damage of a clock surprise) and the poll used while congested.
MAX_WAIT_S = 1.0
CONGESTED_POLL_S = 0.05
# Inbox messages handled per round before timers (heartbeat, reconnect) get a look.
MAX_BATCH = 1024
# After the first report (or ack) of a quiet spell, let more gather before handling them: the thread then
# wakes about 1/BATCH_INTERVAL_S times a second instead of once per step, which matters because every wake-up
# competes with the training thread for the GIL. Reports still reach the server within a few tens of ms.
BATCH_INTERVAL_S = 0.02
# Ordinary report frames are written to the stream together, at most PUSH_INTERVAL_S after the oldest of them
# was made (or once PUSH_BATCH_FRAMES wait): every write costs a wake-up and system calls in this process and
# the server's, and one acknowledgement back, so writing one frame per step slowed a 16 ms training step by
# about 1 % on a 2-CPU machine. A report with a non-finite value, an event, a reconnection and closing write
# at once: the alerts that must page fast are not delayed.
PUSH_INTERVAL_S = 0.25
PUSH_BATCH_FRAMES = 64
# A server whose Welcome says it takes batches (Welcome.max_batch_frames) gets each push group as one message
# (AgentFrame.batch) of at most MAX_BATCH_BYTES, and the server's max_frame_bytes: one read, parse and wake-up
# on each side per group instead of per frame. Older servers get frames one by one.
MAX_BATCH_BYTES = 1 << 20
BATCH_ENTRY_OVERHEAD = 16  # field tags and lengths around each frame in a batch (bytes, generous)
# A ready stream whose written frames have waited this long for an acknowledgement (the server acknowledges
# within milliseconds) reports the stream state "unresponsive" until the next one: a stopped or wedged
# server keeps its TCP connection, so the stream itself never fails.
ACK_OVERDUE_S = 10.0


@dataclass(slots=True)
class _CloseRequest:
    deadline: float
    final_step: int
    reason: str


class Sender:
    """Ships one Monitor's reports and events. See the module docstring for the contract."""

    def __init__(
        self,
        config: AgentConfig,
        identity: AgentIdentity,
        counters: Counters,
        on_command: CommandSink,
        *,
        channel_factory: ChannelFactory = insecure_channel,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_alert: Callable[[pb.Command], None] | None = None,
        target: Callable[[], str] | None = None,
        metadata: Callable[[], Sequence[tuple[str, str]]] | None = None,
        progress: Callable[..., pb.CollectiveProgress | None] | None = None,
        heartbeat_s: float | None = None,
    ) -> None:
        """`target()` names the server of each new connection (default: config.server; transport.py picks a
        replica); `metadata()` gives each call's metadata (the bearer token). `progress(fresh=...)` gives the
        collective progress that rides on every report and heartbeat (collectives.py); `heartbeat_s` shortens
        the heartbeat period below the configured one (it carries that progress while training is stuck)."""
        self._config = config
        self._identity = identity
        self._counters = counters
        self._on_command = on_command
        self._on_alert = on_alert
        self._channel_factory = channel_factory
        self._pick_target: Callable[[], str] = target or (lambda: config.server)
        self._metadata: Callable[[], Sequence[tuple[str, str]]] = metadata or (lambda: ())
        self._progress = progress
        self._heartbeat_s = min(config.heartbeat_interval_s, heartbeat_s or config.heartbeat_interval_s)
        self._target = config.server  # the server of the current (or latest) connection
        self._clock = clock
        self._rng = rng or random.Random()
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closing_requested = threading.Event()  # cuts a batching wait short
        self._thread = threading.Thread(target=self._run, name="gradwatch-sender", daemon=True)
        self._inert = False
        self._result = False
        self._crash: BaseException | None = None
        # Sender-thread state from here on.
        self._replay: ReplayBuffer[pb.AgentFrame] = ReplayBuffer(config.replay_buffer_size)
        self._hello = wire.hello_frame(identity)
        self._next_seq = 1
        self._last_pushed = 0
        self._highest_sent = 0
        #: When the acknowledgements fell behind what was written (None: everything written is acknowledged).
        self._unacked_since: float | None = None
        self._last_step = 0
        self._pinned_non_finite = False
        self._state = "idle"
        self._stream: OpenStream | None = None
        self._gen = 0
        self._readers: list[threading.Thread] = []
        self._attempt = 0
        self._had_welcome = False
        self._congested = False
        self._push_due: float | None = None  # when frames made but not yet written must be written
        #: From the server's Welcome: frames per AgentFrame.batch and bytes per message (0: no batches).
        self._batch_frames = 0
        self._batch_bytes = 0
        #: Welcome.max_frame_bytes: a larger frame would end the stream (RESOURCE_EXHAUSTED) on every resend.
        self._max_frame_bytes = 0
        self._next_attempt = 0.0
        self._welcome_deadline = 0.0
        self._next_heartbeat = 0.0
        self._closing: _CloseRequest | None = None
        self._goodbye_sent = False
        self._half_close_deadline: float | None = None
        self._connect_grace: float | None = None
        self._logged: set[str] = set()
        #: (highest seq made, highest seq written) as the loop's latest round ended; read by tests (never by the
        #: agent) to tell "decided not to write" from "written, still in flight" without sleeping.
        self.settled: tuple[int, int] = (0, 0)

    # ------------------------------------------------------------------ training-thread side

    def start(self) -> None:
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def queued(self) -> int:
        return self._inbox.qsize()

    def submit(self, item: ReportItem | EventItem) -> bool:
        """Hand an item to the sender without blocking; False (and counted) when the queue is full."""
        if self._inert:
            return False
        if self._inbox.qsize() >= self._config.queue_size:
            self._counters.dropped["queue_full"] += 1
            return False
        self._inbox.put(item)
        return True

    def close(self, timeout_s: float, final_step: int, reason: str) -> bool:
        """Say goodbye, deliver what is left, stop the thread; True if the server acknowledged everything.

        Returns within `timeout_s` whatever the server does (False if the thread is still busy then).
        """
        if self._inert:
            return False
        deadline = self._clock() + max(0.0, timeout_s)
        self._inbox.put(_CloseRequest(deadline, final_step, reason))
        self._closing_requested.set()
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - self._clock()))
        if self._crash is not None and errors.is_strict():
            raise RuntimeError("gradwatch sender thread crashed") from self._crash
        return self._result and not self._thread.is_alive()

    def mark_forked(self) -> None:
        """In a forked child: never touch the queue, gRPC or the (absent) thread again."""
        self._inert = True

    # ------------------------------------------------------------------ sender thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self._crash = exc
            self._counters.stream_state = "crashed"
            errors.report(exc, "sender")
        finally:
            try:
                self._teardown_stream()
            except Exception as exc:
                errors.report(exc, "sender.teardown")

    def _loop(self) -> None:
        while True:
            message = self._get(self._wait_s())
            if isinstance(message, ReportItem | EventItem | Response):
                self._closing_requested.wait(BATCH_INTERVAL_S)
            handled = 0
            while message is not None:
                self._dispatch(message)
                handled += 1
                message = self._get(None) if handled < MAX_BATCH else None
            now = self._clock()
            if self._closing is not None:
                if self._advance_close(now):
                    self._finish()
                    return
            else:
                self._maintain(now)
            self.settled = (self._next_seq - 1, self._highest_sent)

    def _get(self, timeout: float | None) -> object | None:
        try:
            if timeout is None:
                return self._inbox.get_nowait()
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _wait_s(self) -> float:
        now = self._clock()
        if self._closing is not None:
            wake = self._closing.deadline
            for extra in (self._half_close_deadline, self._connect_grace):
                if extra is not None:
                    wake = min(wake, extra)
            return min(max(0.0, wake - now), CONGESTED_POLL_S)
        if self._state in ("idle", "backoff"):
            wake = self._next_attempt
        elif self._state == "connecting":
            wake = self._welcome_deadline
        else:
            wake = self._next_heartbeat if self._push_due is None else min(self._next_heartbeat, self._push_due)
        wait = min(max(0.0, wake - now), MAX_WAIT_S)
        return min(wait, CONGESTED_POLL_S) if self._congested else wait

    def _dispatch(self, message: object) -> None:
        if isinstance(message, ReportItem):
            self._on_report(message)
        elif isinstance(message, EventItem):
            try:
                frame = wire.event_frame(self._next_seq, message)
            except Exception as exc:
                self._counters.dropped["error"] += 1
                errors.report(exc, "sender.event")
                return
            self._add(frame, pin=False, urgent=True)
        elif isinstance(message, Response):
            if message.gen == self._gen and self._stream is not None:
                self._on_response(message.frame)
        elif isinstance(message, StreamEnded):
            if message.gen == self._gen and self._stream is not None:
                self._on_stream_ended(message.error)
        elif isinstance(message, _CloseRequest):
            self._begin_close(message)

    def _on_report(self, item: ReportItem) -> None:
        try:
            values = item.payload.values.to_numpy()
            frame, flags = wire.report_frame(self._next_seq, item, values)
        except Exception as exc:
            self._counters.dropped["error"] += 1
            errors.report(exc, "sender.report")
            return
        self._last_step = item.step
        progress = self._progress() if self._progress is not None else None
        if progress is not None:
            frame.report.collectives.CopyFrom(progress)
        # The first non-finite report explains the incident: it must survive any buffer overflow.
        pin = bool(flags) and not self._pinned_non_finite
        self._pinned_non_finite |= pin
        self._add(frame, pin=pin, urgent=bool(flags))

    def _add(self, frame: pb.AgentFrame, *, pin: bool, urgent: bool) -> None:
        seq = self._next_seq
        self._next_seq += 1
        evicted = self._replay.append(seq, frame, pin=pin)
        if evicted:
            self._counters.dropped["replay_overflow"] += evicted
        self._counters.buffered = len(self._replay)
        if self._state != "ready":
            return
        if urgent or seq - self._last_pushed >= PUSH_BATCH_FRAMES:
            self._push()
        elif self._push_due is None:  # written with the next urgent frame, or when due (see PUSH_INTERVAL_S)
            self._push_due = self._clock() + PUSH_INTERVAL_S

    def _push(self) -> None:
        """Write unsent frames to the stream, oldest first, unless the stream is backed up."""
        stream = self._stream
        assert stream is not None
        self._congested = False
        self._push_due = None
        group: list[tuple[int, pb.AgentFrame]] = []
        size = 0
        for seq, frame in self._replay.after(self._last_pushed):
            if stream.backlog() >= self._config.replay_buffer_size:
                # The server reads slower than we produce: frames wait in the (bounded) replay buffer.
                self._congested = True
                break
            length = frame.ByteSize()
            if self._max_frame_bytes and length > self._max_frame_bytes:
                self._drop_oversized(seq, length)
                continue
            if self._batch_frames <= 1:
                self._write(stream, [(seq, frame)])
                continue
            # A server that takes batches gets the push group in as few messages as its limits allow.
            length += BATCH_ENTRY_OVERHEAD
            if group and (len(group) >= self._batch_frames or size + length > self._batch_bytes):
                self._write(stream, group)
                group, size = [], 0
            group.append((seq, frame))
            size += length
        if group:
            self._write(stream, group)

    def _drop_oversized(self, seq: int, size: int) -> None:
        """A frame the server would refuse (ending the stream, and again on every resend): dropped, counted, and
        reported with the next heartbeat (the server shows it in gradwatch_agent_dropped_total)."""
        self._replay.discard(seq)
        self._counters.dropped["frame_too_large"] += 1
        self._counters.buffered = len(self._replay)
        self._log_once(
            "frame-too-large",
            "gradwatch: a report of %d bytes exceeds the server's limit of %d bytes (its limits.max_message_bytes); "
            "such reports are dropped and counted (monitor.counters()['dropped']['frame_too_large'])",
            size,
            self._max_frame_bytes,
        )

    def _write(self, stream: OpenStream, frames: list[tuple[int, pb.AgentFrame]]) -> None:
        """One message on the stream: the frame, or a batch of them."""
        if len(frames) == 1:
            stream.send(frames[0][1])
        else:
            stream.send(pb.AgentFrame(batch=pb.FrameBatch(frames=[frame for _, frame in frames])))
        if self._unacked_since is None:
            self._unacked_since = self._clock()
        for seq, _ in frames:
            self._last_pushed = seq
            self._counters.sent += 1
            if seq <= self._highest_sent:
                self._counters.resent += 1
            self._highest_sent = max(self._highest_sent, seq)

    def _on_response(self, frame: pb.ServerFrame) -> None:
        kind = frame.WhichOneof("body")
        if kind == "welcome":
            self._on_welcome(frame.welcome)
        elif kind == "ack":
            self._apply_ack(frame.ack.seq)
        elif kind == "command":
            if frame.command.kind == pb.COMMAND_KIND_FULL_STATS:
                self._counters.commands += 1
                self._on_command(int(frame.command.steps), frame.command.reason)
            elif frame.command.kind == pb.COMMAND_KIND_ALERT and self._on_alert is not None:
                self._counters.commands += 1
                self._on_alert(frame.command)
            else:
                self._log_once(f"command-{frame.command.kind}", "ignoring unknown server command %s", frame.command)

    def _on_welcome(self, welcome: pb.Welcome) -> None:
        if self._state != "connecting":
            return
        if welcome.protocol_version not in (0, pb.PROTOCOL_VERSION_CURRENT):
            self._log_once(
                "protocol", "server speaks protocol %d, agent %d", welcome.protocol_version, pb.PROTOCOL_VERSION_CURRENT
            )
        self._set_state("ready")
        reconnected = self._had_welcome
        self._had_welcome = True
        self._attempt = 0
        self._batch_frames = welcome.max_batch_frames
        self._batch_bytes = min(welcome.max_frame_bytes, MAX_BATCH_BYTES) - BATCH_ENTRY_OVERHEAD
        self._max_frame_bytes = welcome.max_frame_bytes
        self._apply_ack(welcome.acked_seq)
        if "unreachable" in self._logged:  # the outage was reported: say once that it is over
            self._log_once(
                "reconnected",
                "gradwatch server %s reachable again; resending %d buffered reports",
                self._target,
                len(self._replay),
                level=logging.INFO,
            )
        if reconnected:  # counted after the line above, so a waiter on the counter sees the log
            self._counters.reconnects += 1
        self._last_pushed = 0  # resend everything the server does not hold yet
        self._next_heartbeat = self._clock() + self._heartbeat_s
        self._push()

    def _apply_ack(self, seq: int) -> None:
        seq = min(seq, self._next_seq - 1)  # never trust an ack for frames we have not made
        self._counters.acked += self._replay.ack(seq)
        self._counters.acked_seq = max(self._counters.acked_seq, seq)
        self._counters.buffered = len(self._replay)
        # Progress: the wait starts again (or ends, when everything written is acknowledged).
        self._unacked_since = None if seq >= self._last_pushed else self._clock()
        if self._counters.stream_state == "unresponsive":
            self._counters.stream_state = self._state

    def _on_stream_ended(self, error: BaseException | None) -> None:
        self._teardown_stream()
        if self._closing is not None:
            # Expected after our half-close; otherwise _advance_close falls back to Flush.
            self._set_state("down")
            return
        self._counters.stream_failures += 1
        code = error.code() if isinstance(error, grpc.Call) else None
        name = getattr(code, "name", None)
        if name in self._config.retry.rejected_codes:
            # Said before counted: whoever sees the counter move can rely on the warning being out.
            self._log_once(
                f"rejected-{name}",
                "gradwatch server %s rejected the stream (%s: %s); retrying rarely",
                self._target,
                name,
                error.details() if isinstance(error, grpc.Call) else error,  # type: ignore[union-attr]
            )
            self._counters.rejections += 1
            delay = self._config.retry.rejected_delay_s(self._rng)
        else:
            if error is not None and not isinstance(error, grpc.RpcError):
                errors.report(error, "sender.stream")
            self._log_once(
                "unreachable",
                "gradwatch server %s unavailable (%s); training continues, reports are buffered",
                self._target,
                name or "stream ended",
            )
            delay = self._config.retry.delay_s(self._attempt, self._rng)
            self._attempt += 1
        self._next_attempt = self._clock() + delay
        self._set_state("backoff")

    def _maintain(self, now: float) -> None:
        if self._state in ("idle", "backoff") and now >= self._next_attempt:
            self._open_stream(now)
        elif self._state == "connecting" and now >= self._welcome_deadline:
            self._on_stream_ended(None)  # no Welcome in time: retry like any failure
        elif self._state == "ready" and self._stream is not None:
            if self._congested or (self._push_due is not None and now >= self._push_due):
                self._push()
            if now >= self._next_heartbeat:
                frame = wire.heartbeat_frame(time.time(), self._last_step, self._counters.dropped)
                progress = self._progress(fresh=True) if self._progress is not None else None
                if progress is not None:
                    frame.heartbeat.collectives.CopyFrom(progress)
                self._stream.send(frame)
                self._next_heartbeat = now + self._heartbeat_s
            if self._unacked_since is not None and now - self._unacked_since > ACK_OVERDUE_S:
                self._counters.stream_state = "unresponsive"

    def _open_stream(self, now: float) -> None:
        self._gen += 1
        try:
            self._target = self._pick_target()
            stream = OpenStream.open(
                self._channel_factory, self._target, self._hello, self._inbox, self._gen, self._metadata()
            )
        except Exception as exc:
            errors.report(exc, "sender.connect")
            self._next_attempt = now + self._config.retry.delay_s(self._attempt, self._rng)
            self._attempt += 1
            self._set_state("backoff")
            return
        self._stream = stream
        self._readers = [r for r in self._readers if r.is_alive()]
        self._readers.append(stream.reader)
        self._welcome_deadline = now + self._config.welcome_timeout_s
        self._set_state("connecting")

    def _teardown_stream(self) -> None:
        stream, self._stream = self._stream, None
        self._congested = False
        if stream is not None:
            stream.abort()

    def _set_state(self, state: str) -> None:
        self._state = state
        self._counters.stream_state = state
        self._unacked_since = None

    # ------------------------------------------------------------------ closing

    def _begin_close(self, request: _CloseRequest) -> None:
        self._closing = request
        now = self._clock()
        if self._state == "connecting":
            # A Welcome is probably milliseconds away; give it half the time, then fall back to Flush.
            self._connect_grace = now + max(0.0, request.deadline - now) / 2

    def _advance_close(self, now: float) -> bool:
        """One step of the close procedure; True when finished."""
        request = self._closing
        assert request is not None
        if now >= request.deadline:
            return True
        if self._state == "ready" and self._stream is not None:
            if self._congested or not self._goodbye_sent:
                self._push()
            if not self._congested and not self._goodbye_sent:
                # After every numbered frame, so the server sees Goodbye last.
                self._stream.send(wire.goodbye_frame(request.final_step, request.reason))
                self._goodbye_sent = True
            if len(self._replay) == 0 and self._half_close_deadline is None:
                # Everything acknowledged: half-close and let the server end the call cleanly.
                self._stream.half_close()
                self._half_close_deadline = min(request.deadline, now + HALF_CLOSE_GRACE_S)
            return self._half_close_deadline is not None and now >= self._half_close_deadline
        if self._state == "connecting" and self._connect_grace is not None and now < self._connect_grace:
            return False
        # The stream is down (or never came up): one unary Flush with what is left, then stop.
        self._teardown_stream()
        if len(self._replay) or not self._goodbye_sent:
            self._flush(request.deadline, wire.goodbye_frame(request.final_step, request.reason))
        return True

    def _flush(self, deadline: float, goodbye: pb.AgentFrame) -> None:
        """The final unary Flush: what is left, then the Goodbye (so the server sees this rank finish, as it
        would over a stream)."""
        timeout = deadline - self._clock()
        if timeout <= 0.01:
            return
        frames = itertools.chain((frame for _, frame in self._replay), (goodbye,))
        try:
            hello = wire.hello(self._identity)
            acked = flush(self._channel_factory, self._target, hello, frames, timeout, self._metadata())
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else None
            self._log_once("flush", "gradwatch final flush to %s failed (%s: %s)", self._target, code, details or "")
            return
        self._apply_ack(acked)
        self._counters.flushes += 1

    def _finish(self) -> None:
        request = self._closing
        assert request is not None
        self._teardown_stream()
        dropped = sum(self._counters.dropped.values())
        self._result = len(self._replay) == 0 and dropped == 0
        self._set_state("closed")
        for reader in self._readers:
            reader.join(max(0.0, request.deadline - self._clock()))
        self._readers.clear()

    def _log_once(self, key: str, message: str, *args: object, level: int = logging.WARNING) -> None:
        level = level if key not in self._logged else logging.DEBUG
        self._logged.add(key)
        logger.log(level, message, *args)
