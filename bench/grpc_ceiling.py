"""What gRPC core's receive limit costs and hides: the evidence behind keeping it in front of gradwatch's own
frame limit (docs/security.md, "Frames above gRPC's ceiling").

Two measurements on a bare grpc.aio server with a raw-bytes stream handler, like gradwatch's:

* memory: one client sends one frame of `--mib` MiB to a server whose `grpc.max_receive_message_length` is
  the ceiling (1 MiB here) and to one without a limit (-1: every frame reaches the handler, which is what
  "let gradwatch decide every size" needs); each server runs in its own process and prints its peak RSS.
* what the handler sees: a frame over the ceiling, against a client that cancels its stream and one that
  half-closes it: what `context.read()` returns, whether the handler is then cancelled, and what the done
  callback's context says.
* what core's own per-call views record for the same cases (and for a handler that aborts with a status):
  channelz (calls started/succeeded/failed of the server, streams failed on its socket; grpcio's
  `grpc._cython.cygrpc` channelz queries, which `grpcio-channelz` wraps) and, where `grpcio-observability`
  and `opentelemetry-sdk` are installed, the OpenTelemetry plugin's `grpc.server.call.duration` by
  `grpc.status`. Either could count core's refusals only if it told them apart from a client's cancel.

    python bench/grpc_ceiling.py [--mib 300]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import resource
import subprocess
import sys
from typing import Any

import grpc

CEILING = 1 << 20
METHOD = "/bench.Ceiling/Stream"


def _server(limit: int, handler: Any, unary: Any = None) -> grpc.aio.Server:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
    handlers = {"Stream": grpc.stream_stream_rpc_method_handler(handler)}
    if unary is not None:
        handlers["Unary"] = grpc.unary_unary_rpc_method_handler(unary)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Ceiling", handlers),))
    return server


async def _serve_for_memory(limit: int, seconds: float) -> None:
    async def stream(_: Any, context: grpc.aio.ServicerContext) -> None:
        while (raw := await context.read()) is not grpc.aio.EOF:
            print(f"handler got {len(raw)} bytes", flush=True)

    server = _server(limit, stream)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.sleep(seconds)
    print(f"peak_rss_mib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}", flush=True)


async def _send(port: int, size: int) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(METHOD)()
        await call.write(b"x" * size)
        await call.done_writing()
        return f"{(await call.code()).name}: {(await call.details())[:70]}"


def memory(mib: int) -> None:
    for limit in (CEILING, -1):
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(limit)], stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert server.stdout is not None
        port = int(server.stdout.readline())
        status = asyncio.run(_send(port, mib << 20))
        lines = server.stdout.read().split()
        server.wait()
        rss = lines[lines.index("peak_rss_mib") + 1]
        print(f"limit {limit:>8}: one {mib} MiB frame -> client {status!r}; server peak RSS {rss} MiB")


CASES = ("completes", "client cancels", "over the ceiling", "handler aborts")


async def _stream_case(channel: grpc.aio.Channel, case: str) -> str:
    """Run one of CASES (or "client half-closes", as "completes") on a stream; the client's status."""
    call = channel.stream_stream(METHOD)(metadata=(("case", case),))
    await call.write(b"x" * 10)
    if case == "over the ceiling":
        await call.write(b"x" * (CEILING + 1))
    elif case == "client cancels":
        await asyncio.sleep(0.1)
        call.cancel()
    elif case == "handler aborts":
        await call.write(b"abort")
    else:
        await call.done_writing()
        await call.read()
    return (await call.code()).name


