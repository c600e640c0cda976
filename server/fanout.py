"""One view over every aggregator replica: the read API fanned out over the headless Service (`cluster.peers`).

Why a fan-out rather than a shared PostgreSQL (docs/deployment.md, "One view over all replicas"): replicas keep
sharing nothing (no database server to run, secure, back up and upgrade beside them, no write path that can stall
ingest on a remote commit), Kubernetes' headless Service already lists the ready replicas, and each StatefulSet
replica's volume outlives its pod, so a restarted replica brings its history back. The price: a replica that is
down is missing from the view until it is back (answers name it under `unreachable`), and a replica removed for
good (scaled down) takes its history out of the view with it.

Contract
--------
* With `cluster.peers` set, GET /api/v1/runs, /api/v1/alerts, /api/v1/incidents and /api/v1/incidents/<id>
  (and its `/window`) on any replica answer for every replica: each peer is asked the same question with
  `local=1` (answered from its own state only), in parallel, with a timeout; lists are merged and paged here
  (a run held by two replicas during a move is listed once: the one seen last); an incident is taken from
  whichever replica holds it. This replica answers its own part in-process (never an HTTP call to itself).
* Bounded: at most MAX_PEERS peers, FANOUT_TIMEOUT_S per peer, each peer's answer read up to MAX_ANSWER_BYTES.
* Every other route, and any request with `local=1`, is left to the local routes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from gradwatch.routing import ReplicaRouter

__all__ = ["FanOut"]

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]
Route = Callable[[str, dict[str, list[str]]], Response | None]

MAX_PEERS = 64
FANOUT_TIMEOUT_S = 5.0
MAX_ANSWER_BYTES = 64 << 20
_LISTS = {"/api/v1/runs": "runs", "/api/v1/alerts": "alerts", "/api/v1/incidents": "incidents"}
#: How each list is ordered once merged (the replicas' own order, across replicas).
_ORDER: dict[str, Callable[[dict[str, Any]], Any]] = {
    "runs": lambda r: r.get("last_seen") or 0.0,
    "alerts": lambda a: (a.get("state") != "firing", -(a.get("started_at") or 0.0)),
    "incidents": lambda i: -(i.get("opened_at") or 0.0),
}


class FanOut:
    """The fanned-out read routes (see the module docstring)."""

    def __init__(self, peers: Sequence[str], *, local: Sequence[Route], own_port: Callable[[], int],
                 token: str = "", scheme: str = "http") -> None:  # fmt: skip
        self._router = ReplicaRouter(list(peers))
        #: The local routes this replica answers its own part with (set once the app builds them).
        self.local = tuple(local)
        self._own_port = own_port
        self._token = token
        self._scheme = scheme
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="gradwatch-fanout")

    def route(self, path: str, query: dict[str, list[str]]) -> Response | None:
        if query.get("local"):
            return None
        key = _LISTS.get(path)
        if key is not None:
            return self._list(path, key, query)
        if path.startswith("/api/v1/incidents/"):
            return self._first(path, query)
        return None

    def newer_elsewhere(self, run_id: str, since: float) -> bool:
        """Whether another replica holds run `run_id` active and saw it after `since` (it moved there)."""
        path = f"/api/v1/runs/{urllib.parse.quote(run_id, safe='')}"
        for peer in self._peers():
            try:
                status, _, body = self._ask(peer, path, {})
                run = json.loads(body).get("run") if status == 200 else None
            except Exception as exc:  # a replica that does not answer holds nothing we can rely on
                log.debug("asking %s about run %r failed: %s", peer, run_id, exc)
                continue
            if isinstance(run, dict) and run.get("state") == "active" and (run.get("last_seen") or 0) > since:
                return True
        return False

    # ------------------------------------------------------------------ internals

    def _local_answer(self, path: str, query: dict[str, list[str]]) -> Response | None:
        for route in self.local:
            answer = route(path, query)
            if answer is not None:
                return answer
        return None

    def _peers(self) -> list[str]:
        own = {f"127.0.0.1:{self._own_port()}", f"localhost:{self._own_port()}"}
        with contextlib.suppress(OSError):
            own.add(f"{socket.gethostbyname(socket.gethostname())}:{self._own_port()}")
        return [r.address for r in self._router.replicas() if r.address not in own][:MAX_PEERS]

    def _ask(self, peer: str, path: str, query: dict[str, list[str]]) -> Response:
        pairs = [(k, v) for k, values in query.items() for v in values] + [("local", "1")]
        url = f"{self._scheme}://{peer}{path}?{urllib.parse.urlencode(pairs)}"
        request = urllib.request.Request(url)
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=FANOUT_TIMEOUT_S) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read(MAX_ANSWER_BYTES)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read(MAX_ANSWER_BYTES)

    def _all(self, path: str, query: dict[str, list[str]]) -> tuple[list[Response], list[str]]:
        """Every replica's answer (this one first) and the peers that did not answer."""
        peers = self._peers()
        futures = {peer: self._pool.submit(self._ask, peer, path, query) for peer in peers}
        answers: list[Response] = []
        mine = self._local_answer(path, {**query, "local": ["1"]})
        if mine is not None:
            answers.append(mine)
        unreachable = []
        for peer, future in futures.items():
            try:
                answers.append(future.result(timeout=FANOUT_TIMEOUT_S + 1))
            except Exception as exc:  # a replica down is part of the answer, not an error of it
                log.debug("fan-out to %s failed: %s", peer, exc)
                unreachable.append(peer)
        return answers, unreachable

    def _list(self, path: str, key: str, query: dict[str, list[str]]) -> Response | None:
        limit = _int(query.get("limit"), 1000 if key != "incidents" else 100)
        offset = _int(query.get("offset"), 0)
        wide = {**query, "limit": [str(min(offset + limit, 10_000))], "offset": ["0"]}
        answers, unreachable = self._all(path, wide)
        items: list[dict[str, Any]] = []
        for status, _, body in answers:
            if status == 400:
                return status, "application/json", body  # the same bad query everywhere: say it once
            if status == 200:
                items.extend(json.loads(body).get(key, []))
        if key == "runs":  # a run moving between replicas is listed by both for a while: keep the latest
            latest: dict[str, dict[str, Any]] = {}
            for run in items:
                held = latest.get(run["run"])
                if held is None or (run.get("last_seen") or 0) >= (held.get("last_seen") or 0):
                    latest[run["run"]] = run
            items = list(latest.values())
        items.sort(key=_ORDER[key])
        total = len(items)
        page = {key: items[offset : offset + limit], "total": total,
                "next_offset": offset + limit if offset + limit < total else None,
                "replicas": len(answers), "unreachable": unreachable}  # fmt: skip
        return 200, "application/json", json.dumps(page, allow_nan=False).encode()

    def _first(self, path: str, query: dict[str, list[str]]) -> Response | None:
        mine = self._local_answer(path, {**query, "local": ["1"]})
        if mine is None or mine[0] != 404:
            return mine
        for peer in self._peers():
            try:
                answer = self._ask(peer, path, query)
            except Exception as exc:
                log.debug("fan-out to %s failed: %s", peer, exc)
                continue
            if answer[0] != 404:
                return answer
        return mine


def _int(values: list[str] | None, default: int) -> int:
    try:
        return max(0, int(values[-1])) if values else default
    except ValueError:
        return default
