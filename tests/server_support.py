"""Helpers for the server tests: a real ServerApp on port 0, hand-built frames, a live agent stream.

No torch here: frames are protobuf messages built by hand, columns are numpy bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import queue
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import numpy as np

from gradwatch.server.app import ServerApp
from gradwatch.server.config import GrpcConfig, HttpConfig, LimitsConfig, ServerConfig
from gradwatch.v1 import gradwatch_pb2 as pb
from gradwatch.v1 import gradwatch_pb2_grpc as pbg

PROMTOOL = "/usr/bin/promtool"
WAIT_S = 10.0  # generous upper bound for anything that should take milliseconds


def server_config(**limits: Any) -> ServerConfig:
    """Loopback, port-0 config; keyword arguments override LimitsConfig fields."""
    return ServerConfig(
        grpc=GrpcConfig(host="127.0.0.1", port=0),
        http=HttpConfig(host="127.0.0.1", port=0),
        limits=dataclasses.replace(LimitsConfig(), **limits),
    )


def start_app(config: ServerConfig | None = None, **kwargs: Any) -> ServerApp:
    return ServerApp(config or server_config(), **kwargs).start()


def hello(
    run: str = "run-a",
    rank: int = 0,
    world_size: int = 1,
    session: str = "s-1",
    *,
    layers: int = 0,
    version: int = pb.PROTOCOL_VERSION_CURRENT,
    **fields: Any,
) -> pb.Hello:
    names = [f"model.layers.{i}.linear" for i in range(layers)]
    return pb.Hello(
        protocol_version=version,
        run_id=run,
        job_name=fields.pop("job_name", "job-x"),
        rank=rank,
        world_size=world_size,
        session_id=session,
        host="host-0",
        pid=1234,
        agent_version="test",
        schema=pb.LayerSchema(names=names, module_types=["Linear"] * layers, param_counts=[10] * layers),
        **fields,
    )


def hello_frame(**kwargs: Any) -> pb.AgentFrame:
    return pb.AgentFrame(seq=0, hello=hello(**kwargs))


def columns(n: int, **values: Iterable[float] | float) -> pb.LayerStats:
    """LayerStats with the given columns (a scalar fills all n layers)."""
    out = {}
    for name, value in values.items():
        arr = np.full(n, value, dtype="<f4") if np.isscalar(value) else np.asarray(value, dtype="<f4")
        out[name] = arr.tobytes()
    return pb.LayerStats(**out)


def report_frame(
    seq: int,
    step: int | None = None,
    *,
    grad_norm: float = 1.0,
    loss: float | None = 0.5,
    flags: int = 0,
    layers: pb.LayerStats | None = None,
    **fields: Any,
) -> pb.AgentFrame:
    gss = fields.pop("grad_sum_squares", grad_norm * grad_norm if math.isfinite(grad_norm) else grad_norm)
    rep = pb.StepReport(
        step=seq if step is None else step,
        wall_time=1_700_000_000.0 + seq,
        step_duration_s=0.1,
        loss=0.0 if loss is None else loss,
        has_loss=loss is not None,
        grad_sum_squares=gss,
        non_finite=flags,
        **fields,
    )
    if layers is not None:
        rep.layers.CopyFrom(layers)
    return pb.AgentFrame(seq=seq, report=rep)


def run_stream(target: str, frames: Iterable[pb.AgentFrame]) -> list[pb.ServerFrame]:
    """Send `frames` on one stream and return every server frame (raises grpc.RpcError)."""
    with grpc.insecure_channel(target) as channel:
        return list(pbg.IngestStub(channel).Stream(iter(list(frames)), timeout=WAIT_S))


def acks(responses: list[pb.ServerFrame]) -> list[int]:
    return [r.ack.seq for r in responses if r.WhichOneof("body") == "ack"]


class AgentStream:
    """A live stream driven step by step: `send(frame)`, `recv()` the next server frame."""

    _END = object()

    def __init__(
        self, target: str, metadata: tuple[tuple[str, str], ...] | None = None, *, channel: grpc.Channel | None = None
    ) -> None:
        """On `channel` when given (several streams on one connection; the caller closes it), else its own."""
        self._owned = channel is None
        self._channel = grpc.insecure_channel(target) if channel is None else channel
        self._requests: queue.Queue[Any] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        call = pbg.IngestStub(self._channel).Stream(iter(self._requests.get, self._END), metadata=metadata)
        self._call = call
        self._thread = threading.Thread(target=self._pump, args=(call,), daemon=True)
        self._thread.start()

    def _pump(self, call: Iterator[pb.ServerFrame]) -> None:
        try:
            for response in call:
                self._responses.put(response)
            self._responses.put(None)
        except grpc.RpcError as exc:
            self._responses.put(exc)

    def send(self, frame: pb.AgentFrame) -> None:
        self._requests.put(frame)

    def recv(self, timeout: float = WAIT_S) -> Any:
        """Next ServerFrame; None at the end of the stream; the grpc.RpcError if it failed."""
        return self._responses.get(timeout=timeout)

    def recv_ack(self, seq: int, timeout: float = WAIT_S) -> None:
        """Read until an Ack covering `seq`; fails on anything else ending the stream."""
        while True:
            frame = self.recv(timeout)
            assert isinstance(frame, pb.ServerFrame), f"stream ended before ack {seq}: {frame!r}"
            if frame.WhichOneof("body") == "ack" and frame.ack.seq >= seq:
                return

    def close(self) -> None:
        self._requests.put(self._END)
        self._thread.join(WAIT_S)
        if self._owned:
            self._channel.close()


def short_run(target: str, run: str, *, nan_at: int | None = None, reports: int = 5) -> None:
    """A one-rank run: `reports` reports on one stream, acknowledged, then the stream closes (no goodbye). Its loss
    turns NaN at report `nan_at`: non_finite fires (critical) and opens an incident."""
    stream = AgentStream(target)
    stream.send(hello_frame(run=run, session=run))
    for seq in range(1, reports + 1):
        stream.send(report_frame(seq, loss=float("nan") if seq == nan_at else 0.5))
    stream.recv_ack(reports)
    stream.close()


def http_get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body), also for error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=WAIT_S) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def get_json(url: str) -> Any:
    status, _, body = http_get(url)
    assert status == 200, (status, body)
    return json.loads(body)


def scrape(app: ServerApp) -> str:
    status, _, body = http_get(app.http_url + "/metrics")
    assert status == 200
    return body.decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """Value of the series `name{labels}` in a text exposition (labels matched exactly), or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def metric(text: str, name: str, **labels: str) -> float:
    """Like `sample`, but the series must exist."""
    value = sample(text, name, **labels)
    assert value is not None, f"no series {name}{labels}"
    return value


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False
    )
