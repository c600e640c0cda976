"""The relay tier in one process each: a relay ServerApp (relay.upstream set) forwarding to an aggregator ServerApp
over real gRPC, agents played by hand-built frames (tests/server_support.py), the network cut by a real TCP proxy
(tests/netfault.py). Back-pressure, limits, hand-over and alerts that survive a move.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from gradwatch.server.app import ServerApp
from gradwatch.server.config import GrpcConfig, RelayConfig, ServerConfig
from gradwatch.server.detectors.stalled import StalledConfig
from gradwatch.server.sinks.memory import InMemorySink
from netfault import FaultyRelay
from paging_support import released_port
from server_support import AgentStream, hello_frame, metric, report_frame, scrape, server_config, start_app
from wait_support import wait_until

WAIT_S = 20.0


def _until(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    return wait_until(condition, timeout, what=what, interval=0.05)


def _relay(upstream: str, **settings: Any) -> ServerApp:
    return start_app(dataclasses.replace(server_config(), relay=RelayConfig(upstream=(upstream,), **settings)))


def _aggregator(port: int = 0, **settings: Any) -> ServerApp:
    config = dataclasses.replace(server_config(), relay=RelayConfig(**settings))
    return start_app(dataclasses.replace(config, grpc=GrpcConfig(host="127.0.0.1", port=port)))


def _spiking_rank(target: str, run: str, *, rank: int = 0, world_size: int = 1, reports: int = 40) -> AgentStream:
    """A rank that reports a steady loss, then one far above it (loss_spike, a per-rank detector, fires)."""
    stream = AgentStream(target)
    stream.send(hello_frame(run=run, rank=rank, world_size=world_size, session=f"{run}-{rank}"))
    for seq in range(1, reports + 1):
        stream.send(report_frame(seq, loss=1.0 + 0.01 * (seq % 3)))
    stream.send(report_frame(reports + 1, loss=50.0))
    stream.recv_ack(reports + 1)
    return stream


def _firing(app: ServerApp, run: str) -> dict[str, list[int]]:
    return {a["detector"]: a["ranks"] for a in app.alerts(run=run, state="firing")}


def test_relay_serves_its_ranks_while_upstream_is_down_then_delivers_every_record() -> None:
    port = released_port()  # nothing listens there yet; the aggregator binds it later
    relay = _relay(f"127.0.0.1:{port}")
    aggregator = None
    try:
        stream = _spiking_rank(relay.grpc_target, "r")  # acknowledged by the relay with upstream down
        assert _firing(relay, "r") == {"loss_spike": [0]}  # per-rank alerts go on without the aggregator
        state = relay.relay.state()
        assert state["buffered"] == 1 + 41 + 1 and state["dropped"] == {}  # Hello, 41 reports, 1 verdict
        assert state["links"][0]["connected"] is False
        aggregator = _aggregator(port)
        _until(lambda: relay.relay.state()["buffered"] == 0, "the relay to deliver its buffer")
        run = aggregator.store.get("r")
        assert run is not None and run.ranks[0].last_step == 41 and int(run.table.reports[0]) == 41
        assert _firing(aggregator, "r") == {"loss_spike": [0]}
        stream.close()
    finally:
        relay.stop()
        if aggregator is not None:
            aggregator.stop()


def test_relay_drops_its_oldest_records_beyond_its_buffer_and_counts_every_one() -> None:
    port = released_port()  # the aggregator binds it later
    relay = _relay(f"127.0.0.1:{port}", buffer_entries=16)
    aggregator = None
    try:
        stream = AgentStream(relay.grpc_target)
        stream.send(hello_frame(run="r", session="s"))
        for seq in range(1, 41):
            stream.send(report_frame(seq))
        stream.recv_ack(40)  # the relay took every report
        state = relay.relay.state()
        assert state["buffered"] == 16 and state["dropped"] == {"buffer_full": 41 - 16}
        text = scrape(relay)
        assert metric(text, "gradwatch_relay_dropped_entries_total", reason="buffer_full") == 25
        assert metric(text, "gradwatch_relay_buffered_entries") == 16
        aggregator = _aggregator(port)
        _until(lambda: relay.relay.state()["buffered"] == 0, "the relay to deliver its buffer")
        # Its Hello was dropped too, but the relay re-sends every open rank's Hello first: the 16 newest arrive.
        run = aggregator.store.get("r")
        assert run is not None and run.ranks[0].last_step == 40 and int(run.table.reports[0]) == 16
        assert aggregator.relays is not None
        assert aggregator.relays.relays()[0]["dropped"] == {"buffer_full": 25}
        stream.close()
    finally:
        relay.stop()
        if aggregator is not None:
            aggregator.stop()


def test_aggregator_refuses_relays_beyond_its_limit_with_a_clear_status() -> None:
    aggregator = _aggregator(max_relays=1)
    first, second = _relay(aggregator.grpc_target), _relay(aggregator.grpc_target)
    try:
        streams = [_spiking_rank(first.grpc_target, "a", reports=2)]
        _until(lambda: first.relay.state()["links"][0]["connected"], "the first relay to connect")
        streams.append(_spiking_rank(second.grpc_target, "b", reports=2))
        link = _until(lambda: second.relay.state()["links"][0]["refused"] and second.relay.state()["links"][0],
                      "the second relay to be refused")  # fmt: skip
        assert link["refused"]["relay_limit_reached"] >= 1 and not link["connected"]
        assert "relay.max_relays=1" in link["last_error"]
        assert metric(scrape(aggregator), "gradwatch_ingest_errors_total", reason="relay_limit_reached") >= 1
        assert second.relay.state()["buffered"] > 0  # kept for when a slot frees up
        assert [r["relay_id"] for r in aggregator.relays.relays()] == [first.relay.relay_id]  # type: ignore[union-attr]
        for stream in streams:
            stream.close()
    finally:
        first.stop()
        second.stop()
        aggregator.stop()


def test_ranks_whose_relay_link_ended_leave_the_run_and_are_handed_over_not_stalled() -> None:
    # The cut link is noticed (2.5 s: the relays beat every second) well before a silent run stalls (6 s).
    stalled = StalledConfig(floor_s=6.0, factor=2.0, silent_after_s=6.0)
    config = dataclasses.replace(server_config(), relay=RelayConfig(handover_after_s=1.0, link_timeout_s=2.5))
    config = dataclasses.replace(config, detectors={**config.detectors, "stalled": stalled})
    sink = InMemorySink()
    aggregator = start_app(config, extra_sinks=[sink])
    proxy = FaultyRelay(("127.0.0.1", aggregator.grpc_port))
    moved, kept = _relay(proxy.address), _relay(aggregator.grpc_target)
    streams = []
    try:
        # The moved run has a per-rank alert firing (paged by the aggregator) when its link is cut.
        streams.append(_spiking_rank(moved.grpc_target, "moved", rank=0, world_size=2))
        for relay, run in ((moved, "moved"), (kept, "kept")):
            for rank in range(2):
                if run == "moved" and rank == 0:
                    continue
                stream = AgentStream(relay.grpc_target)
                stream.send(hello_frame(run=run, rank=rank, world_size=2, session=f"{run}-{rank}"))
                for seq in range(1, 6):
                    stream.send(report_frame(seq))
                stream.recv_ack(5)
                streams.append(stream)
        _until(lambda: all(r.relay.state()["buffered"] == 0 for r in (moved, kept)), "both relays to deliver")
        assert sink.wait_for(lambda ns: _paged(ns, "moved", "loss_spike", "firing"), WAIT_S)
        proxy.close()  # the first relay's link ends for good (its runs' replica is gone from its view)
        # Both runs' ranks are now silent: the run still held is stalled, the one whose ranks left is not ...
        _until(lambda: "stalled" in _firing(aggregator, "kept"), "stalled on the run whose ranks stay")
        ticks = aggregator.ingestor.ticks
        wait_until(lambda: aggregator.ingestor.ticks >= ticks + 2, what="two more detector ticks on the aggregator")
        assert _firing(aggregator, "moved") == {}
        # Handed over: the alert ended here without a resolution paged (the run's new replica keeps the page).
        assert aggregator.alerts(run="moved")[0]["summary"].endswith("(handed over: the run moved to another replica)")
        aggregator.notifier.stop(timeout_s=WAIT_S)  # delivers everything pending, then stops paging
        assert not _paged(sink.notifications, "moved", "loss_spike", "resolved")
        view = {r["run"]: r for r in aggregator.runs()}
        assert aggregator.store.get("moved").expired  # type: ignore[union-attr]
        assert not aggregator.store.get("kept").expired  # type: ignore[union-attr]
        assert "kept" in view
        # ... while the relay keeps serving and buffering the moved ranks.
        streams[0].send(report_frame(42))
        streams[0].recv_ack(42)
        assert moved.relay.state()["buffered"] >= 1
    finally:
        for stream in streams:
            stream.close()
        moved.stop(grace=0)
        kept.stop(grace=0)
        aggregator.stop()


def _paged(notifications: list[Any], run: str, detector: str, status: str) -> bool:
    return any(n.status == status and n.labels["run"] == run and n.labels["detector"] == detector
               for n in notifications)  # fmt: skip


def test_alerts_firing_on_a_relay_fire_again_on_the_replica_that_takes_the_run_over() -> None:
    first = _aggregator()
    port = first.grpc_port  # the new replica binds it again (a port that was just ours)
    relay = _relay(f"127.0.0.1:{port}")
    second = None
    try:
        stream = _spiking_rank(relay.grpc_target, "r")
        _until(lambda: _firing(first, "r") == {"loss_spike": [0]}, "the alert on the first replica")
        first.stop()  # the replica goes away; a new one takes its address (a StatefulSet pod restarted)
        second = _aggregator(port)
        _until(lambda: _firing(second, "r") == {"loss_spike": [0]}, "the alert on the new replica")
        run = second.store.get("r")
        assert run is not None and bool(run.table.joined[0])  # the relay re-sent the rank's Hello
        stream.close()
    finally:
        relay.stop()
        if second is not None:
            second.stop()


def test_relay_config_rejects_a_malformed_upstream() -> None:
    with pytest.raises(ValueError, match="upstream"):
        dataclasses.replace(ServerConfig(), relay=RelayConfig(upstream=("no-port",)))


def test_relay_speaks_tls_and_a_token_to_an_aggregator_that_requires_them(tmp_path: Any) -> None:
    from security_support import Pki, secure_config, write_tokens

    pki = Pki(tmp_path / "pki")
    tokens = write_tokens(
        tmp_path / "tokens.json", [{"name": "job-x", "token": "relay-token-0123456789", "jobs": ["job-x"]}]
    )
    aggregator = start_app(secure_config(pki, tokens_file=tokens))
    (tmp_path / "token").write_text("relay-token-0123456789\n")
    tls = {"ca_file": str(pki.ca_file)}
    good = _relay(aggregator.grpc_target, token_file=str(tmp_path / "token"), **tls)
    tokenless = _relay(aggregator.grpc_target, **tls)
    try:
        streams = [_spiking_rank(good.grpc_target, "secure", reports=2),
                   _spiking_rank(tokenless.grpc_target, "intruder", reports=2)]  # fmt: skip
        _until(lambda: aggregator.store.get("secure") is not None, "the relayed run over TLS")
        link = _until(lambda: tokenless.relay.state()["links"][0]["refused"] and tokenless.relay.state()["links"][0],
                      "the relay without a token to be refused")  # fmt: skip
        assert set(link["refused"]) == {"missing_token"}, link
        assert aggregator.store.get("intruder") is None
        for stream in streams:
            stream.close()
    finally:
        good.stop()
        tokenless.stop()
        aggregator.stop()


def test_relay_config_needs_the_ca_with_a_client_certificate() -> None:
    with pytest.raises(ValueError, match="cert_file"):
        RelayConfig(upstream=("a:1",), cert_file="c.pem", key_file="k.pem")


def test_a_relays_incident_with_its_per_layer_window_is_stored_at_the_aggregator() -> None:
    from server_support import columns

    aggregator = _aggregator()
    config = dataclasses.replace(server_config(), relay=RelayConfig(upstream=(aggregator.grpc_target,)))
    relay = start_app(dataclasses.replace(config, recorder=dataclasses.replace(config.recorder, after_reports=0)))
    try:
        stream = AgentStream(relay.grpc_target)
        stream.send(hello_frame(run="r", session="s", layers=3))
        for seq in range(1, 42):
            layers = columns(3, grad_norm=1.0, weight_norm=2.0) if seq % 2 == 0 else None
            stream.send(report_frame(seq, loss=50.0 if seq == 41 else 1.0 + 0.01 * (seq % 3), layers=layers))
        stream.recv_ack(41)
        (local,) = _until(lambda: relay.database.incidents(run="r", limit=10)[0], "the relay's incident")
        assert local["detector"] == "loss_spike"
        window = relay.database.incident_window(local["id"])
        assert window

        def forwarded() -> Any:
            held = aggregator.database.incident(local["id"])
            return held if held is not None and held.get("relay") == relay.relay.relay_id else None

        body = _until(forwarded, "the incident at the aggregator")
        assert body["detector"] == "loss_spike" and body["run"] == "r" and body["status"] == "complete"
        assert aggregator.database.incident_window(local["id"]) == window  # the per-layer window, byte for byte
        stream.close()
    finally:
        relay.stop()
        aggregator.stop()


def test_a_relay_sends_each_run_to_the_replica_its_id_hashes_to() -> None:
    from gradwatch.routing import rendezvous_order

    replicas = [_aggregator(), _aggregator()]
    targets = [r.grpc_target for r in replicas]
    relay = start_app(dataclasses.replace(server_config(), relay=RelayConfig(upstream=tuple(targets))))
    try:
        runs = [f"run-{n}" for n in range(16)]
        owner = {run: rendezvous_order(run, targets)[0] for run in runs}  # what every agent would pick too
        assert set(owner.values()) == set(targets)  # both replicas own some of them
        streams = [_spiking_rank(relay.grpc_target, run, reports=2) for run in runs]
        _until(lambda: relay.relay.state()["buffered"] == 0, "the relay to deliver")
        for replica, target in zip(replicas, targets, strict=True):
            held = {run.run_id for run in replica.store.snapshot()}
            assert held == {run for run in runs if owner[run] == target}
        assert sorted(link["upstream"] for link in relay.relay.state()["links"]) == sorted(targets)
        for stream in streams:
            stream.close()
    finally:
        relay.stop()
        for replica in replicas:
            replica.stop()


def test_a_relay_says_so_when_its_upstream_is_not_an_aggregator() -> None:
    other = _relay("127.0.0.1:1")  # a relay has no Relay method: not an aggregator
    relay = _relay(other.grpc_target)
    try:
        stream = _spiking_rank(relay.grpc_target, "r", reports=2)  # acknowledged all the same
        link = _until(lambda: relay.relay.state()["links"][0]["refused"] and relay.relay.state()["links"][0],
                      "the refusal")  # fmt: skip
        assert set(link["refused"]) == {"upstream_without_relay"} and not link["connected"]
        stream.close()
    finally:
        relay.stop()
        other.stop()


def test_a_relays_reports_reach_the_aggregator_as_columns_and_are_applied_per_batch() -> None:
    aggregator = _aggregator()
    relay = _relay(aggregator.grpc_target)
    streams = []
    try:
        for rank in range(4):
            stream = AgentStream(relay.grpc_target)
            stream.send(hello_frame(run="cols", rank=rank, world_size=4, session=f"cols-{rank}"))
            streams.append(stream)
        for seq in range(1, 31):
            for stream in streams:
                stream.send(report_frame(seq, loss=1.0 + 0.01 * (seq % 3)))
        for stream in streams:
            stream.recv_ack(30)
        _until(lambda: relay.relay.state()["buffered"] == 0, "the relay to deliver its records")
        run = aggregator.store.get("cols")
        assert run is not None and run.table.reports.tolist() == [30] * 4 and run.table.last_step.tolist() == [30] * 4
        assert aggregator.ingestor.batched > 0  # the link packed them as columns, the aggregator took them as batches
        assert [int(r.ring.count) for _, r in sorted(run.ranks.items())] == [30] * 4
    finally:
        for stream in streams:
            stream.close()
        relay.stop()
        aggregator.stop()
