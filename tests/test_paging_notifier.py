"""The notifier's alert life cycle: fire once (deduplicated), resend with a fixed startsAt, resolve with
endsAt ≤ now, inhibition and silences as muting, hysteresis, and ingest that never waits for a sink."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from gradwatch.server.alerts import AlertBook
from gradwatch.server.detectors import Fire, inhibitions, spec_by_name
from gradwatch.server.notify import Notifier
from gradwatch.server.recorder import incident_id
from gradwatch.server.render import AlertRenderer
from gradwatch.server.silences import SilenceBook
from gradwatch.server.sinks import InMemorySink, Notification, SinkWorker, WebhookSink
from server_support import hello_frame, metric, report_frame, run_stream, scrape, server_config, start_app

NAN = spec_by_name("non_finite")
BOOM = spec_by_name("exploding_gradient")
RESEND_S = 60.0
WAIT_S = 10.0


@dataclass
class Clock:
    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    clock: Clock
    book: AlertBook
    silences: SilenceBook
    notifier: Notifier
    sink: InMemorySink

    def fire(self, run: str, spec: object, rank: int = 0, step: int = 10) -> None:
        self.book.fire(run, spec, rank, Fire(step=step, value=1.0, summary=f"{spec.name} at {step}", layer="fc1"))  # type: ignore[attr-defined]

    def delivered(self) -> list[tuple[str, str, str]]:
        """(run, detector, status) of every notification delivered so far, once the worker is idle."""
        assert self.notifier.workers[0].wait_idle(WAIT_S)
        return [(n.labels["run"], n.labels["detector"], n.status) for n in self.sink.notifications]

    def last(self) -> Notification:
        assert self.notifier.workers[0].wait_idle(WAIT_S)
        return self.sink.notifications[-1]


@pytest.fixture
def h() -> Iterator[Harness]:
    clock = Clock()
    book = AlertBook(clock=clock)
    silences = SilenceBook(clock=clock, detectors=["non_finite", "exploding_gradient"])
    renderer = AlertRenderer(runbook_base_url="https://rb/", job_name_of=lambda run: "job-" + run,
                             server_url="http://gw:9400")
    sink = InMemorySink()
    notifier = Notifier(book, silences, renderer, [SinkWorker(sink)], resend_interval_s=RESEND_S,
                        inhibitions=inhibitions(), clock=clock)
    book.add_listener(notifier.on_alert)
    notifier.start()
    yield Harness(clock, book, silences, notifier, sink)
    notifier.stop()


def test_notifier_fire_sends_one_page_with_identity_labels_and_context(h: Harness) -> None:
    h.fire("r", NAN, rank=3, step=37)
    h.fire("r", NAN, rank=5, step=38)  # another rank joins: same alert, no second page
    assert h.delivered() == [("r", "non_finite", "firing")]
    n = h.last()
    assert n.labels == {"alertname": "GradwatchNonFinite", "run": "r", "detector": "non_finite",
                        "severity": "critical", "job_name": "job-r"}
    assert n.starts_at == h.clock.now and n.ends_at == h.clock.now + 4 * RESEND_S
    assert n.annotations["runbook_url"] == "https://rb/non_finite.md"
    assert n.annotations["step"] == "37" and n.annotations["layer"] == "fc1"
    assert "step 37" in n.annotations["description"]
    # The link back is the alert's incident page (a critical alert records one).
    page = f"http://gw:9400/incidents/{incident_id(h.book.list()[0].id, h.book.list()[0].started_at)}"
    assert n.generator_url == page and page in n.annotations["description"]


def test_notifier_resends_firing_alerts_with_fixed_starts_at(h: Harness) -> None:
    h.fire("r", NAN, step=5)
    started = h.clock.now
    h.clock.now += RESEND_S / 2
    h.notifier.tick()
    assert len(h.delivered()) == 1  # not due yet
    h.fire("r", NAN, rank=1, step=9)
    h.clock.now = started + RESEND_S
    h.notifier.tick()
    assert h.delivered() == [("r", "non_finite", "firing")] * 2
    resent = h.last()
    assert resent.starts_at == started and resent.ends_at == h.clock.now + 4 * RESEND_S
    assert resent.annotations["last_step"] == "9" and resent.annotations["ranks"] == "0,1"  # fresh context


def test_notifier_resolve_sends_ends_at_not_after_now(h: Harness) -> None:
    h.fire("r", NAN)
    assert h.delivered() == [("r", "non_finite", "firing")]
    h.clock.now += 7.0
    h.book.clear("r", "non_finite", 0)
    assert h.delivered() == [("r", "non_finite", "firing"), ("r", "non_finite", "resolved")]
    resolved = h.last()
    assert resolved.ends_at <= h.clock.now and resolved.ends_at == h.clock.now
    assert resolved.starts_at == h.clock.now - 7.0
    h.clock.now += 10 * RESEND_S
    h.notifier.tick()
    assert len(h.delivered()) == 2  # nothing resent after resolution


def test_notifier_nan_inhibits_explosion_of_the_same_run_only(h: Harness) -> None:
    h.fire("r", NAN)
    h.fire("r", BOOM)
    h.fire("s", BOOM)
    assert h.delivered() == [("r", "non_finite", "firing"), ("s", "exploding_gradient", "firing")]
    [muted] = [v for v in h.notifier.view() if v["run"] == "r" and v["detector"] == "exploding_gradient"]
    assert muted["inhibited_by"] == "non_finite" and not muted["notified"]
    assert h.notifier.muted_counts() == {"inhibited": 1, "silenced": 0}
    # The NaN resolves while the explosion still fires: now it pages.
    h.book.clear("r", "non_finite", 0)
    assert h.delivered()[-2:] == [("r", "non_finite", "resolved"), ("r", "exploding_gradient", "firing")]


def test_notifier_muted_alert_that_resolves_is_never_sent(h: Harness) -> None:
    h.fire("r", NAN)
    h.fire("r", BOOM)
    assert h.delivered() == [("r", "non_finite", "firing")]
    h.book.clear("r", "exploding_gradient", 0)
    h.book.clear("r", "non_finite", 0)
    assert h.delivered() == [("r", "non_finite", "firing"), ("r", "non_finite", "resolved")]


def test_notifier_page_already_sent_is_not_retracted_by_a_later_inhibitor(h: Harness) -> None:
    h.fire("r", BOOM)  # the explosion precedes the NaN it causes
    h.fire("r", NAN)
    assert sorted(h.delivered()) == [("r", "exploding_gradient", "firing"), ("r", "non_finite", "firing")]
    h.clock.now += RESEND_S
    h.notifier.tick()
    resent = h.delivered()[2:]
    assert sorted(resent) == [("r", "exploding_gradient", "firing"), ("r", "non_finite", "firing")]


def test_notifier_silence_mutes_new_pages_of_one_run_until_it_ends(h: Harness) -> None:
    silence = h.silences.add("r", None, 120.0, comment="lr sweep", created_by="alice")
    h.fire("r", NAN)
    h.fire("s", NAN)
    assert h.delivered() == [("s", "non_finite", "firing")]
    [muted] = [v for v in h.notifier.view() if v["run"] == "r"]
    assert muted["silenced_by"] == [silence["id"]]
    h.clock.now += 121.0  # the silence ended and the alert still fires: it pages at the next tick
    h.notifier.tick()
    assert ("r", "non_finite", "firing") in h.delivered()[1:]


def test_notifier_silence_of_one_detector_leaves_others(h: Harness) -> None:
    h.silences.add("r", "exploding_gradient", 60.0)
    h.fire("r", BOOM)
    h.fire("r", NAN)
    assert h.delivered() == [("r", "non_finite", "firing")]
    assert h.notifier.muted_counts() == {"inhibited": 1, "silenced": 0}  # both apply; counted once


# ---------------------------------------------------------------------- through the real server


def test_notifier_hysteresis_one_page_one_resolution_for_a_flapping_rank() -> None:
    sink = InMemorySink()
    app = start_app(server_config(), extra_sinks=[sink])
    try:
        frames = [hello_frame(run="flap")]
        seq = 0
        for _ in range(3):  # NaN, a few finite reports (< resolve_after = 20), NaN again ...
            seq += 1
            frames.append(report_frame(seq, loss=math.nan, grad_norm=math.nan))
            for _ in range(5):
                seq += 1
                frames.append(report_frame(seq))
        for _ in range(20):  # ... then 20 finite reports in a row: resolved once
            seq += 1
            frames.append(report_frame(seq))
        run_stream(app.grpc_target, frames)
        assert app.notifier.workers[0].wait_idle(WAIT_S)
        assert [n.status for n in sink.notifications] == ["firing", "resolved"]
        text = scrape(app)
        assert metric(text, "gradwatch_alert_notifications_total", sink="memory", outcome="sent") == 2
        assert metric(text, "gradwatch_alert_notifications_pending", sink="memory") == 0
        assert metric(text, "gradwatch_alert_sink_up", sink="memory") == 1
    finally:
        app.stop()


def test_notifier_ingest_never_waits_for_a_hung_sink() -> None:
    import socket

    hung = socket.socket()  # accepts connections (backlog) but never answers: every POST hangs
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    config = server_config()
    config = replace(config, alerting=replace(config.alerting, log=False, timeout_s=30.0,
                                              webhook_urls=(f"http://127.0.0.1:{hung.getsockname()[1]}/hook",)))
    app = start_app(config)
    try:
        frames = [hello_frame(run="r0")]
        frames += [report_frame(seq, loss=math.nan if seq % 25 == 1 else 0.5) for seq in range(1, 501)]
        started = time.perf_counter()
        run_stream(app.grpc_target, frames)
        elapsed = time.perf_counter() - started
        # 500 frames with 20 fire/resolve transitions, while every POST to the sink hangs.
        assert elapsed < 5.0, elapsed
        assert len(app.alerts(run="r0", state="resolved")) == 20
        assert isinstance(app.notifier.workers[0].sink, WebhookSink)
        assert app.notifier.workers[0].snapshot().outcomes["sent"] == 0
    finally:
        app.stop(grace=0)
        hung.close()
