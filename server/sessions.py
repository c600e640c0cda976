"""Browser sessions for the HTML pages when the HTTP guard protects them (a tokens file, `auth.protect_api`).

A person who clicks an alert's link in Alertmanager or Grafana has a browser, not an `Authorization` header.
The pages (`/`, `/incidents/...`) therefore also accept a session cookie, obtained by posting a token to a
login form; the JSON API and /metrics keep taking bearer tokens only (a cookie never authorizes them).

Flow
- A page requested without a valid session or bearer token answers 401 (`WWW-Authenticate: Bearer`) with a
  page that sends the browser on to `login?next=<the page>` (a meta refresh, and a link). That second
  navigation starts from this server's own page, so a SameSite=Strict cookie the browser already holds is
  sent with it even when the click came from another site: a signed-in person goes straight through.
- `GET /login` shows the form (or, with a valid session, redirects to `next`). It sets a login CSRF cookie
  whose value the form repeats; `POST /login` (form fields `token`, `next`, `csrf`) needs both to match, so
  another site cannot post the form. The token is checked by the guard like a bearer token (and its
  failures counted the same way, `gradwatch_http_auth_failures_total`): a grant with `api: true` opens a
  session, anything else answers the form again with 401 or 403 and sets no cookie.
- The session cookie is HttpOnly, SameSite=Strict, Path=/, `Secure` (and named with the `__Host-` prefix)
  when the server speaks TLS or its `alerting.external_url` is https; it lives SESSION_TTL_S. The server
  keeps only the SHA-256 of the session id, with the grant it was opened for: a session ends when it
  expires, when its grant leaves the tokens file or loses `api: true`, at logout, and at a restart (sessions
  are held in memory, at most MAX_SESSIONS, the oldest dropped first).
- `next` is kept through the login only if it is one of the pages (an overview or incident path with its
  query), as a path relative to the server's root: never another host, so the login is no open redirect.
- Nothing changes state on GET: `GET /logout` shows a form, `POST /logout` (with its CSRF pair) ends the
  session. Silences are written with a bearer token only, never with the cookie.
- Several replicas (`cluster.peers`, with `peers` set): a session stays held by the replica that opened it, and
  any other replica behind the same Service honours it by asking the peers (`SessionPeers.ask`, by the SHA-256
  of the session id: a digest opens nothing) and keeps the answer BORROW_TTL_S at most; the grant it names
  must be in force in this replica's tokens file too. A logout through any replica ends it on every replica
  (`SessionPeers.revoke`). Sessions opened by a replica end when that replica stops, as on one replica.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import html
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Protocol
from urllib.parse import parse_qs, quote

from gradwatch.incident_report import PAGE_CSS
from gradwatch.server.auth import HttpGuard, TokenSource

__all__ = ["BORROW_TTL_S", "MAX_SESSIONS", "SESSION_TTL_S", "Answer", "PageSessions", "SessionPeers", "is_page"]

log = logging.getLogger(__name__)

#: How long a session lasts from login.
SESSION_TTL_S = 12 * 3600.0
#: Sessions held at once (the oldest is dropped first); as many borrowed from peers.
MAX_SESSIONS = 10000
#: Longest a session another replica holds is honoured here before that replica is asked again (so a logout
#: that could not reach this replica ends the session here within this time).
BORROW_TTL_S = 30.0
#: Largest login or logout form body accepted.
MAX_FORM_BYTES = 8192
#: Longest `next` kept through a login.
MAX_NEXT_CHARS = 2048
LOGIN, LOGOUT = "/login", "/logout"
HTML = "text/html; charset=utf-8"
#: A page path relative to the server's root, with its query: the overview or one incident.
_NEXT = re.compile(r"(incidents/[^/?#\\]+)?(\?[^#\\]*)?")
_NO_STORE = {"Cache-Control": "no-store"}
#: A session id as `login` makes them (secrets.token_urlsafe(32)).
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class Answer:
    """An HTTP answer of this module: status, headers (Set-Cookie, Location...) and an HTML body."""

    status: int
    body: bytes
    headers: Mapping[str, str]
    cookies: tuple[str, ...] = ()  # Set-Cookie values
    #: Set where the page embeds a form: the pages' CSP with `form-action 'self'`.
    form: bool = False


#: The gate's verdict for a page request that carries a valid session: serve it, no bearer token needed.
ALLOWED = Answer(200, b"", {})


@dataclass
class _Session:
    grant: str
    digest: bytes
    expires_at: float


class SessionPeers(Protocol):
    """The other replicas' sessions (server/sessions_api.py), by the SHA-256 of a session id, in hex."""

    def ask(self, digest: str) -> tuple[str, float] | None:
        """(grant name, expiry) of the session some peer holds, or None."""

    def revoke(self, digest: str) -> None:
        """End the session on every peer that holds or honours it."""


