"""Replica choice: rendezvous hashing is stable, balanced and moves few runs; DNS names expand to sorted
addresses; with TLS the certificate is checked against the DNS name (two real TLS replicas on 127.0.0.1 and
127.0.0.2 behind one name, resolved by an in-memory resolver at the getaddrinfo seam)."""

from __future__ import annotations

import collections
import dataclasses
import random
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from gradwatch.agent.config import resolve_config
from gradwatch.agent.transport import Transport
from gradwatch.routing import Replica, ReplicaRouter, rendezvous_order
from gradwatch.server.app import ServerApp
from gradwatch.server.config import GrpcConfig
from gradwatch.v1 import gradwatch_pb2_grpc as pbg
from security_support import Pki, secure_config
from server_support import WAIT_S, acks, hello_frame, report_frame

REPLICAS = [f"gradwatch-{i}.gradwatch:50051" for i in range(4)]
KEYS = [f"run-{i}" for i in range(2000)]


def test_routing_choice_is_stable_and_ignores_list_order() -> None:
    shuffled = list(REPLICAS)
    random.Random(7).shuffle(shuffled)
    for key in KEYS[:200]:
        assert rendezvous_order(key, REPLICAS)[0] == rendezvous_order(key, shuffled)[0]
    # Pinned: the hash is not Python's per-process hash(), so every rank (and every agent version) agrees.
    pinned = [rendezvous_order(f"run-{i}", REPLICAS)[0] for i in range(8)]
    assert pinned == [REPLICAS[i] for i in (2, 2, 2, 1, 1, 3, 1, 0)]


def test_routing_spreads_runs_evenly() -> None:
    counts = collections.Counter(rendezvous_order(key, REPLICAS)[0] for key in KEYS)
    assert set(counts) == set(REPLICAS)
    share = len(KEYS) / len(REPLICAS)
    assert all(0.8 * share < n < 1.2 * share for n in counts.values()), counts


def test_routing_adding_a_replica_moves_only_the_runs_it_takes() -> None:
    grown = [*REPLICAS, "gradwatch-4.gradwatch:50051"]
    moved = [key for key in KEYS if rendezvous_order(key, REPLICAS)[0] != rendezvous_order(key, grown)[0]]
    assert all(rendezvous_order(key, grown)[0] == grown[-1] for key in moved)  # nothing reshuffles
    assert 0.15 < len(moved) / len(KEYS) < 0.25  # about 1/5 of the runs


def test_routing_removing_a_replica_moves_only_its_runs() -> None:
    shrunk = REPLICAS[1:]
    for key in KEYS[:500]:
        before = rendezvous_order(key, REPLICAS)[0]
        if before != REPLICAS[0]:
            assert rendezvous_order(key, shrunk)[0] == before


