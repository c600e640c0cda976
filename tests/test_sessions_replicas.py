"""The pages' login sessions across replicas: two `gradwatch serve` replicas with `cluster.peers`, a tokens file
and the cluster token. Signed in through one, a person reaches the other's pages with the same cookie (as behind
one Service); a logout through either ends the session on both; a session whose replica stopped ends.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from relay_support import QUIET_YAML, Serve, serve_peers

ONCALL, PEERS = "oncall-secret-0123456789", "peers-secret-0123456789"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _open(server: Serve, path: str, cookie: str = "", form: dict[str, str] | None = None,
          token: str = "", method: str | None = None) -> tuple[int, Any]:  # fmt: skip
    headers = {**({"Cookie": cookie} if cookie else {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    data = None if form is None else urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(server.http_url + path, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(request, timeout=30) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


def _login(server: Serve) -> str:
    _, headers = _open(server, "/login")
    csrf_cookie = headers["Set-Cookie"].split(";")[0]
    status, headers = _open(server, "/login", csrf_cookie, {"token": ONCALL, "csrf": csrf_cookie.split("=", 1)[1]})
    assert status == 303
    (session,) = [c.split(";")[0] for c in headers.get_all("Set-Cookie") if c.startswith("gradwatch_session=")]
    return session


def _logout(server: Serve, session: str) -> None:
    _, headers = _open(server, "/logout", session)
    csrf_cookie = headers["Set-Cookie"].split(";")[0]
    status, _ = _open(server, "/logout", f"{session}; {csrf_cookie}", {"csrf": csrf_cookie.split("=", 1)[1]})
    assert status == 303


@pytest.mark.timeout(180)
def test_a_session_opened_on_one_replica_opens_the_others_pages_and_one_logout_ends_it_everywhere(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f'tokens: [{{name: oncall, token: "{ONCALL}", api: true}}, '
                      f'{{name: peers, token: "{PEERS}", api: true}}]\n')  # fmt: skip
    (tmp_path / "peers.token").write_text(PEERS + "\n")
    config = QUIET_YAML + f"auth: {{tokens_file: '{tokens}'}}\n"
    a, b = serve_peers(tmp_path, "ab", config=config, cluster=f"token_file: '{tmp_path / 'peers.token'}'")
    try:
        assert _open(b, "/")[0] == 401  # no cookie: the login
        first = _login(a)
        for server in (a, b):  # the same cookie, whichever replica the Service picks
            assert _open(server, "/", first)[0] == 200
            assert _open(server, "/api/v1/runs", first)[0] == 401  # a cookie never opens the API
        assert _open(b, "/", "gradwatch_session=forged-value")[0] == 401
        # A peer answers for a session by its digest only to a caller with an API token.
        assert _open(a, "/api/v1/sessions/" + "0" * 64 + "?local=1")[0] == 401
        assert _open(a, "/api/v1/sessions/" + "0" * 64 + "?local=1", token=PEERS)[0] == 404
        # Logged out through B (which only borrowed it): ended on A, which held it, and on B.
        _logout(b, first)
        for server in (a, b):
            assert _open(server, "/", first)[0] == 401
        # Opened on B, then B stops: its sessions end with it, on A too (A has not borrowed it yet, so at once;
        # a session A borrowed ends there within BORROW_TTL_S).
        second = _login(b)
        assert b.stop() == 0
        assert _open(a, "/", second)[0] == 401
        assert _open(a, "/", _login(a))[0] == 200  # A's own sessions are unaffected
    finally:
        a.stop()
        b.stop()
