"""The `gradwatch` command line: `serve`, `demo`, `version`, and the client commands in `commands.py`
(`runs`, `alerts`, `incidents`, `report`, `top`).

Importing this module does not import torch or the server; each subcommand
loads what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence

from gradwatch import commands
from gradwatch._version import __version__


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradwatch", description="Training-health monitoring for PyTorch.")
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gradwatch server (gRPC ingest, /metrics, JSON API)")
    serve.add_argument("--grpc-port", type=_port, default=None, help="gRPC ingest port (default 50051)")
    serve.add_argument("--http-port", type=_port, default=None, help="HTTP port: /metrics, API (default 9400)")
    serve.add_argument("--host", default=None, help="address to bind both ports to (default 0.0.0.0)")
    serve.add_argument(
        "--port-file",
        default=None,
        metavar="FILE",
        help='once listening, write {"grpc": PORT, "http": PORT} here (JSON, replaced atomically): the ports '
        "the system chose for --grpc-port 0 / --http-port 0",
    )
    serve.add_argument("--config", default=None, metavar="FILE", help="YAML configuration file")
    serve.add_argument(
        "--alertmanager-url",
        action="append",
        default=None,
        metavar="URL",
        help="push alerts to this Alertmanager (API v2); repeat for every replica",
    )
    serve.add_argument(
        "--webhook-url", action="append", default=None, metavar="URL", help="POST alerts as JSON here; repeatable"
    )
    serve.add_argument(
        "--external-url", default=None, metavar="URL", help="this server's URL as users reach it (alert links)"
    )
    serve.add_argument(
        "--data-dir", default=None, metavar="DIR", help="where runs, alerts and incidents are kept (./gradwatch-data)"
    )
    serve.add_argument(
        "--upstream",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="run as a relay: per-rank work here, compact records to this aggregator (host:port or "
        "dns:///name:port; repeat for every replica: runs are spread by hashing their id)",
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("GRADWATCH_LOG_FORMAT") or "text",
        help="console lines as text or one JSON object each, for log collectors "
        "(default: $GRADWATCH_LOG_FORMAT, else text)",
    )
    serve.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        default=os.environ.get("GRADWATCH_LOG_LEVEL") or "INFO",
        help="least severe level logged (default: $GRADWATCH_LOG_LEVEL, else INFO)",
    )

    demo = sub.add_parser("demo", help="train a small model with an injected fault and print the alerts raised")
    demo.add_argument(
        "--fault",
        default="nan",
        metavar="NAME",
        help="fault scenario to inject, or 'none' for a healthy run (default: nan; --list shows them all)",
    )
    demo.add_argument("--list", action="store_true", help="list the fault scenarios and the detector each raises")
    demo.add_argument("--steps", type=_positive, default=None, help="training steps (default: the scenario's)")
    demo.add_argument(
        "--fault-step", type=_positive, default=None, help="step at which to inject the fault (default: the scenario's)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    sub.add_parser("version", help="print the version")
    commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. Output cut short by a closed pipe (`gradwatch runs | head`) ends quietly."""
    try:
        status = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left; point stdout at /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    return status


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    if args.command == "serve":
        # gRPC's core library logs its own lines (a failed bind, with C++ file names) before the server's
        # message that names the port; errors reach the operator through the server's log instead.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        from gradwatch.server.app import serve
        from gradwatch.server.config import config_from_args

        try:
            config = config_from_args(
                grpc_port=args.grpc_port,
                http_port=args.http_port,
                host=args.host,
                config_file=args.config,
                alertmanager_urls=args.alertmanager_url,
                webhook_urls=args.webhook_url,
                upstream=args.upstream,
                external_url=args.external_url,
                data_dir=args.data_dir,
            )
        except ValueError as exc:
            print(f"gradwatch serve: {exc}", file=sys.stderr)
            return 2
        if args.log_format not in ("text", "json") or args.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            print(f"gradwatch serve: bad log format or level {args.log_format!r}/{args.log_level!r} "
                  "(GRADWATCH_LOG_FORMAT: text|json; GRADWATCH_LOG_LEVEL: DEBUG|INFO|WARNING|ERROR)", file=sys.stderr)
            return 2
        port_file = None if args.port_file is None else pathlib.Path(args.port_file)
        return serve(config, log_format=args.log_format, log_level=args.log_level, port_file=port_file)
    if args.command == "demo":
        if args.steps is not None and args.fault_step is not None and args.fault_step > args.steps:
            print(f"gradwatch demo: --fault-step {args.fault_step} is beyond --steps {args.steps}", file=sys.stderr)
            return 2
        from gradwatch.demo import list_faults, run_demo

        if args.list:
            return list_faults()
        return run_demo(fault=args.fault, steps=args.steps, fault_step=args.fault_step, seed=args.seed)
    if args.command in commands.COMMANDS:
        return commands.run(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
