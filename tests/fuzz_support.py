"""Generators of hostile input for the fuzz tests and scripts/fuzz_ingest.py.

* `messages(descriptor)`: any protobuf message of that type, every field drawn from its whole range with the
  extremes favoured (0, 2^32-1, 2^63, 2^64-1, NaN, ±inf, control characters, empty and long strings, random
  bytes), oneofs with one member set, bounded repeated and map fields, nesting bounded.
* `coherent_streams()`: a Hello with a small schema and reports whose columns have the right sizes but
  hostile float32 values (NaN, ±inf, denormals, huge), steps and seqs anywhere: the detectors' paths.
* `http_requests()`: a method, a path under the API (ids with escapes and traversal tricks), a query and a
  body (JSON of any shape, deep nesting, raw bytes).
* `run_ingest(ingestor, limits, raws)`: the server's own ingest path for one stream of serialised frames
  (parse, validate, open, apply, close) without the transport, for coverage-guided runs; FrameRejected is the
  expected refusal, any other exception is a crash.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from gradwatch.server.report import COLUMN_NAMES, COLUMN_WIDTHS
from gradwatch.server.validate import FrameRejected, StreamValidator, parse_agent_frame
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["coherent_streams", "http_requests", "messages", "run_ingest"]

_U32 = 2**32 - 1
_U64 = 2**64 - 1
_I64 = 2**63 - 1


def _ints(top: int, signed: bool) -> st.SearchStrategy[int]:
    low = -(top + 1) if signed else 0
    edges = [0, 1, top, top - 1, 2**31 - 1, 2**31]
    if top >= _U64:
        edges += [_I64, _I64 + 1]
    if signed:
        edges += [-1, low]
    return st.one_of(st.sampled_from([e for e in edges if low <= e <= top]), st.integers(low, top))


_FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, 1e-45, 3.4e38]),
    st.floats(allow_nan=True, allow_infinity=True),
)
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "\x1b[2J", "\x00", "a" * 5000, "../../etc/passwd", "<script>x</script>", "' OR 1=1 --"]),
)
_BYTES = st.one_of(st.binary(max_size=256), st.binary(min_size=4, max_size=4).map(lambda b: b * 64))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return _ints(_U64, False)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return _ints(_U32, False)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return _ints(_I64, True)
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return _ints(2**31 - 1, True)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _FLOATS if t == FieldDescriptor.TYPE_DOUBLE else _FLOATS.map(_as_float32)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if t == FieldDescriptor.TYPE_BYTES:
        return _BYTES
    if t == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 1000))
    raise TypeError(f"no strategy for {field.full_name}")


def _as_float32(value: float) -> float:
    try:
        return float(np.float32(value))
    except OverflowError:
        return float("inf")


def messages(descriptor: Descriptor, depth: int = 3) -> st.SearchStrategy[Any]:
    """Any message of `descriptor`'s type (see the module docstring)."""
    cls = _class(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        message = cls()
        members = {f.name for o in descriptor.oneofs for f in o.fields}
        chosen = {draw(st.sampled_from([f.name for f in o.fields])) for o in descriptor.oneofs if o.fields}
        for field in descriptor.fields:
            if field.name in members and field.name not in chosen:
                continue
            if field.name not in members and not draw(st.booleans()):
                continue
            _fill(draw, message, field, depth)
        return message

    return build()


def _fill(draw: st.DrawFn, message: Any, field: FieldDescriptor, depth: int) -> None:
    is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
    if is_map:
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        entries = draw(st.dictionaries(_scalar(key_field), _scalar(value_field), max_size=6))
        getattr(message, field.name).update(entries)
    elif field.is_repeated:
        if field.message_type is not None:
            if depth > 0:
                for item in draw(st.lists(messages(field.message_type, depth - 1), max_size=3)):
                    getattr(message, field.name).append(item)
        else:
            getattr(message, field.name).extend(draw(st.lists(_scalar(field), max_size=6)))
    elif field.message_type is not None:
        if depth > 0:
            getattr(message, field.name).CopyFrom(draw(messages(field.message_type, depth - 1)))
        else:
            getattr(message, field.name).SetInParent()
    else:
        setattr(message, field.name, draw(_scalar(field)))


def _class(descriptor: Descriptor) -> type:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


_F32 = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, 3.4e38, -3.4e38, 1.0]),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)


def _column(n: int) -> st.SearchStrategy[bytes]:
    return st.lists(_F32, min_size=n, max_size=n).map(lambda v: struct.pack(f"<{n}f", *v))


