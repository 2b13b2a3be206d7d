"""The `dlq` service: samples every dead-letter queue for Prometheus.

`retailbus_dlq_depth{queue}` is how many messages are parked in a `<queue>.dlq`,
`retailbus_dlq_oldest_age_seconds{queue}` how long the oldest one has waited
(since it was parked); both are 0 for an empty queue, so an alert can say
"something is parked" and "something has been parked too long".
The sample interval is RETAILBUS.dlq.interval.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from nameko.extensions import DependencyProvider
from nameko.timer import Timer
from prometheus_client import Gauge

from bus.extensions import container_settings
from bus.metrics_http import MetricsHttp
from services.dlq.store import DeadLetterStore, handler_queues

log = logging.getLogger(__name__)

DEPTH = Gauge("retailbus_dlq_depth", "Messages parked in a dead-letter queue", ["queue"])
OLDEST_AGE = Gauge("retailbus_dlq_oldest_age_seconds",
                   "Seconds since the oldest message of a dead-letter queue was parked", ["queue"])


def sample(store: DeadLetterStore, now: datetime | None = None) -> dict[str, tuple[int, float]]:
    """Set both gauges for every dead-letter queue; returns {queue: (depth, age)}."""
    now = now or datetime.now(timezone.utc)
    out = {}
    for dlq, (depth, head) in store.heads().items():
        parked = head.last_failure if head is not None else None
        age = max(0.0, (now - parked).total_seconds()) if parked and parked.tzinfo else 0.0
        DEPTH.labels(dlq).set(depth)
        OLDEST_AGE.labels(dlq).set(age)
        out[dlq] = (depth, age)
    return out


class DeadLetters(DependencyProvider):
    """The bus's dead-letter queues (services/dlq/store.py) for a worker."""

    def setup(self):
        uri, settings = container_settings(self.container.config)
        self.store = DeadLetterStore(uri, handler_queues(self.container.config, settings),
                                     connect_timeout=settings.publisher.connect_timeout)

    def get_dependency(self, worker_ctx):
        return self.store


class SampleTimer(Timer):
    """A timer whose interval is RETAILBUS.dlq.interval."""

    def setup(self):
        self.interval = container_settings(self.container.config)[1].dlq.interval


class DlqService:
    name = "dlq"

    dead_letters = DeadLetters()
    metrics = MetricsHttp()  # GET /metrics on RETAILBUS.services.dlq.metrics_port
    metrics = MetricsHttp()

    @SampleTimer.decorator(interval=15, eager=True)
    def sample_depths(self):
        parked = {q: d for q, (d, _) in sample(self.dead_letters).items() if d}
        if parked:
            log.warning("dead letters parked: %s", ", ".join(f"{q}={d}" for q, d in sorted(parked.items())))
