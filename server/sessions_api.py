"""The pages' login sessions across replicas (`cluster.peers`): what one replica asks the others.

A person signed in through one replica reaches another behind the same Service with the same cookie; that
replica does not hold the session, so it asks its peers (server/sessions.py, "Several replicas"):

* GET /api/v1/sessions/<digest>?local=1 — 200 {"grant", "expires_at"} when this replica opened the session whose
  id has that SHA-256 (hex) and it is still valid here, else 404. A digest opens nothing: only the cookie does.
* DELETE /api/v1/sessions/<digest>?local=1 — ends it here, held or borrowed: 200 if there was one, else 404.
Both are API routes (a bearer token with `api: true`: the peers send the cluster token), answered from this
replica's own sessions only; `FanOutPeers` asks them of every peer through the fan-out, under its deadline.
"""

from __future__ import annotations

import json
from typing import Any

from gradwatch.server.fanout import FanOut
from gradwatch.server.sessions import PageSessions

__all__ = ["SESSIONS", "FanOutPeers", "SessionsApi"]

SESSIONS = "/api/v1/sessions"
Response = tuple[int, str, bytes]


class SessionsApi:
    """The session routes of one replica (see the module docstring)."""

    def __init__(self, sessions: PageSessions) -> None:
        self._sessions = sessions

    def route(self, path: str, query: dict[str, list[str]]) -> Response | None:
        """GET: the session's grant and expiry, when this replica holds it."""
        if not path.startswith(SESSIONS + "/"):
            return None
        found = self._sessions.lookup(path[len(SESSIONS) + 1 :])
        if found is None:
            return _json(404, {"error": "no such session here"})
        return _json(200, {"grant": found[0], "expires_at": found[1]})

    def delete(self, digest: str) -> Response:
        if self._sessions.drop(digest):
            return _json(200, {"ended": True})
        return _json(404, {"error": "no such session here"})


class FanOutPeers:
    """`SessionPeers` over the fan-out: every peer asked at once, with the cluster token."""

    def __init__(self, fanout: FanOut) -> None:
        self._fanout = fanout

    def ask(self, digest: str) -> tuple[str, float] | None:
        answers, _ = self._fanout.broadcast("GET", f"{SESSIONS}/{digest}", None, None)
        for _, (status, body) in answers:
            grant, expires_at = body.get("grant"), body.get("expires_at")
            if status == 200 and isinstance(grant, str) and isinstance(expires_at, int | float):
                return grant, float(expires_at)
        return None

    def revoke(self, digest: str) -> None:
        self._fanout.broadcast("DELETE", f"{SESSIONS}/{digest}", None, None)


def _json(status: int, body: dict[str, Any]) -> Response:
    return status, "application/json", json.dumps(body).encode()
