"""Regenerate the README's screenshots: docs/images/incident-report.png and docs/images/top.png.

Runs a real server and real (small, CPU) training runs: "lm-pretrain" with two ranks whose rank 1's gradients
explode at step 100, and "finetune-b", healthy and still running. Then it writes the incident's HTML report
and screenshots it in headless Chromium, and renders one `gradwatch top` frame through a terminal emulator
(pyte) into the same browser. Needs the dev extra and Debian's chromium (scripts/install-dev.sh).

    .venv/bin/python scripts/make_screenshots.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import html
import io
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # browser_support: the same Chromium driver the tests use

import pyte  # noqa: E402
from PIL import Image  # noqa: E402

import gradwatch  # noqa: E402
from browser_support import Browser  # noqa: E402
from gradwatch.client import ApiClient  # noqa: E402
from gradwatch.demo import DemoTraining  # noqa: E402
from gradwatch.incident_report import write_report  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402
from gradwatch.top import render_frame  # noqa: E402

TERMINAL_COLUMNS, TERMINAL_ROWS = 104, 22
COLOURS = {"red": "#e06c75", "green": "#98c379", "default": "#d7dae0"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    out = pathlib.Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    app = ServerApp(ServerConfig.local()).start()
    try:
        api = ApiClient(app.http_url)
        healthy = DemoTraining(seed=3)
        side = gradwatch.attach(
            healthy.model, healthy.optimizer, run="finetune-b", job_name="finetune", server=app.grpc_target
        )
        ranks = [DemoTraining(seed=10 + r) for r in range(2)]
        monitors = [
            gradwatch.attach(
                t.model,
                t.optimizer,
                run="lm-pretrain",
                job_name="lm",
                rank=r,
                world_size=2,
                server=app.grpc_target,
                overhead_budget=0,
            )
            for r, t in enumerate(ranks)
        ]
        for step in range(1, 141):
            for rank, (training, monitor) in enumerate(zip(ranks, monitors, strict=True)):
                monitor.step(training.step("explode" if rank == 1 and step == 100 else "none"))
            side.step(healthy.step())
        for monitor in monitors:
            monitor.close(timeout=10)
        incident = _wait_incident(api)
        report = pathlib.Path(tempfile.mkdtemp()) / "incident.html"
        write_report(api, incident, str(report))
        frame = render_frame(
            api.get("runs")["runs"],
            width=TERMINAL_COLUMNS,
            height=TERMINAL_ROWS,
            server=app.http_url,
            error=None,
            now=time.time(),
            fetched_at=time.time(),
            colour=True,
        )
        terminal = report.with_name("top.html")
        terminal.write_text(_terminal_html(frame))
        with Browser() as browser:
            page = browser.new_page()
            page.open(report.as_uri())
            assert page.errors == [], page.errors
            _save(page.screenshot(), out / "incident-report.png", max_height=2400)
            page = browser.new_page()
            page.open(terminal.as_uri(), width=TERMINAL_COLUMNS * 9 + 40, height=TERMINAL_ROWS * 18 + 40)
            _save(page.screenshot(), out / "top.png", max_height=None)
        side.close(timeout=5)
    finally:
        app.stop()
    print(f"wrote {out / 'incident-report.png'} and {out / 'top.png'}")
    return 0


def _wait_incident(api: ApiClient) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = api.get("incidents", detector="exploding_gradient")["incidents"]
        if found and found[0]["status"] == "complete":
            return str(found[0]["id"])
        time.sleep(0.1)
    raise RuntimeError("no exploding_gradient incident was recorded")


def _terminal_html(lines: list[str]) -> str:
    """The frame as a terminal shows it: decoded by pyte, drawn as coloured monospace text."""
    screen = pyte.Screen(TERMINAL_COLUMNS, TERMINAL_ROWS)
    pyte.Stream(screen).feed("\r\n".join(lines))
    rows = []
    for y in range(TERMINAL_ROWS):
        cells = []
        for x in range(TERMINAL_COLUMNS):
            char = screen.buffer[y][x]
            style = f"color:{COLOURS.get(char.fg, COLOURS['default'])}"
            style += ";font-weight:bold" if char.bold else ""
            cells.append(f'<span style="{style}">{html.escape(char.data)}</span>')
        rows.append("".join(cells))
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><style>body{margin:0;background:#282c34}'
        "pre{margin:0;padding:20px;font:15px/18px 'DejaVu Sans Mono',monospace;color:#d7dae0}</style></head>"
        f"<body><pre>{chr(10).join(rows)}</pre></body></html>"
    )


def _save(png: bytes, path: pathlib.Path, *, max_height: int | None) -> None:
    image = Image.open(io.BytesIO(png))
    if max_height is not None and image.height > max_height:
        image = image.crop((0, 0, image.width, max_height))
    image.save(path, optimize=True)


if __name__ == "__main__":
    sys.exit(main())
