"""`gradwatch top`: a live terminal view of runs and ranks, redrawn in place with ANSI escapes.

One GET /api/v1/runs per refresh. Each run shows a header line (job, state, step, loss, global gradient
norm, firing alerts) and one line per rank (step, loss, gradient norm, step time, connected, last report).
Columns are dropped, least important first, until a line fits the terminal; lines beyond its height are
summarised. When the server goes away the last data stays on screen, marked stale, and `top` keeps retrying.
`q` or Ctrl-C quits; `--once` prints one frame without screen control (for scripts and pipes).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import select
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from gradwatch.client import ApiClient, ApiError, terminal_safe
from gradwatch.commands import loss_text

__all__ = ["Column", "render_frame", "run_top"]

BOLD, DIM, RED, GREEN, RESET = "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[0m"
HOME, CLEAR_EOL, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
ENTER, LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"  # alternate screen, cursor hidden


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    priority: int  # lower survives longer on a narrow terminal
    key: str


RANK_COLUMNS = (
    Column("RANK", 6, 0, "rank"),
    Column("STEP", 9, 0, "step"),
    Column("LOSS", 10, 1, "loss"),  # widened to fit a non-finite loss's state when there is one
    Column("GRAD_NORM", 10, 1, "grad_norm"),
    Column("STEP_TIME", 10, 2, "step_duration"),
    Column("CONN", 5, 3, "connected"),
    Column("LAST_REPORT", 12, 4, "last_report_at"),
    Column("HOST", 16, 5, "host"),
)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _cell(rank: dict[str, Any], key: str, now: float) -> str:
    value = rank.get(key)
    if key == "step_duration" and value is not None:
        return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"
    if key == "loss":
        return loss_text(rank)
    if key == "last_report_at":
        return "-" if value is None else f"{max(0.0, now - value):.0f}s ago"
    return _num(value) if key != "host" else str(value or "-")


def _loss_width(columns: Sequence[Column], runs: list[dict[str, Any]]) -> list[Column]:
    """The LOSS column as wide as the longest non-finite state of any rank shown, so it is never clipped."""
    texts = [loss_text(rank) for run in runs for rank in run["ranks"] if rank.get("loss_non_finite")]
    width = max((len(t) + 1 for t in texts), default=0)
    return [Column(c.title, max(c.width, width), c.priority, c.key) if c.key == "loss" else c for c in columns]


def fit_columns(columns: Sequence[Column], width: int) -> list[Column]:
    """The columns that fit in `width`, dropping the least important (highest priority number) first."""
    kept = list(columns)
    while kept and sum(c.width for c in kept) > width and max(c.priority for c in kept) > 0:
        worst = max(c.priority for c in kept)
        kept.remove(next(c for c in reversed(kept) if c.priority == worst))
    return kept


def render_frame(
    runs: list[dict[str, Any]] | None,
    *,
    width: int,
    height: int,
    server: str,
    error: str | None,
    now: float,
    fetched_at: float | None,
    colour: bool,
) -> list[str]:
    """The lines of one frame, each at most `width` characters (escape codes not counted)."""

    def paint(text: str, style: str) -> str:
        text = _clip(terminal_safe(text), width)  # agents' strings (host, run id) reach the terminal
        return f"{style}{text}{RESET}" if colour and style else text

    clock = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%H:%M:%S UTC")
    runs = runs or []
    firing = sum(len(r["firing"]) for r in runs)
    lines = [paint(f"gradwatch top  {server}  {clock}  {len(runs)} runs, {firing} firing", BOLD)]
    if error is not None:
        since = (
            ""
            if fetched_at is None
            else ", data below from " + datetime.datetime.fromtimestamp(fetched_at, datetime.UTC).strftime("%H:%M:%S")
        )
        lines.append(paint(f"server unreachable: {error} (retrying{since})", RED))
    else:
        lines.append("")
    columns = fit_columns(_loss_width(RANK_COLUMNS, runs), width - 2)
    order = sorted(runs, key=lambda r: (not r["firing"], -(r["last_seen"] or 0)))
    body: list[str] = []
    for run in order:
        head = (
            f"{run['run']}  job {run['job_name'] or '-'}  {run['state']}  step {_num(run['step'])}  "
            f"loss {loss_text(run, long=True)}  |g| {_num(run['grad_norm_global'] or run['grad_norm_max'])}  "
            f"ranks {run.get('ranks_total', len(run['ranks']))}/{run['world_size']}"
        )
        body.append(paint(head, BOLD))
        if run["firing"]:
            body.append(paint("  FIRING: " + ", ".join(run["firing"]), RED))
        body.append(paint(("  " + "".join(c.title.ljust(c.width) for c in columns)).rstrip(), DIM))
        for rank in run["ranks"]:
            row = ("  " + "".join(_cell(rank, c.key, now)[: c.width - 1].ljust(c.width) for c in columns)).rstrip()
            body.append(paint(row, "" if rank.get("connected") else DIM))
        body.append("")
    if not runs and error is None:
        body.append("no runs yet: attach an agent with gradwatch.attach(model, optimizer, server=...)")
    room = max(1, height - len(lines) - 1)
    if len(body) > room:
        hidden = len(body) - room + 1
        body = [*body[: room - 1], paint(f"… {hidden} more lines (a taller terminal, or --run RUN)", DIM)]
    return lines + body


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def run_top(api: ApiClient, *, interval_s: float, run: str | None, once: bool, out: TextIO) -> int:
    """Refresh every `interval_s` until q / Ctrl-C (or once); returns the exit status."""
    interval_s = max(0.1, interval_s)
    interactive = not once and out.isatty()
    colour = out.isatty() and os.environ.get("NO_COLOR", "") == ""
    try:
        with _screen(out, interactive), _keys(interactive) as keys:
            return _loop(api, run, once, out, interactive, colour, keys, interval_s)
    except KeyboardInterrupt:
        return 0


def _loop(
    api: ApiClient,
    run: str | None,
    once: bool,
    out: TextIO,
    interactive: bool,
    colour: bool,
    keys: int | None,
    interval_s: float,
) -> int:
    runs: list[dict[str, Any]] | None = None
    fetched_at: float | None = None
    while True:
        error = None
        try:
            fetched = api.get("runs")["runs"]
            runs = [r for r in fetched if run is None or r["run"] == run]
            fetched_at = time.time()
        except ApiError as exc:
            error = str(exc)
        size = shutil.get_terminal_size((100, 40))
        lines = render_frame(
            runs,
            width=max(20, size.columns),
            height=max(5, size.lines),
            server=api.base_url,
            error=error,
            now=time.time(),
            fetched_at=fetched_at,
            colour=colour,
        )
        if not interactive:
            out.write("\n".join(lines) + "\n")
            out.flush()
            if once:
                return 0 if error is None else 1
        else:
            out.write(HOME + "".join(line + CLEAR_EOL + "\r\n" for line in lines[:-1]) + lines[-1] + CLEAR_EOL)
            out.write(CLEAR_BELOW)
            out.flush()
        if _wait_for_quit(keys, interval_s):
            return 0


@contextlib.contextmanager
def _screen(out: TextIO, interactive: bool) -> Iterator[None]:
    if interactive:
        out.write(ENTER)
        out.flush()
    try:
        yield
    finally:
        if interactive:
            out.write(LEAVE)
            out.flush()


@contextlib.contextmanager
def _keys(interactive: bool) -> Iterator[int | None]:
    """stdin in cbreak mode (keys without Enter) while the view runs, when it is a terminal."""
    if not interactive or not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(fd: int | None, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for a key; True when it is q or Q."""
    if fd is None:
        time.sleep(timeout_s)
        return False
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            key = os.read(fd, 1)
            if key in (b"q", b"Q") or not key:
                return True
    return False
