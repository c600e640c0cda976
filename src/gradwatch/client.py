"""A small client of the server's JSON API for the CLI (stdlib only: no torch, no numpy, no server imports).

The server's address comes from `--server URL`, else $GRADWATCH_HTTP, else `DEFAULT_SERVER`; a bearer token
(for a server with a tokens file, docs/security.md) from `--token`, else $GRADWATCH_API_TOKEN, else
$GRADWATCH_TOKEN (the agents' variable), else none. Strings in answers come from agents (host names, versions,
run ids): `terminal_safe` strips what a terminal would interpret before the CLI prints them.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_SERVER", "ENV_API_TOKEN", "ENV_HTTP", "ApiClient", "ApiError", "api_token", "server_url",
           "terminal_safe"]  # fmt: skip

ENV_HTTP = "GRADWATCH_HTTP"
ENV_API_TOKEN = "GRADWATCH_API_TOKEN"
#: The agents' token variable, used when ENV_API_TOKEN is not set (one grant may write and read).
ENV_AGENT_TOKEN = "GRADWATCH_TOKEN"
#: Escape sequences (CSI, OSC with its terminator, two-character ones) and single control or bidi characters.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
DEFAULT_SERVER = "http://localhost:9400"
TIMEOUT_S = 10.0


class ApiError(RuntimeError):
    """The server could not be reached, or answered with an error (the message says which)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def server_url(explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The API base URL: `explicit`, else $GRADWATCH_HTTP, else DEFAULT_SERVER; "host:port" gets http://."""
    env = os.environ if environ is None else environ
    url = explicit or env.get(ENV_HTTP) or DEFAULT_SERVER
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"server URL must be http(s)://HOST[:PORT], got {url!r}")
    return url.rstrip("/")


def api_token(explicit: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token: `explicit`, else $GRADWATCH_API_TOKEN, else $GRADWATCH_TOKEN, else None."""
    env = os.environ if environ is None else environ
    token = explicit or env.get(ENV_API_TOKEN) or env.get(ENV_AGENT_TOKEN) or None
    if token is not None and (not token.strip() or any(c in token for c in "\r\n")):
        raise ValueError("the API token must be one line of text")
    return token.strip() if token else None


def terminal_safe(text: object) -> str:
    """`text` as a string a terminal shows literally: escape sequences removed, other control and bidi
    characters replaced by "?"."""
    return _CONTROLS.sub("?", _ESCAPES.sub("", str(text)))


class ApiClient:
    """GETs against one server; every failure is an ApiError with a readable message."""

    def __init__(self, base_url: str, *, timeout_s: float = TIMEOUT_S, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str, **query: Any) -> Any:
        """GET /api/v1/<path> as JSON; query values that are None are left out."""
        return json.loads(self.get_bytes(path, **query))

    def get_bytes(self, path: str, **query: Any) -> bytes:
        params = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None}, doseq=True)
        url = f"{self.base_url}/api/v1/{path}" + (f"?{params}" if params else "")
        try:
            request = urllib.request.Request(url, headers=self._headers)
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                reason = exc.reason
            raise ApiError(f"{url}: {exc.code} {reason}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise ApiError(f"cannot reach the gradwatch server at {self.base_url}: {why}") from None

    def get_all(self, path: str, key: str, **query: Any) -> list[dict[str, Any]]:
        """Every item of a paginated list route, following next_offset."""
        items: list[dict[str, Any]] = []
        offset: int | None = 0
        while offset is not None:
            page = self.get(path, offset=offset, **query)
            items.extend(page[key])
            offset = page.get("next_offset")
        return items


def quote(segment: str) -> str:
    """A run or incident id as one URL path segment."""
    return urllib.parse.quote(segment, safe="")