@st.composite
def coherent_streams(draw: st.DrawFn, run: str = "fuzz") -> list[pb.AgentFrame]:
    """A Hello with a small schema, then reports (and heartbeats, events, a goodbye) sized to match it."""
    n = draw(st.integers(1, 6))
    names = [f"layer.{i}" for i in range(n)]
    counts = draw(st.lists(_ints(_U64, False), min_size=n, max_size=n))
    hello = pb.Hello(
        protocol_version=pb.PROTOCOL_VERSION_CURRENT,
        run_id=draw(st.sampled_from([run, run + "-b"])),
        job_name="fuzz",
        rank=draw(st.integers(0, 3)),
        world_size=4,
        session_id=f"s{draw(st.integers(0, 3))}",
        host=draw(_TEXT),
        agent_version=draw(_TEXT),
        full_stats_interval=draw(_ints(_U32, False)),
        schema=pb.LayerSchema(names=names, module_types=["Linear"] * n, param_counts=counts),
    )
    frames = [pb.AgentFrame(hello=hello)]
    seq = 0
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["report", "report", "report", "heartbeat", "event", "goodbye"]))
        if kind == "report":
            seq += draw(st.integers(1, 3))
            layers = pb.LayerStats()
            for name in draw(st.lists(st.sampled_from(COLUMN_NAMES), max_size=5, unique=True)):
                setattr(layers, name, draw(_column(n * COLUMN_WIDTHS.get(name, 1))))
            report = pb.StepReport(step=draw(_ints(_U64, False) if draw(st.booleans()) else st.integers(0, 100)),
                                   wall_time=draw(_FLOATS), step_duration_s=draw(_FLOATS), loss=draw(_FLOATS),
                                   has_loss=draw(st.booleans()), grad_sum_squares=draw(_FLOATS),
                                   non_finite=draw(_ints(_U32, False)), layers=layers)  # fmt: skip
            if draw(st.booleans()):
                report.first_non_finite_layer = draw(st.integers(0, n))
            if draw(st.booleans()):
                report.grad_global_share = draw(_FLOATS)
            frames.append(pb.AgentFrame(seq=seq, report=report))
        elif kind == "heartbeat":
            beat = pb.Heartbeat(wall_time=draw(_FLOATS), step=draw(_ints(_U64, False)),
                                dropped=draw(st.dictionaries(_TEXT, _ints(_U64, False), max_size=4)))  # fmt: skip
            frames.append(pb.AgentFrame(heartbeat=beat))
        elif kind == "event":
            seq += 1
            event = pb.Event(kind=draw(_TEXT), step=draw(_ints(_U64, False)), message=draw(_TEXT),
                             attributes=draw(st.dictionaries(_TEXT, _TEXT, max_size=4)))  # fmt: skip
            frames.append(pb.AgentFrame(seq=seq, event=event))
        else:
            frames.append(pb.AgentFrame(goodbye=pb.Goodbye(final_step=draw(_ints(_U64, False)), reason=draw(_TEXT))))
    return frames


_ID = st.one_of(_TEXT, st.sampled_from(["..", "%2e%2e", "%00", "x" * 3000, "fuzz", "%1b%5b2J"]))


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[str, str, bytes | None]:
    """(method, path with query, body)."""
    from urllib.parse import quote

    method = draw(st.sampled_from(["GET", "GET", "GET", "POST", "DELETE", "PUT", "PATCH", "HEAD"]))
    route = draw(st.sampled_from(["runs", "alerts", "incidents", "silences", "notifications", "runs/{}",
                                  "runs/{}/ranks", "runs/{}/series", "incidents/{}", "incidents/{}/window",
                                  "silences/{}", "{}"]))  # fmt: skip
    path = "/api/v1/" + route.format(quote(draw(_ID), safe=""))
    if draw(st.booleans()):
        path = draw(st.sampled_from(["/metrics", "/healthz", "/", "/api", "/api/v1", "//api/v1/runs"]))
    keys = ["limit", "offset", "state", "run", "job", "detector", "severity", "since", "last", "rank", "x"]
    values = st.one_of(_TEXT, st.integers(-(2**70), 2**70).map(str), _FLOATS.map(str))
    query = draw(st.lists(st.tuples(st.sampled_from(keys), values), max_size=4))
    if query:
        path += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query)
    body: bytes | None = None
    if method in ("POST", "PUT", "PATCH"):
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | _TEXT,
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
            max_leaves=12,
        )
        silence = st.fixed_dictionaries({}, optional={"run": json_values, "detector": json_values,
                                                      "duration_s": json_values, "comment": json_values})  # fmt: skip
        import json

        body = draw(st.one_of(
            silence.map(lambda d: json.dumps(d).encode()),
            json_values.map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=300),
            st.integers(1, 3000).map(lambda k: b"[" * k + b"]" * k),
        ))  # fmt: skip
    return method, path, body


def run_ingest(ingestor: Any, limits: Any, raws: list[bytes]) -> str:
    """One stream of serialised frames through the server's ingest path; returns "ok" or the rejection
    reason. Anything but FrameRejected propagates: that is a crash."""
    validator = StreamValidator(limits)
    session = None
    try:
        for raw in raws:
            frame = parse_agent_frame(raw, limits)
            kind = validator.check(frame)
            if session is None:
                if kind != "hello":
                    return "missing_hello"
                session = ingestor.open(frame.hello)
            else:
                ingestor.apply(session, frame, kind)
    except FrameRejected as exc:
        return exc.reason
    finally:
        if session is not None:
            ingestor.close(session)
    return "ok"