def is_page(path: str) -> bool:
    """The HTML pages (gradwatch.server.pages): the overview and the incident reports."""
    return path == "/" or (path.startswith("/incidents/") and path.count("/") == 2)


class PageSessions:
    """See the module docstring. All methods are cheap (no I/O beyond the tokens file's stat)."""

    def __init__(
        self, source: TokenSource, guard: HttpGuard, *, secure: bool, clock: Callable[[], float] = time.time
    ) -> None:
        self._source = source
        self._guard = guard
        self._secure = secure
        self._clock = clock
        prefix = "__Host-" if secure else ""
        self.cookie, self.csrf_cookie = f"{prefix}gradwatch_session", f"{prefix}gradwatch_login_csrf"
        self._sessions: collections.OrderedDict[bytes, _Session] = collections.OrderedDict()
        #: Sessions other replicas hold, honoured here: digest -> (grant name, session expiry, asked at).
        self._borrowed: collections.OrderedDict[bytes, tuple[str, float, float]] = collections.OrderedDict()
        self._lock = threading.Lock()
        #: The other replicas, when there are any (set by the app with `cluster.peers`).
        self.peers: SessionPeers | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    # ------------------------------------------------------------------ the gate

    def gate(self, method: str, raw_path: str, path: str, cookies: Mapping[str, str], authorization: str | None
             ) -> Answer | None:  # fmt: skip
        """For the login routes, their answer; for a page GET without an Authorization header, ALLOWED with a
        valid session, else the 401 page that leads to the login; None: not ours (the guard decides)."""
        if path in (LOGIN, LOGOUT) and method == "GET":
            return self._login_get(raw_path, cookies) if path == LOGIN else self._logout_form()
        if path in (LOGIN, LOGOUT):
            return None  # POSTs: HttpApi reads the body and calls login() / logout()
        if not is_page(path) or method != "GET" or authorization:
            return None
        if self.session(cookies) is not None:
            return ALLOWED
        target = "../" * (path.count("/") - 1) + "login?next=" + quote(raw_path.lstrip("/"), safe="")
        return Answer(401, _bounce(target), {**_NO_STORE, "WWW-Authenticate": 'Bearer realm="gradwatch"'})

    def session(self, cookies: Mapping[str, str]) -> str | None:
        """The grant name of the cookie's session while it is valid, else None."""
        sid = cookies.get(self.cookie)
        if not sid:
            return None
        key = hashlib.sha256(sid.encode("utf-8", "replace")).digest()
        now = self._clock()
        with self._lock:
            found = self._sessions.get(key)
            if found is not None:
                if found.expires_at <= now or not self._grant_in_force(found.digest):
                    del self._sessions[key]
                    return None
                return found.grant
        # Only what a replica could have issued is asked about (a garbage cookie costs no question to the peers).
        return self._borrow(key, now) if _SESSION_ID.fullmatch(sid) else None

    def _borrow(self, key: bytes, now: float) -> str | None:
        """A session another replica holds (see the module docstring), or None."""
        if self.peers is None:
            return None
        with self._lock:
            held = self._borrowed.get(key)
        if held is None or now - held[2] >= BORROW_TTL_S:
            answer = self.peers.ask(key.hex())  # blocking: the gate runs on the HTTP view threads
            with self._lock:
                self._borrowed.pop(key, None)
                if answer is None:
                    return None
                held = (answer[0], answer[1], now)
                self._borrowed[key] = held
                while len(self._borrowed) > MAX_SESSIONS:
                    self._borrowed.popitem(last=False)
        grant, expires_at, _ = held
        if expires_at <= now or not any(g.name == grant and g.api for g in self._source.book().grants):
            with self._lock:
                self._borrowed.pop(key, None)
            return None
        return grant

    def lookup(self, digest: str) -> tuple[str, float] | None:
        """(grant name, expiry) of a session this replica opened and still holds valid, by its digest in hex
        (what a peer asks); never one borrowed from a peer."""
        key = _key(digest)
        if key is None:
            return None
        now = self._clock()
        with self._lock:
            found = self._sessions.get(key)
            if found is None or found.expires_at <= now or not self._grant_in_force(found.digest):
                return None
            return found.grant, found.expires_at

    def drop(self, digest: str) -> bool:
        """End the session with this digest (hex) here, held or borrowed; whether there was one."""
        key = _key(digest)
        if key is None:
            return False
        with self._lock:
            return (self._sessions.pop(key, None) is not None) | (self._borrowed.pop(key, None) is not None)

    def _grant_in_force(self, digest: bytes) -> bool:
        return any(hmac.compare_digest(g.digest, digest) and g.api for g in self._source.book().grants)

    # ------------------------------------------------------------------ login and logout

    def _login_get(self, raw_path: str, cookies: Mapping[str, str]) -> Answer:
        target = safe_next(_query_value(raw_path, "next"))
        if self.session(cookies) is not None:
            return _redirect("./" + target)
        return self._form(200, target, "")

    def login(self, body: bytes, cookies: Mapping[str, str]) -> Answer:
        """POST /login: a form with `token`, `next` and `csrf` (see the module docstring)."""
        form = _form_fields(body)
        target = safe_next(form.get("next", ""))
        if not self._csrf_ok(form, cookies):
            return self._form(403, target, "The login form expired or came from another site: enter the token again.")
        token = form.get("token", "").strip()
        refusal = self._guard.check("/", f"Bearer {token}" if token else None, "GET")
        if refusal is not None:
            status, message = refusal
            shown = "That token is not accepted." if status == 401 else "That token may not read this server (api)."
            log.info("page login refused: %s", message)
            return self._form(status, target, shown)
        grant = self._source.book().find(token)
        assert grant is not None  # the guard just accepted it
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[hashlib.sha256(sid.encode()).digest()] = _Session(
                grant.name, grant.digest, self._clock() + SESSION_TTL_S
            )
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        log.info("page session opened for token %r", grant.name)
        return _redirect(
            "./" + target, self._cookie(self.cookie, sid, SESSION_TTL_S), self._cookie(self.csrf_cookie, "", 0)
        )

    def logout(self, body: bytes, cookies: Mapping[str, str]) -> Answer:
        """POST /logout with its CSRF pair: ends the session and clears the cookie."""
        if not self._csrf_ok(_form_fields(body), cookies):
            return self._logout_form(403, "The form expired or came from another site: log out again.")
        sid = cookies.get(self.cookie)
        if sid:
            digest = hashlib.sha256(sid.encode("utf-8", "replace")).hexdigest()
            self.drop(digest)
            if self.peers is not None:
                self.peers.revoke(digest)
        return _redirect("login", self._cookie(self.cookie, "", 0), self._cookie(self.csrf_cookie, "", 0))

    def _csrf_ok(self, form: Mapping[str, str], cookies: Mapping[str, str]) -> bool:
        sent, held = form.get("csrf", ""), cookies.get(self.csrf_cookie, "")
        return bool(sent) and hmac.compare_digest(sent.encode(), held.encode())

    def _form(self, status: int, target: str, message: str) -> Answer:
        csrf = secrets.token_urlsafe(24)
        e = html.escape
        note = f'<p class="badge critical">{e(message)}</p>' if message else ""
        body = _page(
            "gradwatch: log in",
            f"{note}<p>This server's pages need a token with <code>api: true</code> (the one the CLI takes with "
            "<code>--token</code>). It is sent once; a cookie keeps you signed in for "
            f"{SESSION_TTL_S / 3600:g} hours.</p>"
            f'<form method="post" action="login"><input type="hidden" name="csrf" value="{e(csrf)}">'
            f'<input type="hidden" name="next" value="{e(target)}">'
            '<label>Token <input type="password" name="token" autocomplete="current-password" autofocus required>'
            '</label> <button type="submit">Log in</button></form>',
        )
        return Answer(status, body, _NO_STORE, (self._cookie(self.csrf_cookie, csrf, 3600),), form=True)

    def _logout_form(self, status: int = 200, message: str = "") -> Answer:
        csrf = secrets.token_urlsafe(24)
        note = f'<p class="badge critical">{html.escape(message)}</p>' if message else ""
        body = _page(
            "gradwatch: log out",
            f'{note}<form method="post" action="logout"><input type="hidden" name="csrf" value="{html.escape(csrf)}">'
            '<button type="submit">Log out</button></form><p><a href="./">Overview</a></p>',
        )
        return Answer(status, body, _NO_STORE, (self._cookie(self.csrf_cookie, csrf, 3600),), form=True)

    def _cookie(self, name: str, value: str, max_age: float) -> str:
        jar: SimpleCookie = SimpleCookie()
        jar[name] = value
        morsel = jar[name]
        morsel["path"] = "/"
        morsel["httponly"] = True
        morsel["samesite"] = "Strict"
        morsel["max-age"] = str(int(max_age))
        if self._secure:
            morsel["secure"] = True
        return morsel.OutputString()


