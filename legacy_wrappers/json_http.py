"""`JsonHttpClient`: a SaaS-style JSON API over `LegacyHttpClient` (breaker, timeouts, pool).

What the estate's platforms share (the loyalty platform, the CRM): JSON bodies, an
Idempotency-Key on every write, so a retried call is booked once, the caller named
(`X-Api-Client: retailbus`) so their change feeds tell the bus's changes apart, and errors as
`{"error": {"code", "message"}}`. A refusal on the merits (4xx) is an answer the
caller decides on (`RemoteRefusedError` with the platform's code); the platform down,
failing or answering nonsense is `RemoteUnavailableError`, which callers retry.
"""
from __future__ import annotations

import json
from urllib.parse import quote

from contracts.errors import RetailbusError
from legacy_wrappers.legacy_http import LegacyHttpClient, LegacyUnavailable


class RemoteRefusedError(RetailbusError):
    """Raised when the platform refuses a request on its merits (4xx); `code` is its error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


class RemoteUnavailableError(RetailbusError):
    """Raised when the platform does not answer usefully (down, slow, 5xx, breaker open): retry later."""


# Who the estate's platforms see calling (the `X-Api-Client` header): their change feeds name
# it, so a system API recognises the changes the bus made itself and never reports them back.
CLIENT = "retailbus"


def segment(value: str) -> str:
    """A value as one URL path segment."""
    return quote(value, safe="")


class JsonHttpClient:
    """`refusals` maps a platform's error codes to exceptions (else `refused`); a subclass
    adds the platform's calls."""

    def __init__(self, http: LegacyHttpClient, refusals: dict[str, type[RemoteRefusedError]] | None = None,
                 refused: type[RemoteRefusedError] = RemoteRefusedError,
                 unavailable: type[RemoteUnavailableError] = RemoteUnavailableError):
        self.http = http
        self.refusals, self.refused, self.unavailable = refusals or {}, refused, unavailable

    def call(self, method: str, path: str, body: dict | None = None, key: str | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        try:
            headers = {"X-Api-Client": CLIENT, **({"Idempotency-Key": key} if key else {})}
            answer = self.http.request(method, path, data, headers=headers)
        except LegacyUnavailable as exc:
            raise self.unavailable(str(exc)) from exc
        try:
            payload = json.loads(answer.body) if answer.body else {}
        except ValueError:
            raise self.unavailable(f"{self.http.system}: answered {answer.status} with a body that is not JSON") \
                from None
        if answer.status >= 400:
            error = payload.get("error") if isinstance(payload, dict) else None
            error = error if isinstance(error, dict) else {}
            code, message = error.get("code", "refused"), error.get("message", f"answered {answer.status}")
            raise self.refusals.get(code, self.refused)(answer.status, code, message)
        return payload
