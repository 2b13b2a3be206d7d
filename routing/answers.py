"""The answers to signed POS writes, kept while their signature is valid.

A till that loses the answer to a sale (the WAN dropped it, its socket timed
out) sends the very same request again: same body, same timestamp, nonce and
signature. The nonce check alone would refuse that as a replay (401), and the
till would not know whether its sale was taken. So the agent keeps each
answer under the request's (terminal, signature) until the signature's window
has passed, and answers a byte-identical retry with it: the retry changes
nothing and learns what the first one did. A retry that arrives while the
first is still being handled waits for that answer. A 5xx (the outbox could
not commit, the ERP could not be reached) is not kept as final: the retry is
handled again, authenticated by the identical signature.

Identical means identical: the cache holds a digest of timestamp, nonce,
method, path and body, compared in full; a signature is only looked up here
after the first request carrying it passed verification. Anything else goes
through the Verifier as before (routing/edge_auth.py), where a reused nonce is
a replay. Bounded: the oldest entries go first.
"""
from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from eventlet.event import Event
from werkzeug.wrappers import Response

from routing.edge_auth import H_NONCE, H_SIGNATURE, H_TERMINAL, H_TIMESTAMP

MAX_ANSWERS = 100_000
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9A-Fa-f]{64}")


def _digest(ts: str, nonce: str, method: str, path: str, body: bytes) -> bytes:
    head = f"{ts}\n{nonce}\n{method.upper()}\n{path}\n".encode("utf-8", "surrogatepass")
    return hashlib.sha256(head + body).digest()


@dataclass
class Kept:
    """One signed request's answer: pending until `done` is sent."""

    terminal: str
    digest: bytes
    expires: float
    done: Event = field(default_factory=Event)
    status: int = 0
    body: bytes = b""
    content_type: str = "application/json"

    @property
    def final(self) -> bool:
        return self.done.ready() and self.status < 500

    def response(self) -> Response:
        return Response(self.body, status=self.status, content_type=self.content_type)


class AnswerCache:
    def __init__(self, window: float, max_entries: int = MAX_ANSWERS):
        self.window = window
        self.max_entries = max_entries
        self._kept: OrderedDict[tuple[str, str], Kept] = OrderedDict()

    @staticmethod
    def _signed(headers) -> tuple[str, str, str, str] | None:
        terminal, ts, nonce, sig = (headers.get(h) for h in (H_TERMINAL, H_TIMESTAMP, H_NONCE, H_SIGNATURE))
        if not (terminal and nonce and ts and sig and _TIMESTAMP.fullmatch(ts) and _SIGNATURE.fullmatch(sig)):
            return None
        return terminal, ts, nonce, sig.lower()

    def lookup(self, headers, method: str, path: str, body: bytes, now: float | None = None) -> Kept | None:
        """The kept answer of a byte-identical earlier request whose signature is still valid."""
        signed = self._signed(headers)
        if signed is None:
            return None
        terminal, ts, nonce, sig = signed
        kept = self._kept.get((terminal, sig))
        now = time.time() if now is None else now
        if kept is None or kept.expires <= now or abs(now - int(ts)) > self.window:
            return None
        return kept if kept.digest == _digest(ts, nonce, method, path, body) else None

    def begin(self, headers, method: str, path: str, body: bytes, now: float | None = None) -> Kept | None:
        """A pending entry for a request the Verifier just accepted (None if it is not signed)."""
        signed = self._signed(headers)
        if signed is None:
            return None
        terminal, ts, nonce, sig = signed
        now = time.time() if now is None else now
        while self._kept:
            oldest = next(iter(self._kept.values()))
            if oldest.expires > now and len(self._kept) < self.max_entries:
                break
            self._kept.popitem(last=False)
        kept = Kept(terminal, _digest(ts, nonce, method, path, body), int(ts) + self.window)
        self._kept[(terminal, sig)] = kept
        return kept

    @staticmethod
    def again(kept: Kept) -> Kept:
        """The same entry, pending again: its request is handled once more (its answer was a 5xx)."""
        if kept.done.ready():
            kept.done = Event()
        return kept

    @staticmethod
    def finish(kept: Kept | None, response: Response | None) -> None:
        """Keep `response` (None: the handler raised, which is answered 500) and wake waiting retries."""
        if kept is None:
            return
        if response is None:
            kept.status, kept.body = 500, b""
        else:
            kept.status, kept.body = response.status_code, response.get_data()
            kept.content_type = response.content_type or kept.content_type
        if not kept.done.ready():
            kept.done.send(True)

    def once(self, request, body: bytes, authenticate, handle) -> Response:
        """`handle(terminal)` once per signed request: `authenticate(request, body)` gives
        (terminal, None) or (None, the refusal) as the Verifier decides; a byte-identical retry
        gets the kept answer (waiting for it while the first is in flight)."""
        path = request.path + (f"?{request.query_string.decode()}" if request.query_string else "")
        kept = self.lookup(request.headers, request.method, path, body)
        if kept is not None:
            kept.done.wait()  # the first request's answer: it always comes (see the finally below)
            if kept.final:
                return kept.response()
            terminal = self.again(kept).terminal  # a 5xx: handled again, authenticated by the identical signature
        else:
            terminal, refused = authenticate(request, body)
            if refused:
                return refused
            kept = self.begin(request.headers, request.method, path, body)
        response = None
        try:
            response = handle(terminal)
            return response
        finally:
            self.finish(kept, response)

    def __len__(self):
        return len(self._kept)
