"""`LoyaltyPlatform`: the loyalty platform's HTTP API as a nameko dependency.

JSON, idempotency keys, the breaker and timeouts are `JsonHttpClient`'s
(legacy_wrappers/json_http.py). What this adds is the platform's calls and its
refusals as the exceptions the service decides on: a business refusal (not
enough points, unknown card) is an answer, not a failure to retry; the platform
down or failing is `LoyaltyUnavailableError`, which the handlers retry and the
RPC callers (the store agents) take as "authorise offline".
"""
from __future__ import annotations

from nameko.extensions import DependencyProvider

from bus.settings import retailbus_settings
from legacy_wrappers.json_http import JsonHttpClient, RemoteRefusedError, RemoteUnavailableError, segment
from legacy_wrappers.legacy_http import LegacyHttpClient

SYSTEM = "loyalty_platform"


class LoyaltyRefusedError(RemoteRefusedError):
    """Raised when the platform refuses a request on its merits (4xx); `code` is its error code."""


class InsufficientPointsError(LoyaltyRefusedError):
    """Raised when a card's balance cannot cover the points asked for."""


class UnknownMemberError(LoyaltyRefusedError):
    """Raised when no member has the card."""


class MemberInactiveError(LoyaltyRefusedError):
    """Raised when the member is blocked."""


class LoyaltyUnavailableError(RemoteUnavailableError):
    """Raised when the platform does not answer usefully (down, slow, 5xx, breaker open): retry later."""


class PlatformClient(JsonHttpClient):
    def __init__(self, http: LegacyHttpClient):
        super().__init__(http, {"insufficient_points": InsufficientPointsError, "unknown_member": UnknownMemberError,
                                "member_inactive": MemberInactiveError}, LoyaltyRefusedError, LoyaltyUnavailableError)

    def member(self, card: str) -> dict:
        return self.call("GET", f"/members/{segment(card)}")

    def hold(self, card: str, points: int, reference: str, store: str, ttl: int, key: str) -> dict:
        return self.call("POST", "/holds", {"card": card, "points": points, "reference": reference,
                                            "store": store, "ttl_seconds": ttl}, key)

    def capture(self, hold_id: str) -> dict:
        return self.call("POST", f"/holds/{segment(hold_id)}/capture", {}, f"capture:{hold_id}")

    def release(self, hold_id: str) -> dict:
        return self.call("POST", f"/holds/{segment(hold_id)}/release", {}, f"release:{hold_id}")

    def book(self, card: str, kind: str, points: int, reference: str, store: str, key: str) -> dict:
        """A ledger transaction (EARN, REDEEM, REFUND, ADJUST), once per `key`."""
        return self.call("POST", "/transactions", {"card": card, "type": kind, "points": points,
                                                   "reference": reference, "store": store}, key)

    def transactions(self, **query: str) -> list[dict]:
        params = "&".join(f"{k}={segment(v)}" for k, v in query.items())
        return self.call("GET", f"/transactions?{params}")["transactions"]


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
