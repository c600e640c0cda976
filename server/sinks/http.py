"""POST a JSON document and classify the outcome as a sink needs it (stdlib only).

Connection problems, timeouts, 408, 429 and 5xx are retryable; every other non-2xx
status is not (the receiver rejected the payload: retrying the same bytes cannot help).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from gradwatch.server.sinks.base import DeliveryError

__all__ = ["RETRYABLE_STATUSES", "post_json", "safe_target"]

RETRYABLE_STATUSES = frozenset({408, 429})
#: Bytes of an error response quoted in the DeliveryError (receivers explain 400s in the body).
ERROR_BODY_CHARS = 300


def safe_target(url: str) -> str:
    """host:port of `url` without credentials or path: safe for metric labels and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{host}:{parts.port}" if parts.port else host


def post_json(url: str, document: Any, timeout_s: float) -> None:
    """POST `document` as JSON to `url`; DeliveryError unless the answer is 2xx."""
    body = json.dumps(document, allow_nan=False).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", "User-Agent": "gradwatch"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:ERROR_BODY_CHARS].decode(errors="replace").strip()
        retryable = exc.code >= 500 or exc.code in RETRYABLE_STATUSES
        raise DeliveryError(f"HTTP {exc.code} from {safe_target(url)}: {detail}", retryable=retryable) from None
    except (urllib.error.URLError, OSError) as exc:  # refused, reset, DNS, timeout
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"cannot reach {safe_target(url)}: {reason}", retryable=True) from None
