"""The HTML pages over every replica, in headless Chromium: two `gradwatch serve` replicas with `cluster.peers` naming
both; replica A's overview shows B's runs and firing alerts, its links to B's run and incident work through A, and
with B stopped (paused, then gone) A's overview still renders within the fan-out's deadline and names B. And the
overview's choice of runs when it holds more than it shows.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from browser_support import Browser, Page
from gradwatch.server.fanout import FANOUT_TIMEOUT_S
from gradwatch.server.pages import RUNS_SHOWN
from relay_support import Serve, serve_peers
from server_support import http_get, server_config, short_run, start_app
from wait_support import wait_until

#: A run name that would inject markup if a page did not escape what a peer answered, and break a URL that
#: was not quoted on its way to the peer.
HOSTILE_RUN = "<b id=injected>calm b?#"
INJECTED_JS = "JSON.stringify({scripts: document.scripts.length, injected: !!document.getElementById('injected')})"
SECTIONS_JS = "[...document.querySelectorAll('section')].map(s => s.id).join(',')"
#: Every link in a section: [text, href], hrefs resolved by the browser against the page's address.
LINKS_JS = "JSON.stringify([...document.querySelectorAll('#%s a')].map(a => [a.textContent, a.href]))"
#: The firing alerts' table: one [run, detector, incident link] per row.
FIRING_JS = """JSON.stringify([...document.querySelectorAll('#firing tbody tr')].map(tr => [
  tr.cells[2].textContent, tr.cells[1].textContent, (tr.querySelector('a[href^="incidents/"]') || {}).href || '']))"""
#: Longest an overview may take with a replica that accepts connections and never answers: one fan-out deadline
#: (FANOUT_TIMEOUT_S + 1 s for all its questions at once) and the page's own work; asked one after another, the
#: overview's three questions alone would take three deadlines.
OVERVIEW_BOUND_S = 2 * (FANOUT_TIMEOUT_S + 1)


def _incidents(server: Serve) -> list[dict[str, Any]]:
    return list(server.get("/api/v1/incidents?local=1")["incidents"])


def _rows(page: Page) -> list[str]:
    return list(page.evaluate("[...document.querySelectorAll('#runs tbody tr')].map(tr => tr.cells[0].textContent)"))


def _clean(page: Page) -> None:
    assert page.errors == []
    assert json.loads(page.evaluate(INJECTED_JS)) == {"scripts": 0, "injected": False}


def _timed_open(page: Page, url: str) -> float:
    started = time.monotonic()
    page.open(url)
    return time.monotonic() - started


@pytest.mark.timeout(300)
def test_any_replicas_pages_show_every_replica_and_name_the_one_not_answering(tmp_path: Path) -> None:
    a, b = serve_peers(tmp_path, "ab")
    paused = False
    try:
        short_run(a.grpc_target, "nan-a", nan_at=5)
        short_run(b.grpc_target, "nan-b", nan_at=5)
        short_run(b.grpc_target, HOSTILE_RUN)
        for server in (a, b):  # each replica's incident written (window included) before the pages are read
            wait_until(lambda s=server: _incidents(s), 30, what="an incident", interval=0.1)  # type: ignore[misc]
        (incident_b,) = _incidents(b)
        # What the overview asks each replica: every run, without its rank list, the connected count kept.
        (run,) = a.get("/api/v1/runs?run=nan-b&ranks=0")["runs"]
        assert (run["ranks"], run["ranks_total"], run["ranks_connected"]) == ([], 1, 0)  # its stream has closed
        assert a.get("/api/v1/runs?limit=1")["total"] == 3  # counted on every replica, not just the page asked
        hostile = urllib.parse.quote(HOSTILE_RUN, safe="")
        assert a.get(f"/api/v1/runs/{hostile}")["run"]["run"] == HOSTILE_RUN
        assert [r["rank"] for r in a.get(f"/api/v1/runs/{hostile}/ranks")["ranks"]] == [0]
        with Browser() as browser:
            page = browser.new_page()
            page.open(a.http_url + "/")
            _clean(page)
            assert page.evaluate(SECTIONS_JS) == "firing,runs,incidents"
            assert sorted(_rows(page)) == sorted(["nan-a", "nan-b", HOSTILE_RUN])
            assert "3 runs, 2 alerts firing, 2 incidents recorded · 2 replicas answered" in page.evaluate(
                "document.querySelector('p.muted').textContent")
            firing = json.loads(page.evaluate(FIRING_JS))
            assert sorted(row[:2] for row in firing) == [["nan-a", "non_finite"], ["nan-b", "non_finite"]]
            # B's alert links to B's incident on A; following it renders B's report, drawn, served by A.
            (link,) = [row[2] for row in firing if row[0] == "nan-b"]
            assert link == f"{a.http_url}/incidents/{incident_b['id']}"
            page.open(link)
            _clean(page)
            assert "non_finite on run nan-b" in page.evaluate("document.querySelector('h1').textContent")
            assert page.evaluate("document.querySelectorAll('svg.plot').length") >= 1
            assert http_get(link)[2] == http_get(f"{b.http_url}/incidents/{incident_b['id']}")[2]  # B's own report
            assert page.evaluate("document.querySelector('a').href") == a.http_url + "/"
            # B's run: its link on A's overview narrows A's overview to it, alerts and incidents included.
            page.open(a.http_url + "/")
            (run_link,) = [href for text, href in json.loads(page.evaluate(LINKS_JS % "runs")) if text == "nan-b"]
            assert run_link == f"{a.http_url}/?run=nan-b"
            page.open(run_link)
            _clean(page)
            assert _rows(page) == ["nan-b"]
            assert [row[:2] for row in json.loads(page.evaluate(FIRING_JS))] == [["nan-b", "non_finite"]]
            incident_links = json.loads(page.evaluate(LINKS_JS % "incidents"))
            assert incident_links[0] == [incident_b["id"], link], incident_links
            page.open(incident_links[0][1])
            _clean(page)
            assert "non_finite on run nan-b" in page.evaluate("document.querySelector('h1').textContent")
            # The run of hostile name, listed by B, stays text on A's pages.
            query = urllib.parse.urlencode({"run": HOSTILE_RUN})
            page.open(f"{a.http_url}/?{query}")
            _clean(page)
            assert _rows(page) == [HOSTILE_RUN]
            # The link alerts carry (they know labels, not ids) finds B's incident through A.
            latest = urllib.parse.urlencode({"run": "nan-b", "detector": "non_finite"})
            status, _, body = http_get(f"{a.http_url}/incidents/latest?{latest}")
            assert status == 200 and incident_b["id"].encode() in body

            # B paused: it accepts connections and never answers. A's pages still render within one deadline.
            os.kill(b.proc.pid, signal.SIGSTOP)
            paused = True
            took = _timed_open(page, a.http_url + "/")
            _clean(page)
            assert took < OVERVIEW_BOUND_S, took
            assert page.evaluate(SECTIONS_JS) == "unreachable,firing,runs,incidents"
            assert b.http_address in page.evaluate("document.getElementById('unreachable').textContent")
            assert _rows(page) == ["nan-a"]
            assert "1 replicas answered" in page.evaluate("document.querySelector('p.muted').textContent")
            started = time.monotonic()
            status, _, body = http_get(link)
            assert time.monotonic() - started < OVERVIEW_BOUND_S
            assert status == 404 and f"not answering: {b.http_address}".encode() in body
            os.kill(b.proc.pid, signal.SIGCONT)
            paused = False
            # B gone: refused at once, named the same way.
            assert b.stop() == 0
            page.open(a.http_url + "/")
            _clean(page)
            assert b.http_address in page.evaluate("document.getElementById('unreachable').textContent")
            assert _rows(page) == ["nan-a"]
    finally:
        if paused:
            os.kill(b.proc.pid, signal.SIGCONT)
        assert a.stop() == 0
        b.stop()


def test_overview_lists_firing_runs_first_and_says_what_it_leaves_out() -> None:
    """More runs than the overview shows: the firing one, seen longest ago, is still listed, and the page says how
    many it shows of how many."""
    app = start_app(server_config())
    try:
        short_run(app.grpc_target, "oldest-firing", nan_at=5)
        for i in range(RUNS_SHOWN):
            short_run(app.grpc_target, f"calm-{i:03d}")
        with Browser() as browser:
            page = browser.new_page()
            page.open(app.http_url + "/")
            _clean(page)
            rows = _rows(page)
            note = page.evaluate("document.querySelector('#runs p').textContent")
    finally:
        app.stop()
    assert len(rows) == RUNS_SHOWN and rows[0] == "oldest-firing"
    assert rows[1:] == [f"calm-{i:03d}" for i in reversed(range(1, RUNS_SHOWN))]  # most recently seen first
    assert note == f"{RUNS_SHOWN} of {RUNS_SHOWN + 1} shown, firing first, then most recently seen."


def _accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the socket listening on `port` (Linux: a listening socket's
    rx_queue in /proc/net/tcp*)."""
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                    waiting += int(fields[4].split(":")[1], 16)
    return waiting