async def _signals() -> None:
    seen: dict[str, list[str]] = {}

    async def stream(_: Any, context: grpc.aio.ServicerContext) -> None:
        log = seen.setdefault(dict(context.invocation_metadata())["case"], [])
        context.add_done_callback(lambda c: log.append(f"done(cancelled={c.cancelled()}, code={c.code()})"))
        try:
            while (raw := await context.read()) is not grpc.aio.EOF:
                log.append(f"read {len(raw)} B")
            log.append("read EOF")
            await asyncio.sleep(0.2)
            await context.write(b"bye")
            log.append("wrote after EOF")
        except asyncio.CancelledError:
            log.append("handler cancelled")
            raise

    async def unary(raw: bytes, _: grpc.aio.ServicerContext) -> bytes:
        seen.setdefault("unary over the ceiling", []).append(f"handler called with {len(raw)} B")
        return b""

    server = _server(CEILING, stream, unary)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await channel.unary_unary("/bench.Ceiling/Unary")(b"x" * (CEILING + 1))
        except grpc.aio.AioRpcError as exc:
            seen.setdefault("unary over the ceiling", []).append(f"(client: {exc.code().name}; handler never called)")
        for case in ("over the ceiling", "client cancels", "client half-closes"):
            await _stream_case(channel, case)
            await asyncio.sleep(0.4)
    await server.stop(0)
    for case, log in seen.items():
        print(f"{case:>20}: {' -> '.join(log)}")


def _channelz() -> collections.Counter[str]:
    """Server call counts and socket stream counts, summed over the process's servers."""
    from grpc._cython import cygrpc

    counts: collections.Counter[str] = collections.Counter()
    for server in json.loads(cygrpc.channelz_get_servers(0)).get("server", []):
        counts.update({k: int(v) for k, v in server["data"].items() if k.startswith("calls")})
        sockets = json.loads(cygrpc.channelz_get_server_sockets(int(server["ref"]["serverId"]), 0, 0))
        for ref in sockets.get("socketRef", []):
            data = json.loads(cygrpc.channelz_get_socket(int(ref["socketId"])))["socket"]["data"]
            counts.update({k: int(v) for k, v in data.items() if k.startswith("streamsFailed")})
    return counts


def _otel() -> tuple[Any, Any] | None:
    """(plugin, reader): the OpenTelemetry plugin registered globally with an in-memory reader, or None."""
    try:
        import grpc_observability
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    except ImportError:
        return None
    reader = InMemoryMetricReader()
    plugin = grpc_observability.OpenTelemetryPlugin(meter_provider=MeterProvider(metric_readers=[reader]))
    plugin.register_global()
    return plugin, reader


def _server_calls(reader: Any) -> collections.Counter[str]:
    """The plugin's server calls by `grpc.status`, and the bytes they received."""
    counts: collections.Counter[str] = collections.Counter()
    data = reader.get_metrics_data()
    for exported in data.resource_metrics if data else ():
        for scope in exported.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    if metric.name == "grpc.server.call.duration":
                        counts[f"status {point.attributes.get('grpc.status')}"] += point.count
                    elif metric.name == "grpc.server.call.rcvd_total_compressed_message_size":
                        counts["bytes received"] += int(point.sum)
    return counts


async def _core_views() -> None:
    async def stream(_: Any, context: grpc.aio.ServicerContext) -> None:
        while (raw := await context.read()) is not grpc.aio.EOF:
            if raw == b"abort":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused by the handler")
        await context.write(b"bye")

    otel = _otel()
    server = _server(CEILING, stream)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for case in CASES:
            before = (_channelz(), _server_calls(otel[1]) if otel else None)
            client = await _stream_case(channel, case)
            await asyncio.sleep(1.2)  # the plugin exports every 0.5 s
            channelz = _channelz() - before[0]
            line = f"{case:>16}: client {client}; channelz {dict(channelz)}"
            if otel:
                line += f"; otel {dict(_server_calls(otel[1]) - before[1])}"
            print(line)
    await server.stop(0)
    if otel:
        with contextlib.suppress(Exception):
            otel[0].deregister_global()
    else:
        print("(OpenTelemetry plugin not measured: grpcio-observability / opentelemetry-sdk not installed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=300, help="size of the frame of the memory measurement")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(_serve_for_memory(args.serve, seconds=4.0))
        return
    memory(args.mib)
    asyncio.run(_signals())
    asyncio.run(_core_views())


if __name__ == "__main__":
    main()
