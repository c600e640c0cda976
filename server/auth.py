"""Bearer tokens: who may write which job's runs, and who may read the HTTP API (docs/security.md).

The tokens file (YAML, or JSON, which is YAML too) is a list of grants::

    tokens:
      - name: llama-team            # shown in logs, errors and /api; never the secret
        token: "at-least-16-characters-of-secret"   # or `sha256: <hex digest of the token>`
        jobs: ["llama-*"]           # job_name glob patterns the token may write (default: none)
        runs: ["*"]                 # run id glob patterns (default: every run of those jobs)
        api: false                  # may read the HTTP API (and /metrics when it is protected)
        silences: false             # may create and expire silences (POST/DELETE /api/v1/silences)

Contract
- Agents send `authorization: Bearer <token>` as gRPC metadata on every Stream and Flush call. No or a
  malformed header → UNAUTHENTICATED `missing_token`; an unknown token → UNAUTHENTICATED `invalid_token`;
  a known token whose patterns do not match the Hello's job_name / run_id → PERMISSION_DENIED
  `job_not_allowed` / `run_not_allowed`; a Hello for a run the server already holds under another job name →
  PERMISSION_DENIED `run_bound_to_other_job` (a run belongs to the job of its first Hello, so no token can
  write into another job's run). Later frames carry no identity, so a stream stays bound to its Hello.
- Tokens are compared as SHA-256 digests with `hmac.compare_digest` against every grant (no early exit),
  and never logged: errors and logs name the grant.
- The file is re-read when it changes (a mounted Kubernetes Secret is swapped atomically by the kubelet):
  its size, mtime and inode are checked at most once per RELOAD_CHECK_INTERVAL_S. A file that no longer
  parses keeps the previous grants and is counted (`gradwatch_auth_reloads_total{result="error"}`); at
  start-up it is a ValueError naming the problem. Open streams are re-checked against new grants: a revoked
  token ends its streams with UNAUTHENTICATED.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import yaml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gradwatch.server.validate import FrameRejected

__all__ = [
    "AUTH_REASONS",
    "HTTP_AUTH_REASONS",
    "RELOAD_CHECK_INTERVAL_S",
    "AuthCollector",
    "Grant",
    "HttpGuard",
    "TokenBook",
    "TokenSource",
    "authorize",
    "bearer_token",
    "load_token_book",
]

log = logging.getLogger(__name__)

#: How often the tokens file is checked for a change (a stat, on the next call after this many seconds).
RELOAD_CHECK_INTERVAL_S = 1.0
#: Shortest secret accepted in the file: a guessable token is no protection.
MIN_TOKEN_CHARS = 16

MISSING_TOKEN = "missing_token"
INVALID_TOKEN = "invalid_token"
JOB_NOT_ALLOWED = "job_not_allowed"
RUN_NOT_ALLOWED = "run_not_allowed"
RUN_BOUND = "run_bound_to_other_job"
#: Rejection reasons of the gRPC side (label values of gradwatch_ingest_errors_total).
AUTH_REASONS: tuple[str, ...] = (MISSING_TOKEN, INVALID_TOKEN, JOB_NOT_ALLOWED, RUN_NOT_ALLOWED, RUN_BOUND)
API_NOT_ALLOWED = "api_not_allowed"
SILENCES_NOT_ALLOWED = "silences_not_allowed"
#: Rejection reasons of the HTTP side (gradwatch_http_auth_failures_total).
HTTP_AUTH_REASONS: tuple[str, ...] = (MISSING_TOKEN, INVALID_TOKEN, API_NOT_ALLOWED, SILENCES_NOT_ALLOWED)
#: Methods that change state; on /api/v1/silences they need a grant with `silences: true`.
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SILENCES_PATH = "/api/v1/silences"

_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
_DENIED = grpc.StatusCode.PERMISSION_DENIED
_GRANT_KEYS = frozenset({"name", "token", "sha256", "jobs", "runs", "api", "silences"})


@dataclass(frozen=True)
class Grant:
    """One entry of the tokens file (the digest of its secret, never the secret)."""

    name: str
    digest: bytes
    jobs: tuple[str, ...]
    runs: tuple[str, ...]
    api: bool
    #: May create and expire silences (muting pages is a write, so `api: true`, which reads, does not allow it).
    silences: bool = False

    def may_write(self, job_name: str, run_id: str) -> str | None:
        """None when this grant may write (job_name, run_id); else the rejection reason."""
        if not any(fnmatch.fnmatchcase(job_name, p) for p in self.jobs):
            return JOB_NOT_ALLOWED
        if not any(fnmatch.fnmatchcase(run_id, p) for p in self.runs):
            return RUN_NOT_ALLOWED
        return None


@dataclass(frozen=True)
class TokenBook:
    """The grants of one version of the tokens file."""

    grants: tuple[Grant, ...]

    def find(self, token: str) -> Grant | None:
        """The grant whose secret is `token`, compared in constant time against every grant."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Grant | None = None
        for grant in self.grants:
            if hmac.compare_digest(digest, grant.digest):
                found = grant
        return found


