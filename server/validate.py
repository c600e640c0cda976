"""Frame validation: every way a frame can be rejected, its status code and its reason label.

Nothing reaches the store unchecked. A rejection is a `FrameRejected` carrying the
gRPC status code, a stable `reason` (label value of gradwatch_ingest_errors_total,
also sent to the agent as trailing metadata `gradwatch-reason`) and a message for
humans. `REASONS` lists every reason so the counters can exist at 0.

Stream-level rules live in `StreamValidator` (one per stream or Flush call): the
first frame is a Hello, there is exactly one, seq numbers rise within the stream,
steps do not go backwards, and layer columns match the Hello's schema.

Label values: everything from an agent that becomes a Prometheus label value (run id, job name, layer and
module names) is bounded in length (limits.max_run_id_chars, max_job_name_chars, max_layer_name_chars)
and must be printable (no control characters or line breaks), so no agent can make a series unreadable or
a scrape huge; how many such values exist is bounded elsewhere (max_runs, max_layer_series_per_run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc
from google.protobuf.message import DecodeError

from gradwatch.server.collectives import check_progress
from gradwatch.server.config import LimitsConfig
from gradwatch.server.report import ACTIVATION_COLUMN_NAMES, COLUMN_NAMES, COLUMN_WIDTHS
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = [
    "ACCEPTED_PROTOCOL_VERSIONS",
    "REASONS",
    "FrameRejected",
    "StreamValidator",
    "check_hello",
    "parse_agent_frame",
    "parse_flush_request",
    "rank_limit_reached",
    "run_limit_reached",
    "unbatch",
]

#: Inclusive range of Hello.protocol_version this server speaks.
ACCEPTED_PROTOCOL_VERSIONS: tuple[int, int] = (pb.PROTOCOL_VERSION_CURRENT, pb.PROTOCOL_VERSION_CURRENT)

MALFORMED = "malformed_frame"
TOO_LARGE = "frame_too_large"
UNSUPPORTED_PROTOCOL = "unsupported_protocol"
MISSING_HELLO = "missing_hello"
DUPLICATE_HELLO = "duplicate_hello"
EMPTY_FRAME = "empty_frame"
INVALID_RUN_ID = "invalid_run_id"
INVALID_RANK = "invalid_rank"
INVALID_SESSION = "invalid_session_id"
LIMIT_EXCEEDED = "limit_exceeded"
INVALID_SCHEMA = "invalid_schema"
INVALID_LAYER_STATS = "invalid_layer_stats"
INVALID_SEQ = "invalid_seq"
NON_MONOTONIC = "non_monotonic"
INVALID_REPORT = "invalid_report"
INVALID_JOB_NAME = "invalid_job_name"
INVALID_DETECTOR_SETTINGS = "invalid_detector_settings"
INVALID_BATCH = "invalid_batch"
#: Frames one AgentFrame.batch may hold (Welcome.max_batch_frames): the agent groups at most 64.
MAX_BATCH_FRAMES = 256
DETECTOR_SETTINGS_CONFLICT = "detector_settings_conflict"
OUT_OF_RANGE = "out_of_range"
TOO_MANY_ENTRIES = "too_many_entries"
RUN_LIMIT_REACHED = "run_limit_reached"
RANK_LIMIT_REACHED = "rank_limit_reached"
STREAM_LIMIT_REACHED = "stream_limit_reached"
HELLO_TIMEOUT = "hello_timeout"
IDLE_TIMEOUT = "idle_timeout"
FLUSH_BUDGET = "flush_budget_exceeded"
#: Largest integer any uint64 field may carry: the server keeps steps, seqs and counts as int64.
MAX_INT64 = (1 << 63) - 1
#: Bytes of a frame that is neither a Hello nor a report (heartbeat, event, goodbye): small by nature, so a
#: large one is refused before its fields cost anything more.
MAX_SMALL_FRAME_BYTES = 256 * 1024
_SMALL_LIMIT = f"heartbeat, event and goodbye frames are at most {MAX_SMALL_FRAME_BYTES} bytes (a fixed limit)"
#: A Hello for a (run, rank) another agent session is streaming as (ingest.Ingestor.open).
RANK_IN_USE = "rank_in_use"
#: Per-run detector settings a Hello may carry, and the size of each key and value.
MAX_DETECTOR_SETTINGS = 64
MAX_DETECTOR_SETTING_CHARS = 1024
#: Autopsy bounds (StepReport.batch_ids, top_samples): the agent's own limits (agent/autopsy.py).
MAX_BATCH_IDS = 4096
MAX_TOP_SAMPLES = 256
MAX_ID_CHARS = 128

#: Every rejection reason, for pre-created counters.
REASONS: tuple[str, ...] = (
    MALFORMED,
    TOO_LARGE,
    UNSUPPORTED_PROTOCOL,
    MISSING_HELLO,
    DUPLICATE_HELLO,
    EMPTY_FRAME,
    INVALID_RUN_ID,
    INVALID_RANK,
    INVALID_SESSION,
    LIMIT_EXCEEDED,
    INVALID_SCHEMA,
    INVALID_LAYER_STATS,
    INVALID_SEQ,
    NON_MONOTONIC,
    INVALID_REPORT,
    INVALID_JOB_NAME,
    INVALID_DETECTOR_SETTINGS,
    INVALID_BATCH,
    DETECTOR_SETTINGS_CONFLICT,
    OUT_OF_RANGE,
    TOO_MANY_ENTRIES,
    RUN_LIMIT_REACHED,
    RANK_LIMIT_REACHED,
    STREAM_LIMIT_REACHED,
    HELLO_TIMEOUT,
    IDLE_TIMEOUT,
    RANK_IN_USE,
    FLUSH_BUDGET,
)

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Frames that carry a sequence number (acknowledged, deduplicated) and those that must not.
_SEQUENCED = frozenset({"report", "event"})
_SMALL = frozenset({"heartbeat", "event", "goodbye"})
#: AgentFrame field number -> body kind, for reading a frame's kind from its tags.
_BODY_FIELDS = {f.number: f.name for f in pb.AgentFrame.DESCRIPTOR.oneofs_by_name["body"].fields}
_SCAN_FIELDS = 8


class FrameRejected(Exception):
    """A frame the server refuses; the stream ends with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def _reject(reason: str, message: str, code: grpc.StatusCode = _INVALID) -> FrameRejected:
    return FrameRejected(code, reason, message)


