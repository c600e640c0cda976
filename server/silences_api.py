"""The silences API (/api/v1/silences) and, with `cluster.peers`, the same silences on every replica.

A silence is asked of whichever replica the Service picks, but it must mute the run wherever the run lives (and
wherever it moves), so it is kept by every replica:

* POST creates the silence here (SilenceBook.add) and sends the very record (same id, run, detector, times,
  texts) to every peer with `local=1` (SilenceBook.adopt), in parallel, under the fan-out's deadline, with the
  caller's own Authorization header (the peers check the caller's right to silence, as this replica did). The
  answer (201) is the silence with `replicas` (how many hold it) and `unreachable` (peers that did not take it:
  down, too slow, refusing the token); a replica that was unreachable does not have it.
* DELETE /api/v1/silences/<id> expires it here and on every peer the same way; 200 if any replica held it
  active, else 404; with `unreachable`.
* GET lists every replica's silences, each once (by id; an active copy wins over an expired one), with
  `replicas` and `unreachable`.
* `local=1` (what the peers are sent) acts on this replica only; a POST with `local=1` takes a whole record.
* Resync (`sync`, called at start-up and every SYNC_INTERVAL_S by the app's "gradwatch-silence-sync" thread):
  this replica reads every peer's own silences (GET with `local=1`, the cluster token) and reconciles its book
  with them (SilenceBook.reconcile): a replica that was down or unreachable when a silence was created or
  expired, or that starts empty, catches up within one interval; an early expiry wins over a stale copy.
Without peers every request acts on this replica only, as before.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

from gradwatch.server.fanout import Answer, FanOut
from gradwatch.server.limits import BAD_BODY, BadRequest, HttpRejections, parse_json_body
from gradwatch.server.silences import SilenceBook

__all__ = ["SILENCES", "SYNC_INTERVAL_S", "SilenceSync", "SilencesApi"]

log = logging.getLogger(__name__)

SILENCES = "/api/v1/silences"
#: Seconds between two resyncs with the peers (one GET per peer each).
SYNC_INTERVAL_S = 15.0
_FIELDS = frozenset({"run", "detector", "duration_s", "comment", "created_by"})
_RECORD_FIELDS = frozenset({"id", "run", "detector", "comment", "created_by", "created_at", "ends_at"})
Reply = tuple[int, dict[str, Any]]


class SilencesApi:
    """The silence routes of one replica (see the module docstring); called on the HTTP view threads."""

    def __init__(self, book: SilenceBook, fanout: FanOut | None = None,
                 rejections: HttpRejections | None = None) -> None:  # fmt: skip
        self._book = book
        self._fanout = fanout
        self._rejections = rejections

    def list(self, local: bool) -> Reply:
        mine = self._book.view()
        if self._fanout is None or local:
            return 200, {"silences": mine}
        answers, unreachable = self._fanout.broadcast("GET", SILENCES, None, None)
        merged: dict[str, dict[str, Any]] = {}
        for silence in [*mine, *(s for _, (_, body) in answers for s in _silences(body))]:
            held = merged.get(silence["id"])
            if held is None or (held.get("state") != "active" and silence.get("state") == "active"):
                merged[silence["id"]] = silence
        return 200, {"silences": list(merged.values()), "replicas": 1 + len(answers), "unreachable": unreachable}

    def add(self, raw: bytes, local: bool, authorization: str | None) -> Reply:
        try:
            body = parse_json_body(raw)
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            allowed = _RECORD_FIELDS if local and "id" in body else _FIELDS
            unknown = set(body) - allowed
            if unknown:
                raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
            if allowed is _RECORD_FIELDS:  # a peer's silence, kept as it is
                return 201, {"silence": self._book.adopt(body)}
            silence = self._book.add(
                body.get("run"),  # type: ignore[arg-type]  # checked by add()
                body.get("detector"),
                body.get("duration_s"),  # type: ignore[arg-type]
                body.get("comment", ""),
                body.get("created_by", ""),
            )
        except ValueError as exc:
            if self._rejections is not None:
                self._rejections.count(exc.reason if isinstance(exc, BadRequest) else BAD_BODY)
            return 400, {"error": str(exc)}
        if self._fanout is None or local:
            return 201, {"silence": silence}
        record = {key: silence[key] for key in _RECORD_FIELDS}
        answers, unreachable = self._fanout.broadcast("POST", SILENCES, json.dumps(record).encode(), authorization)
        unreachable += _refusals(answers, 201)
        took = sum(status == 201 for _, (status, _) in answers)
        return 201, {"silence": silence, "replicas": 1 + took, "unreachable": unreachable}

    def expire(self, silence_id: str, local: bool, authorization: str | None) -> Reply:
        mine = self._book.expire(silence_id)
        if self._fanout is None or local:
            return (200, {"silence": mine}) if mine is not None else (404, {"error": "no such active silence"})
        path = f"{SILENCES}/{silence_id}"
        answers, unreachable = self._fanout.broadcast("DELETE", path, None, authorization)
        unreachable += _refusals(answers, 200, 404)
        theirs = [body["silence"] for _, (status, body) in answers
                  if status == 200 and isinstance(body.get("silence"), dict)]  # fmt: skip
        found = mine if mine is not None else (theirs[0] if theirs else None)
        if found is None:
            return 404, {"error": "no such active silence", "unreachable": unreachable}
        return 200, {"silence": found, "replicas": (mine is not None) + len(theirs), "unreachable": unreachable}

    def sync(self) -> tuple[dict[str, int], Sequence[str]]:
        """Reconcile this replica's silences with every peer's own (see the module docstring): what changed here
        and the peers that did not answer."""
        if self._fanout is None:
            return {"adopted": 0, "expired": 0, "refused": 0}, []
        answers, unreachable = self._fanout.broadcast("GET", SILENCES, None, None)
        unreachable += _refusals(answers, 200)
        records = [s for _, (status, body) in answers if status == 200 for s in _silences(body)]
        return self._book.reconcile(records), unreachable


class SilenceSync:
    """The "gradwatch-silence-sync" thread: `SilencesApi.sync` at start and every `interval_s` until `stop`."""

    def __init__(self, api: SilencesApi, interval_s: float = SYNC_INTERVAL_S) -> None:
        self._api = api
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradwatch-silence-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                changed, unreachable = self._api.sync()
                if any(changed.values()):
                    log.info("silences resynced with the peers: %s (unreachable: %s)", changed, unreachable or "none")
            except Exception:  # the next round retries; a resync must never end the thread
                log.exception("resyncing the silences failed")
            self._stopped.wait(self._interval_s)


def _silences(body: dict[str, Any]) -> list[dict[str, Any]]:
    items = body.get("silences")
    return [s for s in items if isinstance(s, dict) and isinstance(s.get("id"), str)] if isinstance(items, list) else []


def _refusals(answers: Sequence[tuple[str, Answer]], *expected: int) -> list[str]:
    """Peers whose answer was not one of `expected` (a 400: the peer refused the record)."""
    return [peer for peer, (status, _) in answers if status not in expected]
