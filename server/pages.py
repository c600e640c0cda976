"""The server's HTML pages: what the CLI prints, one click from an alert.

Routes (GET, same shape as the query API: (path, query) -> (status, content type, body) or None):
  /                                  overview: runs (state, step, loss or its non-finite state, firing),
                                     firing alerts (each linked to its incident), recent incidents; query
                                     `run=ID` narrows it to one run
  /incidents/<id>                    the incident's HTML report, rendered by the same code as `gradwatch report`
                                     (gradwatch.incident_report); an unambiguous id prefix works too, one
                                     that matches several incidents (on any replica) is a 409 page linking each
  /incidents/latest?run=R&detector=D the latest incident of that run and detector (the link Grafana's and
                                     Prometheus' alerts carry: they know the labels, not the incident id)
The pages show what the JSON API answers (gradwatch.server.query_api), read in-process. With `cluster.peers`
they read through the fan-out (gradwatch.server.fanout), so any replica's pages show every replica's runs,
alerts and incidents and every link on them works from the replica that served them; replicas that did not
answer are named on the page (their runs are missing from it), and a page waits for peers at most the
fan-out's deadline.
With tokens on, the pages take a bearer token or a login session (gradwatch.server.sessions).
Pages are self-contained (inline CSS, no script; the HTTP layer adds a Content-Security-Policy that forbids
scripts), every value from runs and agents is HTML-escaped, and links are relative so the pages work behind
any external URL or path prefix. An unknown incident is a 404 page that links to the overview.
"""

from __future__ import annotations

import datetime
import html
import json
import time
from collections.abc import Callable, Sequence
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
#: Runs and firing alerts the overview asks for (the query API's largest page), to pick RUNS_SHOWN from.
ASKED = "10000"

Response = tuple[int, str, bytes]
Route = Callable[[str, dict[str, list[str]]], Response | None]
Question = tuple[str, dict[str, list[str]]]


def incident_path(incident_id: str) -> str:
    """The path of an incident's page (what alert links point at, after the server's external URL)."""
    return f"/incidents/{quote(incident_id, safe='')}"


def latest_incident_path(run: str, detector: str) -> str:
    return "/incidents/latest?" + urlencode({"run": run, "detector": detector})


class Pages:
    """`route(path, query)` answers the routes above (None for any other path); `query` is this replica's query
    API route (gradwatch.server.query_api.QueryApi.route)."""

    def __init__(self, app: ServerApp, query: Route) -> None:
        self._app = app
        self._query = query

    def route(self, path: str, query: dict[str, list[str]]) -> Response | None:
        if path == "/":
            return 200, HTML, self._overview(_one(query, "run")).encode()
        if path.startswith("/incidents/") and path.count("/") == 2:
            wanted = unquote(path.removeprefix("/incidents/"))
            if wanted == "latest":
                return self._latest(_one(query, "run"), _one(query, "detector"))
            return self._incident(wanted)
        return None

    # ------------------------------------------------------------------ reading (the API's answers)

    def _lists(self, questions: Sequence[Question]) -> list[dict[str, Any]]:
        """The list routes' pages for `questions`: every replica's through the fan-out, else this one's."""
        fanout = self._app.fanout
        if fanout is not None:
            answers = fanout.lists(questions)
        else:
            answers = [(status, json.loads(body)) for status, _, body in map(self._local, questions)]
        for status, page in answers:
            if status != 200:  # the pages ask only what the API takes
                raise RuntimeError(f"the query API refused the page's question: {page}")
        return [page for _, page in answers]

    def _first(self, path: str) -> tuple[Response, list[str]]:
        """The API's answer for one incident (or its window) from whichever replica holds it, and the peers that
        did not answer."""
        fanout = self._app.fanout
        answer, unreachable = fanout.first(path, {}) if fanout is not None else (self._local((path, {})), [])
        assert answer is not None  # the query API answers every incident path
        return answer, unreachable

    def _local(self, question: Question) -> Response:
        answer = self._query(*question)
        assert answer is not None  # the query API answers every path the pages ask
        return answer

    # ------------------------------------------------------------------ incident

    def _incident(self, wanted: str) -> Response:
        (status, _, body), unreachable = self._first(f"/api/v1/incidents/{quote(wanted, safe='')}")
        if status == 409:  # a prefix of several incidents: each a link to its whole id
            return 409, HTML, _choices(wanted, json.loads(body).get("candidates", [])).encode()
        incident = json.loads(body).get("incident") if status == 200 else None
        window = None
        if isinstance(incident, dict):
            (status, _, window), more = self._first(f"/api/v1/incidents/{quote(incident['id'], safe='')}/window")
            unreachable = sorted({*unreachable, *more})
            if status != 200:
                window = None
        if not isinstance(incident, dict) or window is None:
            where = _where(unreachable, self._app.fanout is not None)
            return 404, HTML, _missing(f"No incident {wanted!r}{where}.").encode()
        return 200, HTML, render_report(incident, window, home="../").encode()

    def _latest(self, run: str | None, detector: str | None) -> Response:
        if not run or not detector:
            return 400, HTML, _missing("/incidents/latest needs ?run=RUN&detector=DETECTOR.").encode()
        (found,) = self._lists([("/api/v1/incidents", {"run": [run], "detector": [detector], "limit": ["1"]})])
        if not found["incidents"]:
            where = _where(found.get("unreachable", []), self._app.fanout is not None)
            return 404, HTML, _missing(f"No incident of {detector} on run {run!r}{where}.").encode()
        return self._incident(found["incidents"][0]["id"])

    # ------------------------------------------------------------------ overview

    def _overview(self, only_run: str | None) -> str:
        narrow = {"run": [only_run]} if only_run else {}
        runs, firing, incidents = self._lists([
            ("/api/v1/runs", {**narrow, "ranks": ["0"], "limit": [ASKED]}),
            ("/api/v1/alerts", {**narrow, "state": ["firing"], "limit": [ASKED]}),
            ("/api/v1/incidents", {**narrow, "limit": [str(INCIDENTS_SHOWN)]}),
        ])  # fmt: skip
        listed = [r for r in runs["runs"] if only_run in (None, r["run"])]  # a peer may predate `run=`
        listed.sort(key=lambda r: (not r["firing"], -(r["last_seen"] or 0)))
        unreachable = sorted({p for page in (runs, firing, incidents) for p in page.get("unreachable", [])})
        replicas = f" · {runs['replicas']} replicas answered" if "replicas" in runs else ""
        e = html.escape
        title = "gradwatch" + (f": run {only_run}" if only_run else "")
        parts = [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta http-equiv="refresh" content="15">',
            f"<title>{e(title)}</title><style>{PAGE_CSS}</style></head><body><main>",
            f'<h1>{e(title)}</h1><p class="muted">{runs["total"]} runs, {firing["total"]} alerts firing, '
            f"{incidents['total']} incidents recorded{replicas} · {_time(time.time())} · refreshes every 15 s"
            + (' · <a href="./">all runs</a>' if only_run else "")
            + "</p>",
            _unreachable(unreachable),
            _section("firing", "Firing alerts", _firing_table(firing["alerts"])),
            _section("runs", "Runs", _runs_note(len(listed), runs["total"]) + _runs_table(listed[:RUNS_SHOWN])),
            _section("incidents", "Recent incidents", _incidents_table(incidents["incidents"])),
            '<p class="muted">JSON: <a href="api/v1/runs">runs</a> · <a href="api/v1/alerts">alerts</a> · '
            '<a href="api/v1/incidents">incidents</a>'
            + (
                ' (with an <code>Authorization: Bearer</code> token) · <a href="logout">log out</a>'
                if self._app.page_sessions is not None
                else ""
            )
            + "</p>",
            "</main></body></html>",
        ]
        return "\n".join(part for part in parts if part)


