"""`gradwatch top` in a real pseudo-terminal (decoded by pyte) against a server watching a live training run."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator

import pyte
import pytest

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402
from gradwatch.demo import DemoTraining  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402
from gradwatch.top import RANK_COLUMNS, fit_columns, render_frame  # noqa: E402

WAIT_S = 30.0


class Terminal:
    """`gradwatch top` on the slave side of a pty of `columns` × `rows`; the screen as pyte decodes it."""

    def __init__(self, url: str, columns: int, rows: int) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gradwatch", "top", "--server", url, "--interval", "0.2"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**env, "TERM": "xterm"},
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.screen = pyte.Screen(columns, rows)
        self.stream = pyte.ByteStream(self.screen)

    @property
    def text(self) -> str:
        return "\n".join(self.screen.display)

    def wait_for(self, what: str, predicate: Callable[[str], bool], timeout: float = WAIT_S) -> str:
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            left = deadline - time.monotonic()
            assert left > 0, f"screen never showed {what}:\n{self.text}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.stream.feed(os.read(self.master, 65536))
                except OSError:  # the process exited and closed the pty
                    assert predicate(self.text), f"top exited before showing {what}:\n{self.text}"
        return self.text

    def quit(self) -> int:
        os.write(self.master, b"q")
        try:
            return self.proc.wait(timeout=WAIT_S)
        finally:
            os.close(self.master)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT_S)


@pytest.fixture
def app() -> Iterator[ServerApp]:
    server = ServerApp(ServerConfig.local()).start()
    yield server
    server.stop()


def test_top_shows_a_live_run_refreshing_in_place(app: ServerApp) -> None:
    training = DemoTraining(seed=4)
    monitor = gradwatch.attach(
        training.model, training.optimizer, run="live-run", job_name="demo-job", server=app.grpc_target
    )
    terminal = Terminal(app.http_url, 110, 24)
    try:
        for _ in range(30):
            monitor.step(training.step())
        terminal.wait_for("step 30", lambda s: "live-run  job demo-job  active  step 30 " in s)
        header = next(line for line in terminal.screen.display if "RANK" in line)
        assert header.split() == ["RANK", "STEP", "LOSS", "GRAD_NORM", "STEP_TIME", "CONN", "LAST_REPORT", "HOST"]
        for _ in range(30):
            monitor.step(training.step())
        # The whole frame of step 60 (a read can end inside a frame: the header may be there before the rows).
        screen = terminal.wait_for(
            "step 60", lambda s: "step 60 " in s and any(ln.split()[:2] == ["0", "60"] for ln in s.splitlines())
        )
        assert "step 30 " not in screen  # redrawn in place, not appended
        assert screen.count("live-run") == 1
        rank_row = next(line for line in terminal.screen.display if line.split()[:2] == ["0", "60"])
        assert " yes " in rank_row and " ms " in rank_row
        monitor.step(training.step("nan"))
        terminal.wait_for(
            "the firing alert", lambda s: any("FIRING:" in line and "non_finite" in line for line in s.splitlines())
        )
        assert terminal.quit() == 0
    finally:
        terminal.kill()
        monitor.close(timeout=5)


def test_top_fits_a_narrow_terminal_and_survives_the_server_going_away(app: ServerApp) -> None:
    training = DemoTraining(seed=5)
    monitor = gradwatch.attach(training.model, training.optimizer, run="narrow", server=app.grpc_target)
    terminal = Terminal(app.http_url, 40, 12)
    try:
        for _ in range(5):
            monitor.step(training.step())
        terminal.wait_for("the run", lambda s: "step 5 " in s)
        header = next(line for line in terminal.screen.display if "RANK" in line)
        assert header.split() == ["RANK", "STEP", "LOSS", "GRAD_NORM"]  # the rest dropped, least important first
        assert all(len(line.rstrip()) <= 40 for line in terminal.screen.display)
        monitor.close(timeout=5)
        app.stop()
        screen = terminal.wait_for("the outage", lambda s: "server unreachable" in s)
        assert "narrow" in screen  # the last data stays on screen
        assert terminal.proc.poll() is None  # still retrying
        assert terminal.quit() == 0
    finally:
        terminal.kill()
        monitor.close(timeout=1)


def test_top_frame_summarises_lines_beyond_the_terminal_height() -> None:
    runs = [
        {
            "run": f"r{i}",
            "job_name": "",
            "state": "active",
            "step": i,
            "loss": 1.0,
            "grad_norm_global": None,
            "grad_norm_max": 2.0,
            "world_size": 1,
            "firing": [],
            "last_seen": 1.0,
            "ranks": [{"rank": 0, "step": i, "connected": True}],
        }
        for i in range(10)
    ]
    lines = render_frame(
        runs, width=60, height=12, server="http://x", error=None, now=2.0, fetched_at=2.0, colour=False
    )
    assert len(lines) <= 12 and lines[-1].startswith("… ") and all(len(line) <= 60 for line in lines)
    assert [c.title for c in fit_columns(RANK_COLUMNS, 30)] == ["RANK", "STEP", "LOSS"]
