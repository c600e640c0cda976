"""Run integrity and per-stream fairness: what the ingest path checks beyond one frame's own validity.

* `RunBinding`: what a run's first Hello fixed for its whole life, its job name and its detector settings
  (`Hello.detector_settings`; none sent means the server's defaults). Held on the RunState while the run is
  in memory and in the database's run registry after (eviction, restart), so neither an evicted run's name nor
  its judgement can be taken over: `check_settings` refuses a later Hello whose settings differ with
  FAILED_PRECONDITION `detector_settings_conflict`.
* `ByteBudget`: a token bucket per stream (limits.stream_bytes_per_s, bursts of 2 × max_message_bytes). The
  stream's handler asks it how long to pause after each burst of frames; while paused, the stream's reads
  wait (gRPC flow control pushes back on the sender) and the event loop serves the other streams.
* HTTP requests: `parse_json_body` refuses bodies nested deeper than MAX_JSON_DEPTH before parsing them;
  `HttpRejections` counts every 400 by reason (gradwatch_http_rejected_total).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gradwatch.server.config import LimitsConfig
from gradwatch.server.validate import DETECTOR_SETTINGS_CONFLICT, FrameRejected
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = [
    "HTTP_REJECT_REASONS",
    "MAX_JSON_DEPTH",
    "BadRequest",
    "ByteBudget",
    "HttpRejections",
    "RunBinding",
    "check_settings",
    "json_depth_exceeds",
    "parse_json_body",
]


@dataclass(frozen=True, slots=True)
class RunBinding:
    """The job and the detector settings of a run's first Hello (settings None: not known)."""

    job_name: str
    detector_settings: Mapping[str, str] | None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunBinding:
        """From a run registry row (gradwatch.server.database)."""
        settings = record["summary"].get("detector_settings")
        return cls(record["job_name"], dict(settings) if isinstance(settings, Mapping) else None)


def _parsed(settings: Mapping[str, str]) -> dict[str, Any]:
    """Settings compared by value ("1e3" and "1000.0" are the same setting); unparseable text as itself."""
    out: dict[str, Any] = {}
    for key, text in settings.items():
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def check_settings(binding: RunBinding | None, hello: pb.Hello) -> None:
    """FrameRejected FAILED_PRECONDITION unless `hello` carries the settings its run was started with."""
    if binding is None or binding.detector_settings is None:
        return
    fixed, sent = _parsed(binding.detector_settings), _parsed(hello.detector_settings)
    if fixed == sent:
        return
    changed = sorted(k for k in fixed.keys() | sent.keys() if fixed.get(k, None) != sent.get(k, None))
    raise FrameRejected(
        grpc.StatusCode.FAILED_PRECONDITION,
        DETECTOR_SETTINGS_CONFLICT,
        f"run {hello.run_id[:80]!r} was started with other detector settings (differing: "
        f"{', '.join(k[:80] for k in changed[:8])}); a run's settings are fixed by its first Hello "
        "(none: the server's defaults): send the same ones, or start a new run id",
    )


class ByteBudget:
    """A token bucket of bytes: `spend(n)` returns the seconds to pause before the next read (0 within budget)."""

    __slots__ = ("_burst", "_clock", "_level", "_rate", "_stamp")

    def __init__(self, limits: LimitsConfig, clock: Callable[[], float]) -> None:
        self._rate = float(limits.stream_bytes_per_s)
        self._burst = 2.0 * limits.max_message_bytes
        self._clock = clock
        self._level = self._burst
        self._stamp = clock()

    def spend(self, n: int) -> float:
        now = self._clock()
        self._level = min(self._burst, self._level + (now - self._stamp) * self._rate) - n
        self._stamp = now
        return 0.0 if self._level >= 0 else -self._level / self._rate

    def refund(self, n: int) -> None:
        """Give back `n` bytes spent by a request that was then refused."""
        self._level = min(self._burst, self._level + n)


# ---------------------------------------------------------------------- HTTP request bounds

#: Deepest nesting of arrays and objects accepted in a JSON request body (silences are flat objects).
MAX_JSON_DEPTH = 16
BAD_QUERY = "bad_query"
BAD_BODY = "bad_body"
#: Reasons of refused HTTP requests (label values of gradwatch_http_rejected_total).
HTTP_REJECT_REASONS: tuple[str, ...] = (BAD_QUERY, BAD_BODY)


class BadRequest(ValueError):
    """A request the HTTP API answers with 400; `reason` is its counter label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether `text` nests arrays/objects deeper than `limit` (brackets inside strings do not count)."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def parse_json_body(raw: bytes) -> Any:
    """A request body as JSON; BadRequest `bad_body` for bytes that are not UTF-8 JSON or nest too deep
    (checked before parsing, so no body can exhaust the parser's recursion)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(BAD_BODY, f"body is not UTF-8: {exc}") from None
    if json_depth_exceeds(text, MAX_JSON_DEPTH):
        raise BadRequest(BAD_BODY, f"body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadRequest(BAD_BODY, f"body is not JSON: {exc}") from None


class HttpRejections(Collector):
    """Counts of HTTP requests answered 400, by reason: gradwatch_http_rejected_total."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(HTTP_REJECT_REASONS, 0)

    def count(self, reason: str) -> None:
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "gradwatch_http_rejected_total", "HTTP requests refused as malformed (400), by reason.", labels=["reason"]
        )
        with self._lock:
            for reason, n in sorted(self.counts.items()):
                family.add_metric([reason], n)
        yield family