def run_limit_reached(run_id: str, max_runs: int, policy: str) -> FrameRejected:
    """The refusal of a new run at limits.max_runs."""
    why = "no run is idle without a firing alert" if policy == "evict_idle" else "limits.at_max_runs is refuse"
    return _reject(
        RUN_LIMIT_REACHED,
        f"run {run_id[:80]!r} is new and this server already tracks limits.max_runs={max_runs} runs ({why}); "
        "retry later or raise the limit",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


def rank_limit_reached(run_id: str, rank: int, max_ranks_total: int) -> FrameRejected:
    """The refusal of a new rank at limits.max_ranks_total."""
    return _reject(
        RANK_LIMIT_REACHED,
        f"rank {rank} of run {run_id[:80]!r} is new and this server already holds limits.max_ranks_total="
        f"{max_ranks_total} ranks; retry later or raise the limit",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


def _out_of_range(what: str, value: int) -> FrameRejected:
    return _reject(OUT_OF_RANGE, f"{what} is {value}; the largest accepted is {MAX_INT64} (2^63 - 1)")


def _check_entries(what: str, count: int, limits: LimitsConfig) -> None:
    if count > limits.max_repeated:
        raise _reject(TOO_MANY_ENTRIES, f"{what} has {count} entries; the limit is {limits.max_repeated}")


def _check_small_frame(frame: pb.AgentFrame, kind: str, limits: LimitsConfig) -> None:
    """Bounds of heartbeats, events and goodbyes: integers in range, maps bounded."""
    if kind == "heartbeat":
        beat = frame.heartbeat
        _check_entries("Heartbeat.dropped", len(beat.dropped), limits)
        if beat.step > MAX_INT64:
            raise _out_of_range("Heartbeat.step", beat.step)
        if beat.dropped and max(beat.dropped.values()) > MAX_INT64:
            raise _out_of_range("a Heartbeat.dropped count", max(beat.dropped.values()))
    elif kind == "event":
        _check_entries("Event.attributes", len(frame.event.attributes), limits)
        if frame.event.step > MAX_INT64:
            raise _out_of_range("Event.step", frame.event.step)
    elif kind == "goodbye" and frame.goodbye.final_step > MAX_INT64:
        raise _out_of_range("Goodbye.final_step", frame.goodbye.final_step)


def _check_size(raw: bytes, what: str, limits: LimitsConfig) -> None:
    if len(raw) > limits.max_message_bytes:
        raise _reject(
            TOO_LARGE,
            f"{what} of {len(raw)} bytes exceeds this server's limit of {limits.max_message_bytes} bytes "
            "(limits.max_message_bytes)",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )


def _body_kind(raw: bytes) -> str | None:
    """The body kind of a serialised AgentFrame read from its top-level tags alone (None: not found among
    the first few fields, or not well-formed; the full parse then decides). Costs O(top-level fields)."""
    pos, end = 0, len(raw)
    for _ in range(_SCAN_FIELDS):
        if pos >= end:
            return None
        key, pos = _varint(raw, pos)
        number, wire = key >> 3, key & 7
        if wire == 2:
            length, pos = _varint(raw, pos)
            kind = _BODY_FIELDS.get(number)
            if kind is not None:
                return kind
            pos += length
        elif wire == 0:
            _, pos = _varint(raw, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            return None
    return None


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(raw) and shift < 64:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, len(raw)  # truncated: the caller stops scanning


def parse_agent_frame(raw: bytes, limits: LimitsConfig) -> pb.AgentFrame:
    """Decode one AgentFrame from the wire, enforcing the size limits first (a heartbeat, event or goodbye
    over MAX_SMALL_FRAME_BYTES is refused from its tags, before its fields cost a parse)."""
    _check_size(raw, "frame", limits)
    if len(raw) > MAX_SMALL_FRAME_BYTES:
        kind = _body_kind(raw)
        if kind in _SMALL:
            raise _reject(
                TOO_LARGE,
                f"{kind} frame of {len(raw)} bytes; {_SMALL_LIMIT}",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
    frame = pb.AgentFrame()
    try:
        frame.ParseFromString(raw)
    except DecodeError as exc:
        raise _reject(MALFORMED, f"malformed AgentFrame: {exc}") from None
    if len(raw) > MAX_SMALL_FRAME_BYTES and frame.WhichOneof("body") in _SMALL:
        raise _reject(
            TOO_LARGE,
            f"{frame.WhichOneof('body')} frame of {len(raw)} bytes; {_SMALL_LIMIT}",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    return frame


def unbatch(frame: pb.AgentFrame) -> Sequence[pb.AgentFrame]:
    """The frames a wire frame carries: itself, or a batch's reports and events (each then checked like a frame
    sent alone). A batch that is empty, too long, or holds anything else is rejected whole (INVALID_BATCH)."""
    if frame.WhichOneof("body") != "batch":
        return (frame,)
    frames = frame.batch.frames
    if not 0 < len(frames) <= MAX_BATCH_FRAMES:
        raise _reject(INVALID_BATCH, f"a batch holds 1..{MAX_BATCH_FRAMES} frames, got {len(frames)}")
    for inner in frames:
        kind = inner.WhichOneof("body")
        if kind not in _SEQUENCED:
            raise _reject(INVALID_BATCH, f"a batch holds reports and events only, got {kind or 'an empty frame'}")
    return frames


def parse_flush_request(raw: bytes, limits: LimitsConfig) -> pb.FlushRequest:
    """Decode a FlushRequest, enforcing the size limit first."""
    _check_size(raw, "Flush request", limits)
    request = pb.FlushRequest()
    try:
        request.ParseFromString(raw)
    except DecodeError as exc:
        raise _reject(MALFORMED, f"malformed FlushRequest: {exc}") from None
    if not request.HasField("hello"):
        raise _reject(MISSING_HELLO, "FlushRequest carries no Hello")
    return request


def check_hello(hello: pb.Hello, limits: LimitsConfig) -> None:
    """Reject a Hello this server cannot accept (version, identity, sizes, schema)."""
    low, high = ACCEPTED_PROTOCOL_VERSIONS
    if not low <= hello.protocol_version <= high:
        raise _reject(
            UNSUPPORTED_PROTOCOL,
            f"agent speaks protocol {hello.protocol_version}; this server accepts {low}–{high}",
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    if not hello.run_id:
        raise _reject(INVALID_RUN_ID, "Hello.run_id is empty")
    if len(hello.run_id) > limits.max_run_id_chars:
        raise _reject(
            INVALID_RUN_ID, f"Hello.run_id has {len(hello.run_id)} characters; the limit is {limits.max_run_id_chars}"
        )
    if not hello.run_id.isprintable():
        raise _reject(INVALID_RUN_ID, f"Hello.run_id {hello.run_id!r} has control or non-printable characters")
    if len(hello.job_name) > limits.max_job_name_chars:
        raise _reject(
            INVALID_JOB_NAME,
            f"Hello.job_name has {len(hello.job_name)} characters; the limit is {limits.max_job_name_chars}",
        )
    if not hello.job_name.isprintable():
        raise _reject(INVALID_JOB_NAME, f"Hello.job_name {hello.job_name!r} has control or non-printable characters")
    settings = hello.detector_settings
    if len(settings) > MAX_DETECTOR_SETTINGS:
        raise _reject(
            INVALID_DETECTOR_SETTINGS,
            f"Hello.detector_settings has {len(settings)} entries; the limit is {MAX_DETECTOR_SETTINGS}",
        )
    for key, value in settings.items():
        if len(key) > MAX_DETECTOR_SETTING_CHARS or len(value) > MAX_DETECTOR_SETTING_CHARS:
            raise _reject(
                INVALID_DETECTOR_SETTINGS,
                f"Hello.detector_settings entry {key[:80]!r} is longer than {MAX_DETECTOR_SETTING_CHARS} characters",
            )
    for key, value in settings.items():
        if not key.isprintable() or not value.isprintable():
            raise _reject(
                INVALID_DETECTOR_SETTINGS, f"Hello.detector_settings entry {key[:80]!r} has control characters"
            )
    if not hello.session_id:
        raise _reject(INVALID_SESSION, "Hello.session_id is empty; it keys deduplication of replayed frames")
    if hello.world_size == 0:
        raise _reject(INVALID_RANK, "Hello.world_size is 0")
    if hello.rank >= hello.world_size:
        raise _reject(INVALID_RANK, f"Hello.rank {hello.rank} is not below world_size {hello.world_size}")
    if hello.world_size > limits.max_ranks_per_run:
        raise _reject(
            LIMIT_EXCEEDED,
            f"world_size {hello.world_size} exceeds this server's limit of {limits.max_ranks_per_run} ranks",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    if hello.replica_group_size > hello.world_size or (
        hello.replica_group_size > 1 and hello.replica_group > hello.rank
    ):
        raise _reject(
            INVALID_RANK,
            f"Hello.replica_group {hello.replica_group} (size {hello.replica_group_size}) must be the lowest rank of "
            f"a group of at most world_size {hello.world_size} ranks that holds rank {hello.rank}",
        )
    _check_schema(hello.schema, limits)
    modules = hello.activation_schema
    if len(modules.names) > limits.max_layers_per_schema:
        raise _reject(
            LIMIT_EXCEEDED,
            f"activation schema has {len(modules.names)} modules; this server's limit is "
            f"{limits.max_layers_per_schema}",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    if len(modules.module_types) not in (0, len(modules.names)):
        raise _reject(INVALID_SCHEMA, "activation schema has as many module_types as names, or none")
    _check_names("activation schema", modules, limits)


def _check_names(what: str, schema: pb.LayerSchema, limits: LimitsConfig) -> None:
    """Layer and module names become label values: bounded and printable (module types are shown too)."""
    cap = limits.max_layer_name_chars
    for field_name in ("names", "module_types"):
        values = getattr(schema, field_name)
        if any(len(v) > cap for v in values):
            longest = max(len(v) for v in values)
            raise _reject(INVALID_SCHEMA, f"{what} has a {field_name[:-1]} of {longest} characters; the limit is {cap}")
        if not all(v.isprintable() for v in values):
            bad = next(v for v in values if not v.isprintable())
            raise _reject(INVALID_SCHEMA, f"{what} {field_name[:-1]} {bad[:80]!r} has control characters")


def _check_schema(schema: pb.LayerSchema, limits: LimitsConfig) -> None:
    n = len(schema.names)
    if n > limits.max_layers_per_schema:
        raise _reject(
            LIMIT_EXCEEDED,
            f"schema has {n} layers; this server's limit is {limits.max_layers_per_schema}",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    # module_types, param_counts and local_param_counts are optional detail: absent, or one per layer.
    for field_name in ("module_types", "param_counts", "local_param_counts"):
        values = getattr(schema, field_name)
        m = len(values)
        if m not in (0, n):
            raise _reject(INVALID_SCHEMA, f"schema has {n} names but {m} {field_name}")
        if m and field_name != "module_types" and max(values) > MAX_INT64:
            raise _out_of_range(f"a schema {field_name[:-1]}", max(values))
    if len(set(schema.names)) != n:
        raise _reject(INVALID_SCHEMA, "schema names are not unique")
    if any(not name for name in schema.names):
        raise _reject(INVALID_SCHEMA, "schema contains an empty layer name")
    _check_names("schema", schema, limits)


class StreamValidator:
    """Protocol state of one stream (or one Flush call): checks each frame in order."""

    def __init__(self, limits: LimitsConfig) -> None:
        self._limits = limits
        self._hello: pb.Hello | None = None
        #: Layers and observed modules of the Hello's schemas (what every report's columns are checked against).
        self._layers = self._modules = 0
        self._last_seq = 0
        self._last_step = -1

    @property
    def hello(self) -> pb.Hello | None:
        return self._hello

    def position(self) -> tuple[int, int]:
        """The last sequenced frame's seq and the last report's step checked so far."""
        return self._last_seq, self._last_step

    def resume(self, last_seq: int, last_step: int) -> None:
        """Go on after frames checked elsewhere (the aggregator's relayed columns, server/relay_sessions.py)."""
        self._last_seq, self._last_step = last_seq, last_step

    def check(self, frame: pb.AgentFrame) -> str:
        """Validate `frame` given the frames before it; returns its kind (the oneof name)."""
        kind = frame.WhichOneof("body")
        if kind is None:
            raise _reject(EMPTY_FRAME, f"frame seq={frame.seq} has no body")
        if kind == "batch":
            raise _reject(INVALID_BATCH, "a batch inside a batch or a Flush request")
        if self._hello is None and kind != "hello":
            raise _reject(MISSING_HELLO, f"first frame must be a Hello, got {kind}")
        if kind == "hello":
            if self._hello is not None:
                raise _reject(DUPLICATE_HELLO, "a second Hello on the same stream")
            check_hello(frame.hello, self._limits)
        if frame.seq > MAX_INT64:
            raise _out_of_range("AgentFrame.seq", frame.seq)
        self._check_seq(frame, kind)
        if kind == "hello":
            self._accepted(frame.hello)
        elif kind == "report":
            self._check_report(frame.report)
        else:
            _check_small_frame(frame, kind, self._limits)
        if kind in ("report", "heartbeat"):
            body = frame.report if kind == "report" else frame.heartbeat
            problem = check_progress(body.collectives) if body.HasField("collectives") else None
            if problem is not None:
                raise _reject(INVALID_REPORT, problem)
        return kind

    def accept_hello(self, hello: pb.Hello) -> None:
        """Record a Hello received outside the frame list (FlushRequest.hello)."""
        check_hello(hello, self._limits)
        self._accepted(hello)

    def _accepted(self, hello: pb.Hello) -> None:
        self._hello = hello
        self._layers, self._modules = len(hello.schema.names), len(hello.activation_schema.names)

    def _check_seq(self, frame: pb.AgentFrame, kind: str) -> None:
        if kind not in _SEQUENCED:
            if frame.seq != 0:
                raise _reject(INVALID_SEQ, f"{kind} frames carry seq 0, got {frame.seq}")
            return
        if frame.seq == 0:
            raise _reject(INVALID_SEQ, f"{kind} frame without a sequence number (seq 0)")
        if frame.seq <= self._last_seq:
            raise _reject(
                NON_MONOTONIC, f"seq {frame.seq} after seq {self._last_seq} on the same stream; seq must rise"
            )
        self._last_seq = frame.seq

    def _check_report(self, report: pb.StepReport) -> None:
        if report.step > MAX_INT64 or report.optimizer_step > MAX_INT64:
            raise _out_of_range("StepReport.step" if report.step > MAX_INT64 else "StepReport.optimizer_step",
                                max(report.step, report.optimizer_step))  # fmt: skip
        limits = self._limits
        _check_entries("StepReport.learning_rates", len(report.learning_rates), limits)
        _check_entries("StepReport.input_mean", len(report.input_mean) // 4, limits)
        _check_entries("StepReport.label_histogram", len(report.label_histogram) // 4, limits)
        if report.step < self._last_step:
            raise _reject(NON_MONOTONIC, f"report step {report.step} after step {self._last_step}")
        self._last_step = report.step
        if report.grad_sum_squares < 0:
            raise _reject(INVALID_REPORT, f"grad_sum_squares is negative ({report.grad_sum_squares})")
        if report.step_duration_s < 0 or report.agent_time_s < 0:
            raise _reject(INVALID_REPORT, "step_duration_s and agent_time_s must not be negative")
        if report.HasField("grad_global_share") and report.grad_global_share < 0:
            raise _reject(INVALID_REPORT, f"grad_global_share is negative ({report.grad_global_share})")
        if report.HasField("loss_scale") and not report.loss_scale >= 0:
            raise _reject(INVALID_REPORT, f"loss_scale must be >= 0, got {report.loss_scale}")
        if not math.isfinite(report.wall_time):
            raise _reject(INVALID_REPORT, f"wall_time is {report.wall_time}")
        n = self._layers
        if report.HasField("first_non_finite_layer") and report.first_non_finite_layer >= n:
            raise _reject(
                INVALID_REPORT, f"first_non_finite_layer {report.first_non_finite_layer} but the schema has {n} layers"
            )
        self._check_activations(report)
        self._check_autopsy(report)
        if report.update_ratio and len(report.update_ratio) != 4 * n:
            raise _reject(
                INVALID_LAYER_STATS, f"update_ratio has {len(report.update_ratio)} bytes; the schema's {n} layers "
                f"need {4 * n}"
            )
        if report.HasField("layers"):
            for name in COLUMN_NAMES:
                expected = 4 * n * COLUMN_WIDTHS.get(name, 1)
                size = len(getattr(report.layers, name))
                if size and size != expected:
                    raise _reject(
                        INVALID_LAYER_STATS,
                        f"LayerStats.{name} has {size} bytes; the schema's {n} layers need {expected}",
                    )

    def _check_autopsy(self, report: pb.StepReport) -> None:
        """Batch ids and top samples within their bounds."""
        if not report.batch_ids and not report.top_samples:  # the common case: no autopsy on this report
            return
        if len(report.batch_ids) > MAX_BATCH_IDS or len(report.top_samples) > MAX_TOP_SAMPLES:
            raise _reject(LIMIT_EXCEEDED, f"at most {MAX_BATCH_IDS} batch_ids and {MAX_TOP_SAMPLES} top_samples")
        if any(len(i) > MAX_ID_CHARS for i in report.batch_ids) or any(
            len(s.id) > MAX_ID_CHARS for s in report.top_samples
        ):
            raise _reject(LIMIT_EXCEEDED, f"batch ids are at most {MAX_ID_CHARS} characters")

    def _check_activations(self, report: pb.StepReport) -> None:
        """Activation columns and NaN provenance against Hello.activation_schema; input columns paired."""
        m = self._modules
        if report.HasField("first_non_finite_module") and report.first_non_finite_module >= m:
            raise _reject(
                INVALID_REPORT, f"first_non_finite_module {report.first_non_finite_module} but {m} observed modules"
            )
        if report.HasField("activations"):
            for name in ACTIVATION_COLUMN_NAMES:
                size, expected = len(getattr(report.activations, name)), 4 * m * COLUMN_WIDTHS.get(name, 1)
                if size and size != expected:
                    raise _reject(
                        INVALID_LAYER_STATS,
                        f"ActivationStats.{name} has {size} bytes; the {m} observed modules need {expected}",
                    )
        if len(report.input_mean) != len(report.input_std) or len(report.input_mean) % 4:
            raise _reject(INVALID_REPORT, "input_mean and input_std must be float32 columns of equal length")
        if len(report.label_histogram) % 4:
            raise _reject(INVALID_REPORT, "label_histogram must be a float32 column")