def _problem(where: str, text: str) -> ValueError:
    return ValueError(f"tokens file: {where}: {text}")


def _patterns(where: str, value: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _problem(where, f"must be a list of non-empty glob patterns, got {value!r}")
    return tuple(value)


def _grant(index: int, entry: Any) -> Grant:
    where = f"tokens[{index}]"
    if not isinstance(entry, Mapping):
        raise _problem(where, f"must be a mapping, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _GRANT_KEYS)
    if unknown:
        raise _problem(f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_GRANT_KEYS))})")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise _problem(f"{where}.name", "a non-empty name is required (it stands for the token in logs)")
    where = f"tokens[{index}] ({name})"
    token, digest_hex = entry.get("token"), entry.get("sha256")
    if (token is None) == (digest_hex is None):
        raise _problem(where, "give exactly one of `token` and `sha256`")
    if token is not None:
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise _problem(f"{where}.token", f"must be a string of at least {MIN_TOKEN_CHARS} characters")
        digest = hashlib.sha256(token.encode("utf-8")).digest()
    else:
        try:
            digest = bytes.fromhex(digest_hex) if isinstance(digest_hex, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise _problem(f"{where}.sha256", "must be the 64 hex digits of the token's SHA-256 digest")
    api, silences = entry.get("api", False), entry.get("silences", False)
    for key, flag in (("api", api), ("silences", silences)):
        if not isinstance(flag, bool):
            raise _problem(f"{where}.{key}", f"must be true or false, got {flag!r}")
    return Grant(
        name=name,
        digest=digest,
        jobs=_patterns(f"{where}.jobs", entry.get("jobs"), ()),
        runs=_patterns(f"{where}.runs", entry.get("runs"), ("*",)),
        api=api,
        silences=silences,
    )


def load_token_book(text: str) -> TokenBook:
    """Parse a tokens file's text; ValueError naming the entry and key of the first problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"tokens file: not YAML or JSON: {exc}") from None
    if not isinstance(data, Mapping) or set(data) != {"tokens"}:
        raise ValueError("tokens file: must be a mapping with the one key `tokens` (a list of grants)")
    entries = data["tokens"] or []
    if not isinstance(entries, list):
        raise ValueError("tokens file: `tokens` must be a list of grants")
    grants = tuple(_grant(i, entry) for i, entry in enumerate(entries))
    names = [g.name for g in grants]
    if len(set(names)) != len(names):
        raise ValueError(f"tokens file: grant names must be unique, got {names!r}")
    if len({g.digest for g in grants}) != len(grants):
        raise ValueError("tokens file: two grants share one token")
    return TokenBook(grants)


def bearer_token(value: str | None) -> str | None:
    """The token of an `authorization` value `Bearer <token>` (scheme case-insensitive), else None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class TokenSource:
    """The current TokenBook of a file, reloaded when the file changes (see the module docstring)."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = self._stat()
        self._book = self._read()  # loud at start-up
        self._checked_at = clock()
        self.generation = 1
        self.reloads = {"ok": 0, "error": 0}

    @property
    def path(self) -> str:
        return self._path

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self._path)
        except OSError as exc:
            raise ValueError(f"auth.tokens_file: cannot read {self._path!r}: {exc.strerror or exc}") from None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _read(self) -> TokenBook:
        try:
            with open(self._path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"auth.tokens_file: cannot read {self._path!r}: {exc}") from None
        try:
            return load_token_book(text)
        except ValueError as exc:
            raise ValueError(f"auth.tokens_file {self._path!r}: {exc}") from None

    def book(self) -> TokenBook:
        """The grants in force, re-reading the file if it changed since the last check."""
        now = self._clock()
        with self._lock:
            if now - self._checked_at >= RELOAD_CHECK_INTERVAL_S:
                self._checked_at = now
                self._maybe_reload()
            return self._book

    def _maybe_reload(self) -> None:
        try:
            signature: tuple[int, int, int] | None = self._stat()
        except ValueError as exc:
            if self._signature is None:
                return  # still missing: counted when it went
            signature, problem = None, exc
        else:
            if signature == self._signature:
                return
            try:
                book = self._read()
            except ValueError as exc:
                problem = exc
            else:
                self._signature, self._book = signature, book
                self.generation += 1
                self.reloads["ok"] += 1
                log.info("tokens file %s reloaded: %d grants", self._path, len(book.grants))
                return
        # Remembered, so one broken version is counted and logged once, not at every check.
        self._signature = signature
        self.reloads["error"] += 1
        log.error("keeping the previous tokens: %s", problem)

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Grant:
        """The grant of the call's bearer token; FrameRejected UNAUTHENTICATED without a valid one."""
        header = next((str(v) for k, v in metadata or () if k == "authorization"), None)
        token = bearer_token(header)
        if token is None:
            raise FrameRejected(
                _UNAUTHENTICATED, MISSING_TOKEN, "this server requires `authorization: Bearer <token>` metadata"
            )
        grant = self.book().find(token)
        if grant is None:
            raise FrameRejected(_UNAUTHENTICATED, INVALID_TOKEN, "the bearer token is not known to this server")
        return grant


def authorize(grant: Grant, job_name: str, run_id: str, bound_job: str | None) -> None:
    """Raise FrameRejected PERMISSION_DENIED unless `grant` may write run `run_id` of job `job_name`.

    `bound_job` is the job the server already holds the run under (None: a new run)."""
    reason = grant.may_write(job_name, run_id)
    if reason == JOB_NOT_ALLOWED:
        raise FrameRejected(_DENIED, reason, f"token {grant.name!r} may not write job_name {job_name!r}")
    if reason == RUN_NOT_ALLOWED:
        raise FrameRejected(_DENIED, reason, f"token {grant.name!r} may not write run {run_id!r}")
    if bound_job is not None and bound_job != job_name:
        raise FrameRejected(
            _DENIED, RUN_BOUND, f"run {run_id!r} belongs to another job; job_name {job_name!r} may not write it"
        )


class HttpGuard:
    """Who may read which HTTP path: /healthz always; /metrics and /api/v1/* per AuthConfig. Writing silences
    (POST, DELETE under /api/v1/silences) always needs a token whose grant has `silences: true`."""

    def __init__(self, source: TokenSource, *, protect_api: bool, protect_metrics: bool) -> None:
        self._source = source
        self._protect_api = protect_api
        self._protect_metrics = protect_metrics
        self._lock = threading.Lock()
        self.failures = dict.fromkeys(HTTP_AUTH_REASONS, 0)

    def check(self, path: str, authorization: str | None, method: str = "GET") -> tuple[int, str] | None:
        """None when the request may proceed; else (HTTP status, message)."""
        if path == "/healthz":
            return None
        writes_silences = method.upper() in WRITE_METHODS and path.rstrip("/").startswith(SILENCES_PATH)
        protected = self._protect_metrics if path == "/metrics" else self._protect_api
        if not protected and not writes_silences:
            return None
        token = bearer_token(authorization)
        if token is None:
            return self._fail(MISSING_TOKEN, 401, "this endpoint requires `Authorization: Bearer <token>`")
        grant = self._source.book().find(token)
        if grant is None:
            return self._fail(INVALID_TOKEN, 401, "the bearer token is not known to this server")
        if writes_silences:
            if not grant.silences:
                return self._fail(SILENCES_NOT_ALLOWED, 403, f"token {grant.name!r} has no `silences: true`")
            return None
        if not grant.api:
            return self._fail(API_NOT_ALLOWED, 403, f"token {grant.name!r} has no `api: true`")
        return None

    def _fail(self, reason: str, status: int, message: str) -> tuple[int, str]:
        with self._lock:
            self.failures[reason] += 1
        return status, message


class AuthCollector(Collector):
    """gradwatch_auth_* families: grants loaded, file reloads by result, HTTP rejections by reason."""

    def __init__(self, source: TokenSource, guard: HttpGuard) -> None:
        self._source = source
        self._guard = guard

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "gradwatch_auth_grants", "Grants in the tokens file in force.", value=len(self._source.book().grants)
        )
        reloads = CounterMetricFamily(
            "gradwatch_auth_reloads_total", "Reloads of the changed tokens file, by result.", labels=["result"]
        )
        for result, n in sorted(self._source.reloads.items()):
            reloads.add_metric([result], n)
        yield reloads
        http = CounterMetricFamily(
            "gradwatch_http_auth_failures_total", "HTTP requests refused for want of a valid token.", labels=["reason"]
        )
        for reason, n in sorted(self._guard.failures.items()):
            http.add_metric([reason], n)
        yield http