def _unreachable(peers: list[str]) -> str:
    if not peers:
        return ""
    named = ", ".join(f"<code>{html.escape(p)}</code>" for p in peers)
    return _section("unreachable", "Replicas not answering",
                    f"<p>{named}: their runs, alerts and incidents are missing from this page.</p>")  # fmt: skip


def _runs_note(read: int, total: int) -> str:
    """Says what the runs table leaves out: runs beyond RUNS_SHOWN, and runs a replica holding more than the
    overview asks for did not send (it sends its least recently seen first)."""
    notes = [f"{RUNS_SHOWN} of {read} shown, firing first, then most recently seen"] if read > RUNS_SHOWN else []
    if total > read:
        notes.append(f"{total - read} more not read (a replica holds more than {ASKED}; "
                     "<code>gradwatch runs</code> lists every one)")  # fmt: skip
    return f'<p class="muted">{"; ".join(notes)}.</p>' if notes else ""


def _where(unreachable: list[str], fanned: bool) -> str:
    """Where a page looked for what it did not find."""
    if unreachable:
        return f" on the replicas that answered (not answering: {', '.join(unreachable)})"
    return " on any replica" if fanned else " on this server"


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
            f"{_connected(r)}/{r['world_size']}",
            "-" if r["step"] is None else str(r["step"]),
            e(loss_text(r, long=True)),
            e(", ".join(r["firing"]) or "-"),
        ]
        for r in runs
    ]
    return _table(["Run", "Job", "State", "Connected", "Step", "Loss", "Firing"], rows, "No runs yet.")


def _connected(run: dict[str, Any]) -> int:
    """The run's connected ranks (a peer that predates `ranks_connected` lists its ranks instead)."""
    if "ranks_connected" in run:
        return int(run["ranks_connected"])
    return sum(1 for rank in run["ranks"] if rank.get("connected"))


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


def _choices(prefix: str, candidates: list[str]) -> str:
    links = "".join(f'<li><a href="{quote(c, safe="")}">{html.escape(c)}</a></li>' for c in candidates)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>gradwatch: which incident?</title>'
        f"<style>{PAGE_CSS}</style></head><body><main><h1>Which incident?</h1><p>"
        f"{html.escape(repr(prefix))} is the start of several incident ids:</p><ul>{links}</ul>"
        '<p><a href="../">Overview</a></p></main></body></html>'
    )


def _time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None
