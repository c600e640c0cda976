"""The query side of the JSON API: runs, ranks, a run's recent series, alerts and incidents, with pagination.

Routes (GET; list routes take `limit` (default 1000 runs/alerts, 100 incidents) and `offset`, and answer
`{"<items>": [...], "total": N, "next_offset": M | null}`):
  /api/v1/runs                       query `state=active|finished`, `job=NAME`, `run=ID` (that run only),
                                     `ranks=N` (list at most N ranks per run, 0..64; the overview page asks 0)
  /api/v1/runs/<run>                 {"run": view} (404 if unknown)
  /api/v1/runs/<run>/ranks           {"ranks": [rank view, ...]}, paginated over ranks (default 1000)
  /api/v1/runs/<run>/series          {"run", "ranks": [{"rank", "step", "loss", "grad_norm", "step_duration"}],
                                     "grad_norm_global": [[step, norm], ...]}; query `last=N` (default 256, at
                                     most the ring), `rank=R` (repeatable); paginated over ranks (default 64)
A run's view (in /api/v1/runs and /runs/<run>) lists its lowest RANKS_IN_VIEW (64) ranks, with `ranks_total` and
`ranks_connected` over all of them; /ranks and /series page through all of them, for a run restored after a
restart too (its saved ranks).
  /api/v1/alerts                     query `run`, `state=firing|resolved`, `detector`, `severity`
  /api/v1/incidents                  summaries, newest first; query `run`, `detector`, `severity`, `since=UNIX_TIME`
  /api/v1/incidents/<id>             {"incident": body}; an unambiguous id prefix (≥ 4 characters) works too; a
                                     prefix that matches several answers 409 {"error", "candidates": [ids]}
  /api/v1/incidents/<id>/window      the incident's window: a numpy .npz archive (see gradwatch.server.recorder)
Bad query values answer 400 {"error"} naming the parameter. Run ids are URL-path-encoded by clients.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np

from gradwatch.server.database import MAX_CANDIDATES, AmbiguousIncident
from gradwatch.server.limits import BAD_QUERY
from gradwatch.server.views import RANKS_IN_VIEW, finite_or_none, rank_views, saved_rank_views

if TYPE_CHECKING:
    from gradwatch.server.app import ServerApp

__all__ = ["QueryApi", "ambiguous_answer"]

PREFIX = "/api/v1/"
MAX_LIMIT = 10000
#: Largest offset accepted: beyond any list the server holds, and within SQLite's 64-bit integers.
MAX_OFFSET = 1 << 53
SERIES_DEFAULT = 256
#: Ranks per page of /runs/<run>/ranks and /runs/<run>/series (both take limit and offset over ranks).
RANKS_DEFAULT = 1000
SERIES_RANKS_DEFAULT = 64
SEVERITIES = ("info", "warning", "critical")

Response = tuple[int, str, bytes]


class BadQuery(ValueError):
    pass


class QueryApi:
    """`route(path, query)` answers the routes above (None for any other path)."""

    def __init__(self, app: ServerApp) -> None:
        self._app = app

    def route(self, path: str, query: dict[str, list[str]]) -> Response | None:
        if not path.startswith(PREFIX):
            return None
        parts = [unquote(p) for p in path[len(PREFIX) :].split("/")]
        try:
            if parts == ["runs"]:
                return _json(200, self._runs(query))
            if parts == ["alerts"]:
                return _json(200, self._alerts(query))
            if parts == ["incidents"]:
                return _json(200, self._incidents(query))
            if len(parts) in (2, 3) and parts[0] == "runs":
                return self._run(parts[1], parts[2] if len(parts) == 3 else None, query)
            if len(parts) in (2, 3) and parts[0] == "incidents":
                return self._incident(parts[1], parts[2] if len(parts) == 3 else None)
        except BadQuery as exc:
            self._app.http_rejections.count(BAD_QUERY)
            return _json(400, {"error": str(exc)})
        return None

    # ------------------------------------------------------------------ lists

    def _runs(self, query: dict[str, list[str]]) -> dict[str, Any]:
        state = _choice(query, "state", ("active", "finished"))
        job, run = _one(query, "job"), _one(query, "run")
        ranks = _int(query, "ranks", RANKS_IN_VIEW, 0, RANKS_IN_VIEW)
        runs = [
            r for r in self._app.runs(max_ranks=ranks)
            if state in (None, r["state"]) and job in (None, r["job_name"]) and run in (None, r["run"])
        ]  # fmt: skip
        return _page("runs", runs, query, 1000)

    def _alerts(self, query: dict[str, list[str]]) -> dict[str, Any]:
        state = _choice(query, "state", ("firing", "resolved"))
        severity = _choice(query, "severity", SEVERITIES)
        detector = _one(query, "detector")
        alerts = self._app.alerts(_one(query, "run"), state)
        alerts = [a for a in alerts if severity in (None, a["severity"]) and detector in (None, a["detector"])]
        return _page("alerts", alerts, query, 1000)

    def _incidents(self, query: dict[str, list[str]]) -> dict[str, Any]:
        limit, offset = _int(query, "limit", 100, 1, MAX_LIMIT), _int(query, "offset", 0, 0, MAX_OFFSET)
        since = _float(query, "since")
        items, total = self._app.database.incidents(
            run=_one(query, "run"),
            detector=_one(query, "detector"),
            severity=_choice(query, "severity", SEVERITIES),
            since=since,
            limit=limit,
            offset=offset,
        )
        return {"incidents": items, "total": total, "next_offset": offset + limit if offset + limit < total else None}

    # ------------------------------------------------------------------ one run / incident

    def _run(self, run_id: str, what: str | None, query: dict[str, list[str]]) -> Response | None:
        app = self._app
        if what is None:
            found = [r for r in app.runs() if r["run"] == run_id]
            return _json(200, {"run": found[0]}) if found else _json(404, {"error": f"no such run: {run_id!r}"})
        if what not in ("ranks", "series"):
            return None
        last = _int(query, "last", SERIES_DEFAULT, 1, 1 << 20)
        wanted = {_parse_int("rank", v) for v in query.get("rank", [])}
        with app.store.lock:
            run = app.store.get(run_id)
            if run is None:
                return _json(404, {"error": f"no such run: {run_id!r}"})
            held = run.ranks or run.restored_ranks  # restored: the saved ranks, until an agent is back
            numbers = [r for r in sorted(held) if not wanted or r in wanted]
            saved = saved_rank_views(run)
            if what == "ranks" and saved is not None:  # as saved before a restart, until an agent is back
                listed = [r for r in saved if not wanted or r["rank"] in wanted]
                return _json(200, {"run": run_id, **_page("ranks", listed, query, RANKS_DEFAULT)})
            page = _page("ranks", numbers, query, RANKS_DEFAULT if what == "ranks" else SERIES_RANKS_DEFAULT)
            ranks = [held[r] for r in page.pop("ranks")]
            if what == "ranks":
                return _json(200, {"run": run_id, "ranks": rank_views(run, ranks), **page})
            series = [(r.rank, r.ring.rows()[-last:]) for r in ranks]
            global_norms = list(run.global_grad_norms)[-last:]
        return _json(
            200,
            {
                "run": run_id,
                "ranks": [
                    {
                        "rank": rank,
                        "step": rows["step"].tolist(),
                        "loss": _floats(rows["loss"]),
                        "grad_norm": _floats(rows["grad_norm"]),
                        "step_duration": _floats(rows["step_duration"]),
                    }
                    for rank, rows in series
                ],
                "grad_norm_global": [[step, finite_or_none(norm)] for step, norm in global_norms],
                **page,
            },
        )

    def _incident(self, incident_id: str, what: str | None) -> Response | None:
        db = self._app.database
        if what not in (None, "window"):
            return None
        try:
            found: Any = db.incident(incident_id) if what is None else db.incident_window(incident_id)
        except AmbiguousIncident as ambiguous:
            return ambiguous_answer(incident_id, ambiguous.candidates)
        if found is None:
            return _json(404, {"error": f"no incident {incident_id!r}"})
        return _json(200, {"incident": found}) if what is None else (200, "application/octet-stream", found)


def ambiguous_answer(prefix: str, candidates: list[str], **extra: Any) -> Response:
    """409: an id prefix that matches several incidents, with (up to MAX_CANDIDATES of) their ids."""
    shown = sorted(candidates)[:MAX_CANDIDATES]
    more = " and more" if len(candidates) > MAX_CANDIDATES else ""
    error = f"incident id prefix {prefix!r} matches several incidents ({', '.join(shown)}{more}); give more of the id"
    return _json(409, {"error": error, "candidates": shown, **extra})


def _json(status: int, body: Any) -> Response:
    return status, "application/json", json.dumps(body, allow_nan=False).encode()


def _floats(values: np.ndarray) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values.tolist()]


def _page(key: str, items: list[Any], query: dict[str, list[str]], default: int) -> dict[str, Any]:
    limit, offset = _int(query, "limit", default, 1, MAX_LIMIT), _int(query, "offset", 0, 0, MAX_OFFSET)
    total = len(items)
    return {
        key: items[offset : offset + limit],
        "total": total,
        "next_offset": offset + limit if offset + limit < total else None,
    }


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _choice(query: dict[str, list[str]], name: str, allowed: tuple[str, ...]) -> str | None:
    value = _one(query, name)
    if value is not None and value not in allowed:
        raise BadQuery(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _parse_int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise BadQuery(f"{name} must be an integer, got {raw!r}") from None


def _int(query: dict[str, list[str]], name: str, default: int, low: int, high: int | None) -> int:
    raw = _one(query, name)
    if raw is None:
        return default
    value = _parse_int(name, raw)
    if value < low or (high is not None and value > high):
        raise BadQuery(f"{name} must be in {low}..{high if high is not None else '∞'}, got {value}")
    return value


def _float(query: dict[str, list[str]], name: str) -> float | None:
    raw = _one(query, name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadQuery(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise BadQuery(f"{name} must be finite, got {raw!r}")
    return value
