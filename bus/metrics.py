"""Prometheus metrics of the messaging core (one registry per process)."""
from prometheus_client import Counter, Gauge, Histogram

PUBLISHED = Counter(
    "retailbus_messages_published_total",
    "Publishes by exchange and outcome (confirmed, unroutable, failed)",
    ["exchange", "outcome"],
)
CONFIRM_SECONDS = Histogram(
    "retailbus_publish_confirm_seconds",
    "Time from publish to broker confirm",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONSUMED = Counter(
    "retailbus_messages_consumed_total",
    "Consumed messages by queue and outcome (ok, duplicate, retried, dead_lettered)",
    ["queue", "outcome"],
)
HANDLER_SECONDS = Histogram(
    "retailbus_handler_seconds",
    "Reliable handler run time",
    ["queue"],
)
BROKER_CONNECTED = Gauge(
    "retailbus_broker_connected",
    "1 while the named connection is up",
    ["connection"],
)
DUPLICATES = Counter(
    "retailbus_inbox_duplicates_total",
    "Messages recognised as already applied by the inbox",
    ["consumer"],
)
REJECTED = Counter(
    "retailbus_rejected_messages_total",
    "Messages parked at once because their sender may not send them (reason: no_sender, foreign_store)",
    ["queue", "reason"],
)