def _key(digest: str) -> bytes | None:
    """A session key from its hex digest, or None when it is not one."""
    if len(digest) != 64:
        return None
    try:
        return bytes.fromhex(digest)
    except ValueError:
        return None


def safe_next(value: str) -> str:
    """`value` as a page path relative to the server's root ("", "?run=x", "incidents/ID?..."), or "" when it is
    anything else (another host, another route, control characters): the login never redirects elsewhere."""
    value = value.removeprefix("/")
    if len(value) > MAX_NEXT_CHARS or not value.isprintable() or not _NEXT.fullmatch(value):
        return ""
    return value


def _query_value(raw_path: str, name: str) -> str:
    _, _, query = raw_path.partition("?")
    values = parse_qs(query, max_num_fields=16).get(name)
    return values[-1] if values else ""


def _form_fields(body: bytes) -> dict[str, str]:
    if len(body) > MAX_FORM_BYTES:
        return {}
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[-1] for k, v in fields.items()}


def _redirect(location: str, *cookies: str) -> Answer:
    return Answer(303, b"", {**_NO_STORE, "Location": location.replace('"', "%22").replace("'", "%27")}, cookies)


def _bounce(target: str) -> bytes:
    url = html.escape(target.replace('"', "%22").replace("'", "%27"))
    refresh = f'<meta http-equiv="refresh" content="0;url={url}">'
    return _page("gradwatch: log in", f'<p>This page needs a login: <a href="{url}">log in</a>.</p>', head=refresh)


def _page(title: str, content: str, *, head: str = "") -> bytes:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{head}<title>{html.escape(title)}</title>'
        f"<style>{PAGE_CSS}</style></head><body><main><h1>{html.escape(title)}</h1>{content}</main></body></html>"
    ).encode()
