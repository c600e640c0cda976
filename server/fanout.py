"""One view over every aggregator replica: the read API fanned out over the headless Service (`cluster.peers`).

Why a fan-out rather than a shared PostgreSQL (docs/deployment.md, "One view over all replicas"): replicas keep
sharing nothing (no database server to run, secure, back up and upgrade beside them, no write path that can stall
ingest on a remote commit), Kubernetes' headless Service already lists the ready replicas, and each StatefulSet
replica's volume outlives its pod, so a restarted replica brings its history back. The price: a replica that is
down is missing from the view until it is back (answers name it under `unreachable`), and a replica removed for
good (scaled down) takes its history out of the view with it.

Contract
--------
* With `cluster.peers` set, GET /api/v1/runs, /api/v1/runs/<run> (and its `/ranks`, `/series`), /api/v1/alerts,
  /api/v1/incidents and /api/v1/incidents/<id> (and its `/window`) on any replica answer for every replica: each
  peer is asked the same question with `local=1` (answered from its own state only), in parallel, with a
  timeout; lists are merged and paged here (`total` sums the replicas' totals; a run held by two replicas during
  a move is listed once: the one seen last, and /runs/<run> is that one); an incident, and a run's ranks and
  series, are taken from whichever replica holds them (this one first: during a move, the replica the run left
  may answer with its last state). An incident id prefix is resolved over every replica: one that matches
  several incidents, on one replica or across replicas, answers 409 with the candidates, never one of them.
  This replica answers its own part in-process (never an HTTP call to itself).
  The HTML pages (server/pages.py) read through `lists` and `first` too.
* A peer that does not answer within the deadline, answers anything but 200/400 JSON (a 401 for a wrong
  cluster token, a 500) or an answer cut at MAX_ANSWER_BYTES is named under `unreachable` and left out.
* Bounded: at most MAX_PEERS peers; all the questions of one request are asked at once and waited for under
  one deadline (FANOUT_TIMEOUT_S + 1 s from the start, however many peers hang); each peer's answer is read
  up to MAX_ANSWER_BYTES. Nothing here holds a lock while waiting: this replica's own part is computed (each
  view taking the store's lock only as long as it needs) before the peers are waited for.
* Every other route, and any request with `local=1`, is left to the local routes. Writes that every replica must
  see (silences, server/silences_api.py) go to each peer through `broadcast`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from gradwatch.routing import ReplicaRouter
from gradwatch.server.query_api import ambiguous_answer

__all__ = ["ORDER", "Answer", "FanOut", "merge_page"]

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]
Route = Callable[[str, dict[str, list[str]]], Response | None]

MAX_PEERS = 64
FANOUT_TIMEOUT_S = 5.0
MAX_ANSWER_BYTES = 64 << 20
#: Peers asked at once (a hung peer holds a thread for FANOUT_TIMEOUT_S; healthy ones answer in milliseconds).
FANOUT_THREADS = 16
_RUN = "/api/v1/runs/"
_INCIDENT = "/api/v1/incidents/"
_LISTS = {"/api/v1/runs": "runs", "/api/v1/alerts": "alerts", "/api/v1/incidents": "incidents"}
#: How each list is ordered once merged: each replica's own order, across replicas (runs: least recently seen
#: first, as the store keeps them; alerts: firing ones oldest first, then resolved ones most recently resolved
#: first, as the AlertBook lists them; incidents: newest first, as the database lists them). A page of the merge
#: is then a page of every replica's list taken together: each replica's first offset + limit items suffice.
ORDER: dict[str, Callable[[dict[str, Any]], Any]] = {
    "runs": lambda r: (r.get("last_seen") or 0.0, r.get("run", "")),
    "alerts": lambda a: (0, a.get("started_at") or 0.0) if a.get("state") == "firing" else
                        (1, -(a.get("resolved_at") or 0.0)),
    "incidents": lambda i: (-(i.get("opened_at") or 0.0), i.get("id", "")),
}  # fmt: skip


class FanOut:
    """The fanned-out read routes (see the module docstring); `lists` and `first` serve the pages too."""

    def __init__(self, peers: Sequence[str], *, local: Sequence[Route], own_port: Callable[[], int],
                 token: str = "", scheme: str = "http") -> None:  # fmt: skip
        self._router = ReplicaRouter(list(peers))
        #: The local routes this replica answers its own part with (set once the app builds them).
        self.local = tuple(local)
        self._own_port = own_port
        self._token = token
        self._scheme = scheme
        self._pool = concurrent.futures.ThreadPoolExecutor(FANOUT_THREADS, thread_name_prefix="gradwatch-fanout")

    def route(self, path: str, query: dict[str, list[str]]) -> Response | None:
        if query.get("local"):
            return None
        if path in _LISTS:
            ((status, page),) = self.lists([(path, query)])
            return status, "application/json", json.dumps(page, allow_nan=False).encode()
        if path.startswith(_RUN):
            run_id, _, what = path.removeprefix(_RUN).partition("/")
            return self.first(path, query)[0] if what else self._run(urllib.parse.unquote(run_id))
        if path.startswith(_INCIDENT):
            return self.first(path, query)[0]
        return None

    def lists(self, questions: Sequence[tuple[str, dict[str, list[str]]]]) -> list[tuple[int, dict[str, Any]]]:
        """Each list question (a list route's path and its query) answered for every replica, as the route
        answers it: (200, the merged page with `replicas` and `unreachable`) or (400, {"error"}). Every question
        goes to every peer at once, under one deadline; a peer that fails any of them is left out of all."""
        pages = [(_int(query.get("limit"), _DEFAULT_LIMIT[_LISTS[path]]), _int(query.get("offset"), 0))
                 for path, query in questions]  # fmt: skip
        wide = [(path, {**query, "limit": [str(min(offset + limit, 10_000))], "offset": ["0"]})
                for (path, query), (limit, offset) in zip(questions, pages, strict=True)]  # fmt: skip
        answers, unreachable = self._all(wide)
        return [merge_page(_LISTS[path], got, len(answers), unreachable, limit, offset)
                for (path, _), got, (limit, offset) in zip(questions, zip(*answers, strict=True), pages,
                                                           strict=True)]  # fmt: skip

    def first(self, path: str, query: dict[str, list[str]]) -> tuple[Response | None, list[str]]:
        """What `path` names (one incident or its window, a run's ranks or series), from the replica that holds
        it, with the peers that did not answer (those known when the answer came). An incident is looked up by
        id or prefix over every replica (`incident`); the rest: this replica's own answer unless it is 404, else
        the first peer to answer 200 (all asked at once, one deadline)."""
        if path.startswith(_INCIDENT):
            return self.incident(path, query)
        return self._holder(path, query)

    def incident(self, path: str, query: dict[str, list[str]]) -> tuple[Response | None, list[str]]:
        """/api/v1/incidents/<id>[/window] over every replica. A whole id is taken from the first replica that
        holds it (this one first). A prefix is resolved over all of them: the one incident it matches anywhere,
        or 409 with the candidates when it matches several (on one replica or across replicas: a prefix never
        picks one silently); a window is then read by the whole id."""
        quoted, _, what = path.removeprefix(_INCIDENT).partition("/")
        wanted = urllib.parse.unquote(quoted)
        if what not in ("", "window"):
            return self._holder(path, query)
        body_path = _INCIDENT + quoted
        mine = self._local_answer(body_path, {**query, "local": ["1"]})
        unreachable: list[str] = []
        if _incident_id(mine) == wanted:
            found = mine
        else:
            found, unreachable = self._resolve(body_path, query, mine, wanted)
        if not what or found is None or found[0] != 200:
            return found, unreachable
        whole = _incident_id(found) or wanted
        window, more = self._holder(f"{_INCIDENT}{urllib.parse.quote(whole, safe='')}/{what}", query)
        return window, sorted({*unreachable, *more})

    def _resolve(self, path: str, query: dict[str, list[str]], mine: Response | None,
                 wanted: str) -> tuple[Response | None, list[str]]:  # fmt: skip
        """An incident id or prefix that this replica does not hold whole: every peer asked at once; the first
        whole-id match returns at once, else all answers (one deadline) are merged: one incident, several (409),
        or none (this replica's 404)."""
        peers = self._peers()
        futures = {self._pool.submit(self._ask, peer, path, query): peer for peer in peers}
        found: dict[str, Response] = {}
        candidates: set[str] = set()

        def take(answer: Response | None) -> bool:  # False: not a readable 200/404/409 JSON answer
            decoded = _decoded_any(answer)
            if answer is None or decoded is None or decoded[0] not in (200, 404, 409):
                return False
            status, body = decoded
            if status == 200 and isinstance(body.get("incident"), dict):
                found.setdefault(str(body["incident"].get("id")), answer)
            elif status == 409:
                candidates.update(str(c) for c in body.get("candidates", []) if isinstance(c, str))
            return True

        take(mine)
        failed: set[str] = set()
        try:
            for future in concurrent.futures.as_completed(futures, timeout=FANOUT_TIMEOUT_S + 1):
                answer = _answer(future)
                if not take(answer):
                    failed.add(futures[future])
                elif answer is not None and _incident_id(answer) == wanted:
                    return answer, sorted(failed)  # a whole id: no other replica can hold another
        except TimeoutError:
            failed.update(peer for future, peer in futures.items() if not future.done())
        finally:
            for future in futures:
                future.cancel()
        unreachable = [p for p in peers if p in failed]
        matches = candidates | set(found)
        if len(matches) > 1:
            return ambiguous_answer(wanted, sorted(matches), unreachable=unreachable), unreachable
        if found:
            return next(iter(found.values())), unreachable
        return mine, unreachable

    def _holder(self, path: str, query: dict[str, list[str]]) -> tuple[Response | None, list[str]]:
        """This replica's answer for `path` unless it is 404, else the first peer to answer 200."""
        mine = self._local_answer(path, {**query, "local": ["1"]})
        if mine is None or mine[0] != 404:
            return mine, []
        peers = self._peers()
        futures = {self._pool.submit(self._ask, peer, path, query): peer for peer in peers}
        failed: set[str] = set()
        try:
            for future in concurrent.futures.as_completed(futures, timeout=FANOUT_TIMEOUT_S + 1):
                answer = _answer(future)
                if answer is not None and answer[0] == 200:
                    return answer, [p for p in peers if p in failed]
                if answer is None or answer[0] != 404:
                    failed.add(futures[future])
        except TimeoutError:  # the peers still silent did not answer
            failed.update(peer for future, peer in futures.items() if not future.done())
        finally:
            for future in futures:
                future.cancel()
        return mine, [p for p in peers if p in failed]

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

    def _run(self, run_id: str) -> Response:
        """One run's view from the replica that saw it last: the runs list narrowed to it, merged."""
        ((status, page),) = self.lists([("/api/v1/runs", {"run": [run_id], "limit": ["1"]})])
        found = [run for run in page.get("runs", []) if run.get("run") == run_id]  # a peer may predate `run=`
        if found:
            return 200, "application/json", json.dumps({"run": found[0]}, allow_nan=False).encode()
        error = {"error": f"no such run: {run_id!r}", **({"unreachable": page["unreachable"]} if status == 200 else {})}
        return 404, "application/json", json.dumps(error).encode()

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
        # The routes get the path as it came (still quoted); quoting again keeps it so and guards the pages' own.
        url = f"{self._scheme}://{peer}{urllib.parse.quote(path, safe='/%')}?{urllib.parse.urlencode(pairs)}"
        request = urllib.request.Request(url)
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        return self._open(request)

    def broadcast(self, method: str, path: str, body: bytes | None,
                  authorization: str | None) -> tuple[list[tuple[str, Answer]], list[str]]:  # fmt: skip
        """`method path?local=1` (with `body`) sent to every peer at once under one deadline, with `authorization`
        (the caller's header, passed on as it came) or else the cluster token: (peer, (status, JSON object)) for
        each peer that answered one below 500 other than 401/403, and the peers that did not (down, too slow,
        refusing the token, garbage). Used to write to every replica (server/silences_api.py)."""
        peers = self._peers()
        futures = {self._pool.submit(self._send, peer, method, path, body, authorization): peer for peer in peers}
        concurrent.futures.wait(futures, timeout=FANOUT_TIMEOUT_S + 1)
        answered, unreachable = [], []
        for future, peer in futures.items():
            got = _decoded_any(_answer(future))
            if got is None:
                unreachable.append(peer)
            else:
                answered.append((peer, got))
            future.cancel()
        return answered, unreachable

    def _send(self, peer: str, method: str, path: str, body: bytes | None, authorization: str | None) -> Response:
        url = f"{self._scheme}://{peer}{urllib.parse.quote(path, safe='/%')}?local=1"
        request = urllib.request.Request(url, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if authorization or self._token:
            request.add_header("Authorization", authorization or f"Bearer {self._token}")
        return self._open(request)

    def _open(self, request: urllib.request.Request) -> Response:
        try:
            with urllib.request.urlopen(request, timeout=FANOUT_TIMEOUT_S) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read(MAX_ANSWER_BYTES)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read(MAX_ANSWER_BYTES)

    def _all(self, questions: Sequence[tuple[str, dict[str, list[str]]]]) -> tuple[list[list[Answer]], list[str]]:
        """Every replica's answers to `questions` (this one's first, one list per replica, in the questions'
        order), and the peers that did not answer them all within the deadline with a readable 200 or 400."""
        deadline = time.monotonic() + FANOUT_TIMEOUT_S + 1
        peers = self._peers()
        futures = [[self._pool.submit(self._ask, peer, path, query) for path, query in questions] for peer in peers]
        mine = [self._local_answer(path, {**query, "local": ["1"]}) for path, query in questions]
        concurrent.futures.wait([f for asked in futures for f in asked], timeout=max(0.0, deadline - time.monotonic()))
        answers = [[_decoded(answer) for answer in mine]]
        unreachable = []
        for peer, asked in zip(peers, futures, strict=True):
            got = [_decoded(_answer(future)) for future in asked]
            if all(answer is not None for answer in got):
                answers.append(got)
            else:  # a replica down, too slow, refusing our token or answering garbage: part of the answer
                unreachable.append(peer)
            for future in asked:
                future.cancel()
        return answers, unreachable  # type: ignore[return-value]  # this replica's own answers are never None


Answer = tuple[int, dict[str, Any]]
_DEFAULT_LIMIT = {"runs": 1000, "alerts": 1000, "incidents": 100}


def _answer(future: concurrent.futures.Future[Response]) -> Response | None:
    """A finished ask's answer; None when it failed or has not finished."""
    if not future.done() or future.cancelled():
        return None
    exc = future.exception()
    if exc is not None:
        log.debug("fan-out failed: %s", exc)
        return None
    return future.result()


def _incident_id(answer: Response | None) -> str | None:
    """The id of the incident a 200 answer of /api/v1/incidents/<id> carries; None for any other answer."""
    decoded = _decoded_any(answer)
    if decoded is None or decoded[0] != 200 or not isinstance(decoded[1].get("incident"), dict):
        return None
    ident = decoded[1]["incident"].get("id")
    return ident if isinstance(ident, str) else None


def _decoded(answer: Response | None) -> Answer | None:
    """A list answer as (status, body): 200 or 400 with a JSON object; None for anything else."""
    decoded = _decoded_any(answer)
    return decoded if decoded is not None and decoded[0] in (200, 400) else None


def _decoded_any(answer: Response | None) -> Answer | None:
    """A write's answer as (status, body): a JSON object under a status below 500 other than 401/403; else None."""
    if answer is None or answer[0] >= 500 or answer[0] in (401, 403):
        return None
    try:
        body = json.loads(answer[2])
    except ValueError:
        return None
    return (answer[0], body) if isinstance(body, dict) else None


def merge_page(key: str, answers: Sequence[Answer], replicas: int, unreachable: list[str], limit: int,
           offset: int) -> Answer:  # fmt: skip
    """The replicas' answers to one list question as one page of the list route."""
    items: list[dict[str, Any]] = []
    total = 0
    for status, body in answers:
        if status == 400:
            return status, body  # the same bad query everywhere: say it once
        items.extend(body.get(key, []))
        total += int(body.get("total", 0))
    if key == "runs":  # a run moving between replicas is listed by both for a while: keep the latest
        latest: dict[str, dict[str, Any]] = {}
        for run in items:
            held = latest.get(run["run"])
            if held is None or (run.get("last_seen") or 0) >= (held.get("last_seen") or 0):
                latest[run["run"]] = run
        total -= len(items) - len(latest)
        items = list(latest.values())
    items.sort(key=ORDER[key])
    page = {key: items[offset : offset + limit], "total": total,
            "next_offset": offset + limit if offset + limit < total else None,
            "replicas": replicas, "unreachable": unreachable}  # fmt: skip
    return 200, page


def _int(values: list[str] | None, default: int) -> int:
    try:
        return max(0, int(values[-1])) if values else default
    except ValueError:
        return default
