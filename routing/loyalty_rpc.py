"""The loyalty service (`services/loyalty`) over nameko RPC, as a store agent calls it:
bounded by a timeout, and every failure sorted by what the till is told.

- `LoyaltyRefusedError`: the service refused on the merits (not enough points, unknown
  card, blocked member, a hold the platform will not release): an answer, never retried;
- `LoyaltyUnreachableError`: nobody could answer (the service's `LoyaltyUnavailableError`:
  platform down or its breaker open; no answer within the timeout; the service not running;
  the bus down): authorise offline, or try again later;
- `LoyaltyFailedError`: any other remote error (a bug): neither.

Every request carries an AMQP expiration equal to the timeout: a request nobody took in
time (the service down, its queue still there) is dropped by the broker, instead of
making a hold, once the service is back, for a till that stopped waiting long ago.

A pybreaker breaker opens after `FAIL_MAX` unreachable calls in a row: while it is open,
calls are unreachable at once (the till is authorised offline without waiting out the
timeout again), and after `RESET_SECONDS` one call tries loyalty again.
"""
from __future__ import annotations

import eventlet
import pybreaker
from nameko.exceptions import RemoteError, RpcTimeout
from nameko.rpc import ServiceProxy
from nameko.standalone.rpc import ServiceRpcProxy

from contracts.errors import RetailbusError
from legacy_wrappers.legacy_http import BreakerMetrics

SERVICE = "loyalty"
METHODS = ("authorize_redemption", "release", "capture_offline", "balance")  # what an agent may call
REFUSALS = ("InsufficientPointsError", "UnknownMemberError", "MemberInactiveError", "LoyaltyRefusedError")
UNAVAILABLE = "LoyaltyUnavailableError"
FAIL_MAX, RESET_SECONDS = 3, 5.0


class LoyaltyRefusedError(RetailbusError):
    """Raised when the loyalty service refuses a call on its merits; `kind` is its exception's name."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class LoyaltyUnreachableError(RetailbusError):
    """Raised when the loyalty service, its platform or the bus cannot answer in time."""


class LoyaltyFailedError(RetailbusError):
    """Raised when the loyalty service fails with an error that is neither a refusal nor an outage."""


class _ExpiringProxy(ServiceRpcProxy):
    """nameko's standalone proxy whose requests expire in the service's queue after `timeout`."""

    def __init__(self, config: dict, timeout: float):
        super().__init__(SERVICE, config, timeout=timeout)
        self._proxy = ServiceProxy(self._worker_ctx, SERVICE, self._reply_listener, expiration=timeout)
        self.service = None  # what start() gives: the methods to call

    def open(self) -> _ExpiringProxy:
        self.service = self.start()
        return self

    def close(self, timeout: float):
        try:
            with eventlet.Timeout(timeout, False):  # a dead connection does not hold the till
                self.stop()
        except Exception:  # a connection that never opened, or is gone already
            pass


class LoyaltyRpc:
    """Calls on proxies kept open between calls (`POOL` at most idle): opening one is a
    connection, a reply queue and a consumer, which would cost each till's authorisation
    more than the call itself. A proxy is used by one call at a time; one that failed is
    closed, and a call that failed on a kept proxy's dead connection is tried once more
    on a new one (the broker restarted meanwhile)."""

    POOL = 8

    def __init__(self, uri: str, timeout: float, ssl: dict | None = None):
        self.config = {"AMQP_URI": uri, **({"AMQP_SSL": ssl} if ssl else {})}
        self.timeout = timeout
        self.breaker = pybreaker.CircuitBreaker(fail_max=FAIL_MAX, reset_timeout=RESET_SECONDS,
                                                exclude=[LoyaltyRefusedError, LoyaltyFailedError],
                                                listeners=[BreakerMetrics("loyalty_rpc")])
        self._idle: list[_ExpiringProxy] = []

    def call(self, method: str, *args):
        """`loyalty.<method>(*args)`'s answer, or one of the three errors above."""
        try:
            return self.breaker.call(self._call, method, *args)
        except pybreaker.CircuitBreakerError:
            raise LoyaltyUnreachableError(f"{SERVICE}.{method}: breaker open after {FAIL_MAX} calls loyalty did "
                                          f"not answer; tried again within {RESET_SECONDS:g}s") from None

    def close(self):
        while self._idle:
            self._idle.pop().close(self.timeout)

    def _call(self, method: str, *args):
        # eventlet's Timeout is a BaseException: raise nameko's RpcTimeout instead, an Exception.
        with eventlet.Timeout(self.timeout, RpcTimeout(f"{SERVICE}.{method}: no answer within {self.timeout}s")):
            kept = bool(self._idle)
            try:
                return self._on_proxy(method, args)
            except LoyaltyUnreachableError as exc:
                if not kept or isinstance(exc.__cause__, RpcTimeout):
                    raise
                return self._on_proxy(method, args)  # the kept connection was dead: once more, afresh

    def _on_proxy(self, method: str, args: tuple):
        proxy, answered = (self._idle.pop() if self._idle else None), False
        try:
            if proxy is None:
                proxy = _ExpiringProxy(self.config, self.timeout).open()
            result = getattr(proxy.service, method)(*args)
            answered = True
            return result
        except RemoteError as exc:
            answered = True  # the service answered: the connection is fine
            if exc.exc_type in REFUSALS:
                raise LoyaltyRefusedError(exc.exc_type, exc.value) from None
            if exc.exc_type == UNAVAILABLE:
                raise LoyaltyUnreachableError(f"{SERVICE}.{method}: {exc.value}") from None
            raise LoyaltyFailedError(f"{SERVICE}.{method} failed: {exc.exc_type}: {exc.value}") from None
        except Exception as exc:  # UnknownService, a refused or lost connection
            raise LoyaltyUnreachableError(f"{SERVICE}.{method}: {type(exc).__name__}: {exc}") from exc
        finally:  # also when the timeout interrupts: that proxy is closed, never kept
            if proxy is not None:
                if answered and len(self._idle) < self.POOL:
                    self._idle.append(proxy)
                else:
                    proxy.close(self.timeout)
