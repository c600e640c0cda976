"""Alert sinks behind one interface (`AlertSink.deliver`), and the per-sink delivery worker.

Sinks: Alertmanager API v2 (`AlertmanagerSink`, one per URL), a generic JSON webhook
(`WebhookSink`), the log (`LogSink`) and `InMemorySink` for tests and embedding. The
notifier (gradwatch.server.notify) decides what to send and when; a `SinkWorker` per
sink delivers it off the ingest path, with retries and outcome counters.
"""

from __future__ import annotations

from gradwatch.server.sinks.alertmanager import AlertmanagerSink
from gradwatch.server.sinks.base import STATUS_FIRING, STATUS_RESOLVED, AlertSink, DeliveryError, Notification
from gradwatch.server.sinks.log import LogSink
from gradwatch.server.sinks.memory import InMemorySink
from gradwatch.server.sinks.webhook import WebhookSink
from gradwatch.server.sinks.worker import OUTCOMES, DeliveryPolicy, SinkWorker

__all__ = [
    "OUTCOMES",
    "STATUS_FIRING",
    "STATUS_RESOLVED",
    "AlertSink",
    "AlertmanagerSink",
    "DeliveryError",
    "DeliveryPolicy",
    "InMemorySink",
    "LogSink",
    "Notification",
    "SinkWorker",
    "WebhookSink",
]