class InMemoryResolver:
    """getaddrinfo for made-up names: name -> addresses (returned in the order given)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls = 0

    def __call__(self, host: str, port: int, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.calls += 1
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        family = {True: socket.AF_INET6, False: socket.AF_INET}
        return [(family[":" in a], socket.SOCK_STREAM, 6, "", (a, port)) for a in self.table[host]]


def test_routing_dns_name_expands_to_sorted_addresses_with_the_name_for_tls() -> None:
    resolver = InMemoryResolver({"gradwatch-headless": ["10.0.0.9", "10.0.0.2", "fd00::1", "10.0.0.2"]})
    router = ReplicaRouter(["dns:///gradwatch-headless:50051"], resolve=resolver)
    assert router.replicas() == [
        Replica("10.0.0.2:50051", "gradwatch-headless"),
        Replica("10.0.0.9:50051", "gradwatch-headless"),
        Replica("[fd00::1]:50051", "gradwatch-headless"),
    ]
    reordered = ReplicaRouter(
        ["dns:///gradwatch-headless:50051"],
        resolve=InMemoryResolver({"gradwatch-headless": ["fd00::1", "10.0.0.2", "10.0.0.9"]}),
    )
    for key in KEYS[:100]:  # every rank gets its own DNS answer, in any order: same choice
        assert router.pick(key) == reordered.pick(key)


def test_routing_a_replica_leaving_dns_moves_only_its_runs() -> None:
    table = {"headless": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]}
    router = ReplicaRouter(["dns:///headless:50051"], resolve=InMemoryResolver(table))
    before = {key: router.pick(key).address for key in KEYS[:300]}
    table["headless"] = ["10.0.0.1", "10.0.0.3"]  # 10.0.0.2 is not ready any more
    for key, address in before.items():
        if address != "10.0.0.2:50051":
            assert router.pick(key).address == address
        else:
            assert router.pick(key).address in ("10.0.0.1:50051", "10.0.0.3:50051")


def test_routing_fixed_entries_are_not_resolved_and_unresolvable_names_fall_back() -> None:
    resolver = InMemoryResolver({})
    router = ReplicaRouter(["a.example:1", "b.example:1"], resolve=resolver)
    assert {r.address for r in router.replicas()} == {"a.example:1", "b.example:1"}
    assert resolver.calls == 0
    lost = ReplicaRouter(["dns:///nowhere.example:50051"], resolve=resolver)
    assert lost.pick("run") == Replica("dns:///nowhere.example:50051")  # gRPC resolves and reports it


def test_routing_servers_option_parses_lists_and_dns() -> None:
    config = resolve_config({"run": "r"}, env={"GRADWATCH_SERVERS": "h1:1, h2:2,dns:///svc.ns:50051"})
    assert config.servers == ("h1:1", "h2:2", "dns:///svc.ns:50051")
    assert resolve_config({"run": "r", "servers": ["h1:1"]}, env={}).servers == ("h1:1",)
    for bad in ("h1", "h1:1,h1:1", "dns:///svc", ""):
        with pytest.raises(ValueError, match="servers"):
            resolve_config({"run": "r", "servers": bad}, env={})


# ---------------------------------------------------------------------- DNS + TLS, real replicas


@pytest.fixture
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pki, list[ServerApp]]]:
    """Two TLS replicas on one port, 127.0.0.1 and 127.0.0.2, with a certificate for 'gradwatch-headless'."""
    pki = Pki(tmp_path_factory.mktemp("pki"))
    issued = pki.ca.issue_cert("gradwatch-headless")
    (pki.folder / "headless.pem").write_bytes(b"".join(b.bytes() for b in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(pki.folder / "headless.key"))
    tls = dataclasses.replace(
        pki.tls_config(), cert_file=str(pki.folder / "headless.pem"), key_file=str(pki.folder / "headless.key")
    )
    first = ServerApp(dataclasses.replace(secure_config(pki), tls=tls)).start()
    apps = [first]
    try:
        second = GrpcConfig(host="127.0.0.2", port=first.grpc_port)
        config = dataclasses.replace(secure_config(pki), tls=tls, grpc=second)
        try:
            apps.append(ServerApp(config).start())
        except OSError as exc:
            pytest.skip(f"cannot bind 127.0.0.2 here: {exc}")
        yield pki, apps
    finally:
        for app in apps:
            app.stop(grace=0)


def test_routing_dns_replicas_over_tls_check_the_certificate_name(tls_pair: tuple[Pki, list[ServerApp]]) -> None:
    pki, apps = tls_pair
    port = apps[0].grpc_port
    resolver = InMemoryResolver({"gradwatch-headless": ["127.0.0.2", "127.0.0.1"]})
    by_ip = {"127.0.0.1": apps[0], "127.0.0.2": apps[1]}
    seen = set()
    for run in (f"run-{i}" for i in range(12)):
        config = resolve_config(
            {"run": run, "servers": f"dns:///gradwatch-headless:{port}", "tls_ca_file": str(pki.ca_file)}, env={}
        )
        transport = Transport(config, resolve=resolver)
        target = transport.target()
        with transport.channel(target) as channel:
            frames = [hello_frame(run=run), report_frame(1)]
            responses = list(pbg.IngestStub(channel).Stream(iter(frames), timeout=WAIT_S))
        assert acks(responses) == [1]
        owner = by_ip[target.rsplit(":", 1)[0]]
        assert run in [r["run"] for r in owner.runs()]
        seen.add(id(owner))
    assert len(seen) == 2  # both replicas took runs

    # Without the name the certificate does not match the bare IP: TLS refuses, as it should.
    bare = resolve_config({"run": "x", "server": f"127.0.0.1:{port}", "tls_ca_file": str(pki.ca_file)}, env={})
    with Transport(bare).channel(bare.server) as channel, pytest.raises(grpc.RpcError) as info:
        list(pbg.IngestStub(channel).Stream(iter([hello_frame(run="x")]), timeout=5))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
