"""Helpers for the hardening tests: calls that report (status, gradwatch-reason) instead of raising."""

from __future__ import annotations

from typing import Any

import grpc

from gradwatch.server.grpc_service import REASON_METADATA_KEY
from gradwatch.v1 import gradwatch_pb2 as pb
from gradwatch.v1 import gradwatch_pb2_grpc as pbg
from server_support import WAIT_S, run_stream

NAN = float("nan")


def reason_of(exc: grpc.RpcError) -> str | None:
    return dict(exc.trailing_metadata() or ()).get(REASON_METADATA_KEY)  # type: ignore[attr-defined]


def stream_outcome(target: str, frames: list[pb.AgentFrame]) -> tuple[grpc.StatusCode, str | None, str]:
    """(status, gradwatch-reason, details) of one Stream call; OK and None when it succeeded."""
    try:
        run_stream(target, frames)
    except grpc.RpcError as exc:
        return exc.code(), reason_of(exc), exc.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, None, ""


def flush_outcome(
    target: str,
    hello: pb.Hello,
    frames: list[pb.AgentFrame] = (),
    metadata: Any = None,  # type: ignore[assignment]
) -> tuple[grpc.StatusCode, str | None, str]:
    """(status, gradwatch-reason, details) of one Flush call."""
    with grpc.insecure_channel(target) as channel:
        try:
            pbg.IngestStub(channel).Flush(
                pb.FlushRequest(hello=hello, frames=list(frames)), timeout=WAIT_S, metadata=metadata
            )
        except grpc.RpcError as exc:
            return exc.code(), reason_of(exc), exc.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, None, ""
