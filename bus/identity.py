"""Which store a message may speak for: only the one its broker user belongs to.

A store agent publishes as `store-<S>` with AMQP `user_id` set to that user,
and RabbitMQ refuses a `user_id` that is not the connection's own user; that
is the only claim a consumer can trust. The payload's `store_id` and the
`x-retailbus-store` header are written by the sender and prove nothing. So a
message on `store_agent.events` is parked at once (StoreIdentityError) when:

- it has no `user_id`: anyone may leave it out, and the broker checks nothing then;
- its sender is a store user and its `store_id` or header names another store.

A sender that is not a store user is trusted: besides the store users only
the bus's own (privileged) user may publish there (services/broker/users.py).

A message that comes back from our retry ladder, or is replayed from a DLQ by
ops, arrives through the default exchange, which no component may write to:
its sender is the one the consumer noted, from `user_id`, at its first failure
(`x-retailbus-original-user-id`), never a header its sender wrote.
"""
from __future__ import annotations

from contracts.errors import RetailbusError
from bus import metrics, topology
from bus.constants import H_STORE, H_USER

STORE_EXCHANGE = topology.events_exchange("store_agent")  # where store agents publish
STORE_USER_PREFIX = "store-"


class StoreIdentityError(RetailbusError):
    """Raised for a store's message whose broker-validated sender is not that store."""


def store_user(store_id: str) -> str:
    return f"{STORE_USER_PREFIX}{store_id}"


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def sender(message) -> str | None:
    """The broker-validated user that sent `message` (an amqp.Message), or None."""
    if message.delivery_info.get("exchange", "") == "":  # our retry ladder or an ops replay
        return _text((message.properties.get("application_headers") or {}).get(H_USER))
    return _text(message.properties.get("user_id"))


def refusal(exchange: str, queue: str, message, payload) -> StoreIdentityError | None:
    """Why the message consumed from `exchange` into `queue` may not be trusted (counted), or None."""
    if exchange != STORE_EXCHANGE:
        return None
    user = sender(message)
    if not user:
        reason, error = "no_sender", StoreIdentityError(
            f"refused: a message on {STORE_EXCHANGE} must carry the broker-validated AMQP user_id "
            f"of its store user ({STORE_USER_PREFIX}<store>); this one has none")
    elif not user.startswith(STORE_USER_PREFIX):
        return None
    else:
        store = user[len(STORE_USER_PREFIX):]
        headers = message.properties.get("application_headers") or {}
        claims = {"payload store_id": getattr(payload, "store_id", None),
                  f"header {H_STORE}": _text(headers.get(H_STORE))}
        foreign = {what: value for what, value in claims.items() if value is not None and value != store}
        if not foreign:
            return None
        reason, error = "foreign_store", StoreIdentityError(
            f"refused: sender {user} may only send for store {store}, but the message names "
            + ", ".join(f"{what} {value!r}" for what, value in foreign.items()))
    metrics.REJECTED.labels(queue, reason).inc()
    return error
