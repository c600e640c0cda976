"""An incident id prefix over one replica and over several: it names the one incident it matches wherever that is
held, and a prefix of several incidents (on one replica, or spread over replicas) answers 409 with the candidates
(API, HTML page, CLI), never one of them picked by which replica answered first.

Real in-process servers (ServerApp, HTTP on real ports) with `cluster.peers` naming all of them; incidents are
written into each replica's own database, drawn by hypothesis so that prefixes collide on one replica and across.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.server.app import ServerApp
from gradwatch.server.config import ClusterConfig, HttpConfig
from gradwatch.server.database import MAX_CANDIDATES
from paging_support import released_port
from server_support import http_get, server_config

REPLICAS = 3
_families = itertools.count(0x1000)


def _incident(ident: str, replica: int) -> dict[str, Any]:
    return {"id": ident, "run": f"run-{replica}", "detector": "non_finite", "severity": "critical",
            "alert_id": f"alert-{ident}", "step": 1, "opened_at": 1.0, "status": "complete"}  # fmt: skip


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ServerApp]]:
    ports = [released_port() for _ in range(REPLICAS)]
    peers = tuple(f"127.0.0.1:{port}" for port in ports)
    apps: list[ServerApp] = []
    try:
        for port in ports:
            config = dataclasses.replace(server_config(), http=HttpConfig(host="127.0.0.1", port=port),
                                         cluster=ClusterConfig(peers=peers))  # fmt: skip
            apps.append(ServerApp(config).start())
        yield apps
    finally:
        for app in apps:
            app.stop()


def _expected(held: set[str], wanted: str) -> tuple[int, list[str]]:
    """What any replica must answer for `wanted` over the incidents `held` by all of them together."""
    if wanted in held:
        return 200, [wanted]
    matches = sorted(i for i in held if i.startswith(wanted)) if len(wanted) >= 4 else []
    if len(matches) > 1:
        return 409, matches[:MAX_CANDIDATES]
    return (200, matches) if matches else (404, [])


#: Ids of one example: its own 4-hex family (no other example's ids share it) and 8 digits from a 2-letter
#: alphabet, so that prefixes collide often, on one replica and across replicas.
_tails = st.text(alphabet="ab", min_size=8, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    placed=st.lists(st.tuples(_tails, st.sets(st.integers(0, REPLICAS - 1), min_size=1)), min_size=1, max_size=14),
    asked=st.integers(0, REPLICAS - 1),
    cut=st.integers(0, 8),
    pick=st.integers(0, 1000),
)
def test_a_prefix_names_the_one_incident_it_matches_on_any_replica_or_all_candidates(
    replicas: list[ServerApp], placed: list[tuple[str, set[int]]], asked: int, cut: int, pick: int
) -> None:
    family = f"{next(_families):04x}"
    held: set[str] = set()
    for tail, where in placed:  # an incident may be held by two replicas at once (a run that moved)
        ident = family + tail
        held.add(ident)
        for replica in where:
            replicas[replica].database.put_incident(_incident(ident, replica), ident.encode())
    base = sorted(held)[pick % len(held)]
    wanted = base[: 4 + cut]
    status, _, body = http_get(f"{replicas[asked].http_url}/api/v1/incidents/{wanted}")
    expected_status, expected_ids = _expected(held, wanted)
    answer = json.loads(body)
    assert status == expected_status, (wanted, sorted(held), answer)
    if status == 200:
        assert answer["incident"]["id"] == expected_ids[0]
        # The window is read by the whole id, from whichever replica holds it.
        status, _, window = http_get(f"{replicas[asked].http_url}/api/v1/incidents/{wanted}/window")
        assert (status, window) == (200, expected_ids[0].encode())
    else:
        assert answer["candidates"] == expected_ids and all(i in answer["error"] for i in expected_ids)
        status, _, window = http_get(f"{replicas[asked].http_url}/api/v1/incidents/{wanted}/window")
        assert status == 409 and json.loads(window)["candidates"] == expected_ids


def test_an_ambiguous_prefix_is_a_page_of_links_and_a_cli_error_naming_the_candidates(
    replicas: list[ServerApp],
) -> None:
    a, b = "fee1" + "00000001", "fee1" + "00000002"  # one on replica 0, one on replica 1
    replicas[0].database.put_incident(_incident(a, 0), b"wa")
    replicas[1].database.put_incident(_incident(b, 1), b"wb")
    status, content_type, page = http_get(f"{replicas[2].http_url}/incidents/fee1")
    assert status == 409 and content_type.startswith("text/html")
    assert f'href="{a}"' in page.decode() and f'href="{b}"' in page.decode()
    # Each link, resolved against the page's address, is that incident's page (through replica 2).
    for ident in (a, b):
        status, _, _ = http_get(f"{replicas[2].http_url}/api/v1/incidents/{ident}")
        assert status == 200
    shown = subprocess.run([sys.executable, "-m", "gradwatch.cli", "incidents", "show", "fee1",
                            "--server", replicas[2].http_url], capture_output=True, text=True)  # fmt: skip
    assert shown.returncode != 0 and a in shown.stderr and b in shown.stderr, shown
    # The whole id names one.
    shown = subprocess.run([sys.executable, "-m", "gradwatch.cli", "incidents", "show", b,
                            "--server", replicas[0].http_url, "--json"], capture_output=True, text=True)  # fmt: skip
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == b, shown