def _slow_get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=OVERVIEW_BOUND_S) as response:
        return int(response.status)


@pytest.mark.timeout(120)
def test_a_scrape_is_answered_while_every_view_thread_waits_on_a_hung_replica(tmp_path: Path) -> None:
    import concurrent.futures

    from gradwatch.server.http_api import VIEW_THREADS

    a, b = serve_peers(tmp_path, "ab")
    os.kill(b.proc.pid, signal.SIGSTOP)  # B accepts connections (the kernel does) and never answers
    try:
        with concurrent.futures.ThreadPoolExecutor(VIEW_THREADS) as pool:
            pages = [pool.submit(_slow_get, a.http_url + "/") for _ in range(VIEW_THREADS)]
            # Every view thread of A is waiting on B: at least one of its connections per thread sits in B's queue.
            b_port = int(b.http_address.rsplit(":", 1)[1])
            wait_until(lambda: _accept_queue(b_port) >= VIEW_THREADS, 30, what="A's views waiting on B")
            status, _, body = http_get(a.http_url + "/metrics")
            pending = sum(not page.done() for page in pages)
            assert status == 200 and b"gradwatch_alert_firing" in body
            assert pending == VIEW_THREADS  # answered while every page still waited for B
            assert [page.result() for page in pages] == [200] * VIEW_THREADS  # rendered once B's deadline passed
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
        assert a.stop() == 0
        b.stop()
