"""`LoyaltyPlatform`: the loyalty platform's HTTP API as a nameko dependency.

The breaker, timeouts and connection pool are `LegacyHttpClient`'s (a SaaS
platform behind HTTP is one more legacy system to the bus). What this adds is
the platform's language: JSON bodies, an Idempotency-Key on every write (so a
retried accrual or capture is booked once), and its answers mapped to what the
service decides on: a business refusal (not enough points, unknown card) is an
answer, not a failure to retry; the platform down or failing is
`LoyaltyUnavailableError`, which the handlers retry and the RPC callers (the
store agents) take as "authorise offline".
"""
from __future__ import annotations

import json
from urllib.parse import quote

from nameko.extensions import DependencyProvider

from bus.settings import retailbus_settings
from contracts.errors import RetailbusError
from legacy_wrappers.legacy_http import LegacyHttpClient, LegacyUnavailable

SYSTEM = "loyalty_platform"


class LoyaltyRefusedError(RetailbusError):
    """Raised when the platform refuses a request on its merits (4xx); `code` is its error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


class InsufficientPointsError(LoyaltyRefusedError):
    """Raised when a card's balance cannot cover the points asked for."""


class UnknownMemberError(LoyaltyRefusedError):
    """Raised when no member has the card."""


class MemberInactiveError(LoyaltyRefusedError):
    """Raised when the member is blocked."""


class LoyaltyUnavailableError(RetailbusError):
    """Raised when the platform does not answer usefully (down, slow, 5xx, breaker open): retry later."""


REFUSALS = {"insufficient_points": InsufficientPointsError, "unknown_member": UnknownMemberError,
            "member_inactive": MemberInactiveError}


class PlatformClient:
    def __init__(self, http: LegacyHttpClient):
        self.http = http

    def call(self, method: str, path: str, body: dict | None = None, key: str | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        try:
            answer = self.http.request(method, path, data, headers={"Idempotency-Key": key} if key else None)
        except LegacyUnavailable as exc:
            raise LoyaltyUnavailableError(str(exc)) from exc
        try:
            payload = json.loads(answer.body) if answer.body else {}
        except ValueError:
            raise LoyaltyUnavailableError(f"{SYSTEM}: answered {answer.status} with a body that is not JSON") from None
        if answer.status >= 400:
            error = payload.get("error") or {}
            code, message = error.get("code", "refused"), error.get("message", f"answered {answer.status}")
            raise REFUSALS.get(code, LoyaltyRefusedError)(answer.status, code, message)
        return payload

    def member(self, card: str) -> dict:
        return self.call("GET", f"/members/{_segment(card)}")

    def hold(self, card: str, points: int, reference: str, store: str, ttl: int, key: str) -> dict:
        return self.call("POST", "/holds", {"card": card, "points": points, "reference": reference,
                                            "store": store, "ttl_seconds": ttl}, key)

    def capture(self, hold_id: str) -> dict:
        return self.call("POST", f"/holds/{_segment(hold_id)}/capture", {}, f"capture:{hold_id}")

    def release(self, hold_id: str) -> dict:
        return self.call("POST", f"/holds/{_segment(hold_id)}/release", {}, f"release:{hold_id}")

    def book(self, card: str, kind: str, points: int, reference: str, store: str, key: str) -> dict:
        """A ledger transaction (EARN, REDEEM, REFUND, ADJUST), once per `key`."""
        return self.call("POST", "/transactions", {"card": card, "type": kind, "points": points,
                                                   "reference": reference, "store": store}, key)

    def transactions(self, **query: str) -> list[dict]:
        params = "&".join(f"{k}={_segment(v)}" for k, v in query.items())
        return self.call("GET", f"/transactions?{params}")["transactions"]


def _segment(value: str) -> str:
    """A card, hold id or reference as one URL path segment (they are ours or the till's)."""
    return quote(value, safe="")


class LoyaltyPlatform(DependencyProvider):
    """One breaker-guarded client per container, at RETAILBUS.loyalty_platform.http."""

    def __init__(self, timeout: float = 2.0):
        self.timeout = timeout

    def setup(self):
        settings = retailbus_settings(self.container.config)
        self.client = PlatformClient(LegacyHttpClient(f"http://{settings.loyalty_platform.http}",
                                                      self.timeout, system=SYSTEM))

    def get_dependency(self, worker_ctx):
        return self.client
