"""What gRPC core's receive limit costs and hides: the evidence behind keeping it in front of gradwatch's own
frame limit (docs/security.md, "Frames above gRPC's ceiling").

Two measurements on a bare grpc.aio server with a raw-bytes stream handler, like gradwatch's:

* memory: one client sends one frame of `--mib` MiB to a server whose `grpc.max_receive_message_length` is
  the ceiling (1 MiB here) and to one without a limit (-1: every frame reaches the handler, which is what
  "let gradwatch decide every size" needs); each server runs in its own process and prints its peak RSS.
* what the handler sees: a frame over the ceiling, against a client that cancels its stream and one that
  half-closes it: what `context.read()` returns, whether the handler is then cancelled, and what the done
  callback's context says.

    python bench/grpc_ceiling.py [--mib 300]
"""

from __future__ import annotations

import argparse
import asyncio
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
            call = channel.stream_stream(METHOD)(metadata=(("case", case),))
            await call.write(b"x" * 10)
            if case == "over the ceiling":
                await call.write(b"x" * (CEILING + 1))
            elif case == "client cancels":
                await asyncio.sleep(0.1)
                call.cancel()
            else:
                await call.done_writing()
                await call.read()
            await asyncio.sleep(0.4)
    await server.stop(0)
    for case, log in seen.items():
        print(f"{case:>20}: {' -> '.join(log)}")


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


if __name__ == "__main__":
    main()
