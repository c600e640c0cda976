"""The server's HTML pages: what the CLI prints, one click from an alert.

Routes (GET, same shape as the query API: (path, query) -> (status, content type, body) or None):
  /                                  overview: runs (state, step, loss or its non-finite state, firing),
                                     firing alerts (each linked to its incident), recent incidents; query
                                     `run=ID` narrows it to one run
  /incidents/<id>                    the incident's HTML report, rendered by the same code as `gradwatch report`
                                     (gradwatch.incident_report); an unambiguous id prefix works too
  /incidents/latest?run=R&detector=D the latest incident of that run and detector (the link Grafana's and
                                     Prometheus' alerts carry: they know the labels, not the incident id)
With tokens on, the pages take a bearer token or a login session (gradwatch.server.sessions).
Pages are self-contained (inline CSS, no script; the HTTP layer adds a Content-Security-Policy that forbids
scripts), every value from runs and agents is HTML-escaped, and links are relative so the pages work behind
any external URL or path prefix. An unknown incident is a 404 page that links to the overview.
"""

from __future__ import annotations

import datetime
import html
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode

from gradwatch.commands import loss_text
from gradwatch.incident_report import PAGE_CSS, render_report
from gradwatch.server.recorder import RECORDED_SEVERITIES, incident_id

if TYPE_CHECKING:
    from gradwatch.server.app import ServerApp

__all__ = ["INCIDENTS_SHOWN", "Pages", "incident_path", "latest_incident_path"]

HTML = "text/html; charset=utf-8"
#: Recent incidents on the overview.
INCIDENTS_SHOWN = 50
#: Runs on the overview (firing first, then most recently seen).
RUNS_SHOWN = 200

Response = tuple[int, str, bytes]


def incident_path(incident_id: str) -> str:
    """The path of an incident's page (what alert links point at, after the server's external URL)."""
    return f"/incidents/{quote(incident_id, safe='')}"


def latest_incident_path(run: str, detector: str) -> str:
    return "/incidents/latest?" + urlencode({"run": run, "detector": detector})


class Pages:
    """`route(path, query)` answers the routes above (None for any other path)."""

    def __init__(self, app: ServerApp) -> None:
        self._app = app

    def route(self, path: str, query: dict[str, list[str]]) -> Response | None:
        if path == "/":
            return 200, HTML, self._overview(_one(query, "run")).encode()
        if path.startswith("/incidents/") and path.count("/") == 2:
            wanted = unquote(path.removeprefix("/incidents/"))
            if wanted == "latest":
                return self._latest(_one(query, "run"), _one(query, "detector"))
            return self._incident(wanted)
        return None

    # ------------------------------------------------------------------ incident

    def _incident(self, incident_id: str) -> Response:
        db = self._app.database
        body = db.incident(incident_id)
        window = db.incident_window(body["id"]) if body is not None else None
        if body is None or window is None:
            return 404, HTML, _missing(f"No incident {incident_id!r} on this server.").encode()
        return 200, HTML, render_report(body, window, home="../").encode()

    def _latest(self, run: str | None, detector: str | None) -> Response:
        if not run or not detector:
            return 400, HTML, _missing("/incidents/latest needs ?run=RUN&detector=DETECTOR.").encode()
        found, _ = self._app.database.incidents(run=run, detector=detector, limit=1)
        if not found:
            return 404, HTML, _missing(f"No incident of {detector} on run {run!r} on this server.").encode()
        return self._incident(found[0]["id"])

    # ------------------------------------------------------------------ overview

    def _overview(self, only_run: str | None) -> str:
        app = self._app
        runs = [r for r in app.runs() if only_run in (None, r["run"])]
        runs.sort(key=lambda r: (not r["firing"], -(r["last_seen"] or 0)))
        firing = app.alerts(only_run, "firing")
        incidents, total = app.database.incidents(run=only_run, limit=INCIDENTS_SHOWN)
        e = html.escape
        title = "gradwatch" + (f": run {only_run}" if only_run else "")
        parts = [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta http-equiv="refresh" content="15">',
            f"<title>{e(title)}</title><style>{PAGE_CSS}</style></head><body><main>",
            f'<h1>{e(title)}</h1><p class="muted">{len(runs)} runs, {len(firing)} alerts firing, '
            f"{total} incidents recorded · {_time(time.time())} · refreshes every 15 s"
            + (' · <a href="./">all runs</a>' if only_run else "")
            + "</p>",
            _section("firing", "Firing alerts", _firing_table(firing)),
            _section("runs", "Runs", _runs_table(runs[:RUNS_SHOWN])),
            _section("incidents", "Recent incidents", _incidents_table(incidents)),
            '<p class="muted">JSON: <a href="api/v1/runs">runs</a> · <a href="api/v1/alerts">alerts</a> · '
            '<a href="api/v1/incidents">incidents</a>'
            + (
                ' (with an <code>Authorization: Bearer</code> token) · <a href="logout">log out</a>'
                if app.page_sessions is not None
                else ""
            )
            + "</p>",
            "</main></body></html>",
        ]
        return "\n".join(parts)


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section class="card" id="{anchor}"><h2>{title}</h2>{body}</section>'


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{empty}</p>'
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _run_link(run: str) -> str:
    return f'<a href="?{html.escape(urlencode({"run": run}))}"><code>{html.escape(run)}</code></a>'


def _firing_table(alerts: list[dict[str, Any]]) -> str:
    e = html.escape
    rows = [
        [
            f'<span class="badge {e(a["severity"])}">{e(a["severity"])}</span>',
            e(a["detector"]),
            _run_link(a["run"]),
            str(a["step"]),
            e(a["layer"] or "-"),
            _time(a["started_at"]),
            e(a["summary"]),
            f'<a href="{e(incident_path(incident_id(a["id"], a["started_at"])).lstrip("/"))}">incident</a>'
            if a["severity"] in RECORDED_SEVERITIES
            else "-",
        ]
        for a in alerts
    ]
    return _table(["Severity", "Detector", "Run", "Step", "Layer", "Since", "Summary", ""], rows, "Nothing firing.")


def _runs_table(runs: list[dict[str, Any]]) -> str:
    e = html.escape
    rows = [
        [
            _run_link(r["run"]),
            e(r["job_name"] or "-"),
            e(r["state"]),
            f"{sum(1 for k in r['ranks'] if k.get('connected'))}/{r['world_size']}",
            "-" if r["step"] is None else str(r["step"]),
            e(loss_text(r, long=True)),
            e(", ".join(r["firing"]) or "-"),
        ]
        for r in runs
    ]
    return _table(["Run", "Job", "State", "Connected", "Step", "Loss", "Firing"], rows, "No runs yet.")


def _incidents_table(incidents: list[dict[str, Any]]) -> str:
    e = html.escape
    rows = [
        [
            f'<a href="{e(incident_path(i["id"]).lstrip("/"))}"><code>{e(i["id"])}</code></a>',
            _run_link(i["run"]),
            e(i["detector"]),
            f'<span class="badge {e(i["severity"])}">{e(i["severity"])}</span>',
            str(i["step"]),
            e(i["status"]),
            _time(i["opened_at"]),
            e(i["summary"]),
        ]
        for i in incidents
    ]
    headers = ["Incident", "Run", "Detector", "Severity", "Step", "Status", "Opened", "Summary"]
    return _table(headers, rows, "No incidents recorded.")


def _missing(message: str) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>gradwatch: not found</title>'
        f"<style>{PAGE_CSS}</style></head><body><main><h1>Not found</h1><p>{html.escape(message)}</p>"
        '<p><a href="../">Overview</a></p></main></body></html>'
    )


def _time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None
