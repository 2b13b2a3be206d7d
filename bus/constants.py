"""The bus's shared vocabulary: AMQP header names and worker-context keys that
several layers read and write. Spelled once here so a rename cannot split them."""
from __future__ import annotations

# Headers a message carries from its store agent.
H_STORE = "x-retailbus-store"            # the store the message belongs to
H_STORE_SEQ = "x-retailbus-store-seq"    # its position among the store's messages of its type

# Headers a parked (dead-lettered) message carries: why, when, from where.
H_ATTEMPTS = "x-retailbus-attempts"
H_ERROR = "x-retailbus-error"
H_ERROR_TYPE = "x-retailbus-error-type"
H_FIRST_FAILURE = "x-retailbus-first-failure"
H_LAST_FAILURE = "x-retailbus-last-failure"
H_EXCHANGE = "x-retailbus-original-exchange"
H_ROUTING_KEY = "x-retailbus-original-routing-key"
H_QUEUE = "x-retailbus-queue"
H_USER = "x-retailbus-original-user-id"

# A dependency that makes a worker's effect durable in `worker_result` (a database
# commit) and fails appends the error to this list on the worker context; the
# message is then retried instead of acked (`reliable_handler`).
EFFECT_ERRORS = "effect_errors"
