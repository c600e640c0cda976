"""The server's console: log lines with a UTC timestamp, level and logger, as text or one JSON object a line.

    configure("text")   2026-12-07T03:20:01.123Z INFO  gradwatch.server.app: listening ...
    configure("json")   {"time": "2026-12-07T03:20:01.123Z", "level": "INFO", "logger": "gradwatch.server.app",
                         "message": "listening ...", "exception": "Traceback ..."}   (exception only when there is one)

`gradwatch serve` calls `configure()` once (`--log-format`, `GRADWATCH_LOG_FORMAT`; `--log-level`,
`GRADWATCH_LOG_LEVEL`); an embedded ServerApp leaves logging to its host program. Handlers write to stderr.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import TextIO

__all__ = ["FORMATS", "LEVELS", "configure"]

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<5} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(fmt: str = "text", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send the root logger's records at `level` and above to `stream` (stderr) in `fmt`; ValueError naming
    the bad value otherwise. Replaces handlers installed before (idempotent)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if level.upper() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
