"""Client commands: `runs`, `alerts`, `incidents` (list | show ID), `report ID -o FILE`, `top`.

Each talks to a running server's JSON API (gradwatch.client); lists print a table, or JSON with `--json`.
Exit status: 0 on success, 1 when the server cannot be reached or says no, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from gradwatch.client import ApiClient, ApiError, api_token, quote, server_url, terminal_safe

__all__ = ["COMMANDS", "add_parsers", "format_table", "loss_text", "run"]

COMMANDS = ("runs", "alerts", "incidents", "report", "top")


def add_parsers(sub: Any) -> None:
    """Add the client commands to the CLI's subparsers."""

    def client(name: str, help_text: str, *, listing: bool = True) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        parser.add_argument(
            "--server",
            default=None,
            metavar="URL",
            help="the server's HTTP address (default: $GRADWATCH_HTTP, else http://localhost:9400)",
        )
        parser.add_argument(
            "--token",
            default=None,
            help="bearer token for a server with a tokens file (default: $GRADWATCH_API_TOKEN, else $GRADWATCH_TOKEN)",
        )
        if listing:
            parser.add_argument("action", nargs="?", choices=("list", "show"), default="list")
            parser.add_argument("id", nargs="?", default=None, help="what to show")
            parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
            parser.add_argument("--limit", type=int, default=None, help="at most this many")
        return parser

    runs = client("runs", "list runs, or show one (ranks, latest values)")
    runs.add_argument("--state", choices=("active", "finished"), default=None)
    runs.add_argument("--job", default=None, help="only runs of this job name")
    alerts = client("alerts", "list alerts (firing first), or show one")
    alerts.add_argument("--run", default=None)
    alerts.add_argument("--detector", default=None)
    alerts.add_argument("--state", choices=("firing", "resolved"), default=None)
    alerts.add_argument("--severity", choices=("info", "warning", "critical"), default=None)
    incidents = client("incidents", "list incidents (newest first), or show one")
    incidents.add_argument("--run", default=None)
    incidents.add_argument("--detector", default=None)
    incidents.add_argument("--severity", choices=("info", "warning", "critical"), default=None)
    report = client("report", "write an incident's self-contained HTML report", listing=False)
    report.add_argument("id", help="incident id (or an unambiguous prefix)")
    report.add_argument("-o", "--output", default=None, metavar="FILE", help="default: incident-<id>.html")
    top = client("top", "live view of runs and ranks (q or Ctrl-C quits)", listing=False)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--run", default=None, help="only this run")
    top.add_argument("--once", action="store_true", help="print one frame and exit (no screen control)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    try:
        api = ApiClient(server_url(args.server), token=api_token(args.token))
    except ValueError as exc:
        print(f"gradwatch {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "top":
            from gradwatch.top import run_top

            return run_top(api, interval_s=args.interval, run=args.run, once=args.once, out=out)
        if args.command == "report":
            from gradwatch.incident_report import write_report

            path = write_report(api, args.id, args.output)
            print(path, file=out)
            return 0
        if args.action == "show" and args.id is None:
            print(f"gradwatch {args.command} show: which one? give an ID", file=sys.stderr)
            return 2
        show = {"runs": _show_run, "alerts": _show_alert, "incidents": _show_incident}[args.command]
        listing = {"runs": _list_runs, "alerts": _list_alerts, "incidents": _list_incidents}[args.command]
        return show(api, args, out) if args.action == "show" else listing(api, args, out)
    except ApiError as exc:
        print(f"gradwatch {args.command}: {exc}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------- lists


def _list_runs(api: ApiClient, args: argparse.Namespace, out: TextIO) -> int:
    runs = _fetch(api, "runs", "runs", args, state=args.state, job=args.job)
    if args.json:
        return _dump(runs, out)
    rows = [
        [
            r["run"],
            r["job_name"],
            r["state"],
            f"{len(r['ranks'])}/{r['world_size']}",
            _num(r["step"]),
            loss_text(r),
            _num(r["grad_norm_max"]),
            ",".join(r["firing"]) or "-",
            _ago(r["last_seen"]),
        ]
        for r in runs
    ]
    out.write(format_table(["RUN", "JOB", "STATE", "RANKS", "STEP", "LOSS", "GRAD_NORM", "FIRING", "SEEN"], rows))
    return 0


def _list_alerts(api: ApiClient, args: argparse.Namespace, out: TextIO) -> int:
    alerts = _fetch(
        api, "alerts", "alerts", args, run=args.run, detector=args.detector, state=args.state, severity=args.severity
    )
    if args.json:
        return _dump(alerts, out)
    rows = [
        [
            a["id"],
            a["run"],
            a["detector"],
            a["severity"],
            a["state"],
            _num(a["step"]),
            a["layer"] or "-",
            ",".join(map(str, a["ranks"])),
            _ago(a["started_at"]),
            _cut(a["summary"], 60),
        ]
        for a in alerts
    ]
    out.write(
        format_table(
            ["ID", "RUN", "DETECTOR", "SEVERITY", "STATE", "STEP", "LAYER", "RANKS", "STARTED", "SUMMARY"], rows
        )
    )
    return 0


def _list_incidents(api: ApiClient, args: argparse.Namespace, out: TextIO) -> int:
    items = _fetch(api, "incidents", "incidents", args, run=args.run, detector=args.detector, severity=args.severity)
    if args.json:
        return _dump(items, out)
    rows = [
        [
            i["id"],
            i["run"],
            i["detector"],
            i["severity"],
            _num(i["step"]),
            i["layer"] or "-",
            ",".join(map(str, i["ranks"])),
            i["status"],
            _time(i["opened_at"]),
            _cut(i["summary"], 50),
        ]
        for i in items
    ]
    out.write(
        format_table(
            ["ID", "RUN", "DETECTOR", "SEVERITY", "STEP", "LAYER", "RANKS", "STATUS", "OPENED", "SUMMARY"], rows
        )
    )
    return 0


def _fetch(api: ApiClient, path: str, key: str, args: argparse.Namespace, **query: Any) -> list[dict[str, Any]]:
    if args.limit is not None:
        return list(api.get(path, limit=args.limit, **query)[key])
    return api.get_all(path, key, **query)


# ---------------------------------------------------------------------- one item


def _show_run(api: ApiClient, args: argparse.Namespace, out: TextIO) -> int:
    run = api.get(f"runs/{quote(args.id)}")["run"]
    if args.json:
        return _dump(run, out)
    fields = [
        ("run", run["run"]),
        ("job", run["job_name"]),
        ("state", run["state"]),
        ("step", _num(run["step"])),
        ("loss", loss_text(run, long=True)),
        ("grad norm (global)", _num(run["grad_norm_global"])),
        ("firing", ", ".join(run["firing"]) or "-"),
        ("first seen", _time(run["first_seen"])),
        ("last seen", _time(run["last_seen"])),
    ]
    out.write("".join(f"{k + ':':<20} {terminal_safe(v)}\n" for k, v in fields))
    rows = [
        [
            r["rank"],
            r["host"],
            r["pid"],
            _num(r["step"]),
            loss_text(r),
            _num(r["grad_norm"]),
            "yes" if r["connected"] else "no",
            r["reports"],
        ]
        for r in run["ranks"]
    ]
    if rows:
        out.write(
            "\n" + format_table(["RANK", "HOST", "PID", "STEP", "LOSS", "GRAD_NORM", "CONNECTED", "REPORTS"], rows)
        )
    more = run.get("ranks_total", len(rows)) - len(rows)
    if more > 0:
        out.write(f"… and {more} more ranks (--json for the API's pages: /api/v1/runs/<run>/ranks)\n")
    return 0


def _show_alert(api: ApiClient, args: argparse.Namespace, out: TextIO) -> int:
    found = [a for a in api.get_all("alerts", "alerts") if a["id"] == args.id or a["id"].startswith(args.id)]
    if not found:
        raise ApiError(f"no alert {args.id!r}")
    if args.json:
        return _dump(found[0], out)
    alert = found[0]
    for key in (
        "id",
        "run",
        "detector",
        "severity",
        "state",
        "step",
        "last_step",
        "layer",
        "ranks",
        "summary",
        "runbook",
    ):
        out.write(f"{key + ':':<12} {terminal_safe(alert[key])}\n")
    out.write(f"{'started:':<12} {_time(alert['started_at'])}\n")
    if alert["resolved_at"] is not None:
        out.write(f"{'resolved:':<12} {_time(alert['resolved_at'])}\n")
    return 0


def _show_incident(api: ApiClient, args: argparse.Namespace, out: TextIO) -> int:
    incident = api.get(f"incidents/{quote(args.id)}")["incident"]
    if args.json:
        return _dump(incident, out)
    steps = incident["window"]["steps"]
    fields = [
        ("incident", incident["id"]),
        ("run", f"{incident['run']} (job {incident['job_name'] or '-'})"),
        ("alert", f"{incident['detector']} ({incident['severity']}) at step {incident['step']}"),
        ("layer", incident["layer"] or "-"),
        ("ranks firing", ", ".join(map(str, incident["ranks_firing"]))),
        ("summary", incident["summary"]),
        ("status", incident["status"]),
        ("opened", _time(incident["opened_at"])),
        ("window", f"steps {steps[0]}..{steps[1]}" if steps else "-"),
        ("runbook", incident["runbook_url"]),
    ]
    out.write("".join(f"{k + ':':<14} {v}\n" for k, v in fields))
    out.write("\nprovenance (first sign first):\n")
    for event in incident["provenance"]:
        out.write(f"  step {event['step']:>8}  rank {event['rank']!s:>4}  {event['what']}\n")
    for autopsy in incident.get("autopsy") or ():
        out.write(f"\nautopsy: step {autopsy['step']}, rank {autopsy['rank']}, first layer {autopsy['layer'] or '-'}\n")
        ids = autopsy["batch_ids"]
        out.write(f"  batch ids ({len(ids)}): {', '.join(ids) if ids else '-'}\n")
        if autopsy["top_samples"]:
            out.write("  top samples by loss:\n")
        for sample in autopsy["top_samples"]:
            loss = "non-finite" if sample["loss"] is None else _num(sample["loss"])
            out.write(f"    {sample['id']:<24} loss {loss:<12} index {sample['index']}\n")
    out.write(f"\nreport: gradwatch report {incident['id']} -o incident.html\n")
    return 0


# ---------------------------------------------------------------------- formatting


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; one header line; "" cells for None."""
    cells = [[str(h) for h in headers], *[["" if c is None else terminal_safe(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in cells)


def _dump(value: Any, out: TextIO) -> int:
    json.dump(value, out, indent=2)
    out.write("\n")
    return 0


def _num(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def loss_text(view: dict[str, Any], *, long: bool = False) -> str:
    """A run's or rank's loss from its API view: the value, or its non-finite state and when it was last finite
    ("NaN (finite at step 200)"; long: with the last finite value too)."""
    state = view.get("loss_non_finite")
    if state is None:
        return _num(view.get("loss"))
    step = view.get("last_finite_loss_step")
    if step is None:
        return f"{state} (never finite)"
    last = f" {_num(view.get('last_finite_loss'))}" if long else ""
    return f"{state} (last finite{last} at step {step})"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    seconds = max(0.0, datetime.datetime.now(datetime.UTC).timestamp() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"
