"""The answers to signed POS writes, kept while their signature is valid.

A till that loses the answer to a sale (the WAN dropped it, its socket timed
out) sends the very same request again: same body, same timestamp, nonce and
signature. The nonce check alone would refuse that as a replay (401), and the
till would not know whether its sale was taken. So the agent keeps each
answer under a digest of the request until the signature's window has passed, and answers a byte-identical retry with it: the retry changes
nothing and learns what the first one did. A retry that arrives while the
first is still being handled waits for that answer. A 5xx (the outbox could
not commit, the ERP could not be reached) is not kept as final: the retry is
handled again, authenticated by the identical signature.

Identical means identical: the digest covers terminal, signature, timestamp,
nonce, method, path and body; an entry exists only once the first request
carrying it passed verification. Anything else goes through the Verifier as
before (routing/edge_auth.py), where a reused nonce is a replay.

Tens of thousands of answers are kept at a time (75 sales/s for the window),
so a final answer is kept as its digest, status, content type and body bytes,
not as the response and event that carried it (routing/expiring.py); bounded:
the oldest entries go first.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field

from eventlet.event import Event
from werkzeug.wrappers import Response

from routing.edge_auth import H_NONCE, H_SIGNATURE, H_TERMINAL, H_TIMESTAMP
from routing.expiring import ExpiringMap

MAX_ANSWERS = 100_000
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9A-Fa-f]{64}")


def _digest(terminal: str, sig: str, ts: str, nonce: str, method: str, path: str, body: bytes) -> bytes:
    """What identifies a request: its signer, its signature and everything the signature covers."""
    head = f"{terminal}\n{sig}\n{ts}\n{nonce}\n{method.upper()}\n{path}\n".encode("utf-8", "surrogatepass")
    return hashlib.sha256(head + body).digest()


@dataclass(slots=True)
class Kept:
    """One signed request's answer: pending until `done` is sent. Once final it is kept
    as one bytes, `<status> <content type>\\n<body>`: this object goes with the request."""

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
        # by request digest: a Kept while pending (or answered 5xx), else its final answer's bytes
        self._kept = ExpiringMap(max(1.0, window / 10), max_entries)

    @property
    def max_entries(self) -> int:
        return self._kept.max_entries

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
        now = time.time() if now is None else now
        if abs(now - int(ts)) > self.window or int(ts) + self.window <= now:
            return None
        digest = _digest(terminal, sig, ts, nonce, method, path, body)
        kept = self._kept.get(digest)
        if isinstance(kept, bytes):  # final: answered again as it was
            head, _, answer = kept.partition(b"\n")
            status, _, content_type = head.decode().partition(" ")
            kept = Kept(terminal, digest, int(ts) + self.window, status=int(status), body=answer,
                        content_type=content_type)
            kept.done.send(True)
        return kept

    def begin(self, headers, method: str, path: str, body: bytes, now: float | None = None) -> Kept | None:
        """A pending entry for a request the Verifier just accepted (None if it is not signed)."""
        signed = self._signed(headers)
        if signed is None:
            return None
        terminal, ts, nonce, sig = signed
        now = time.time() if now is None else now
        kept = Kept(terminal, _digest(terminal, sig, ts, nonce, method, path, body), int(ts) + self.window)
        self._kept.put(kept.digest, kept, kept.expires, now)
        return kept

    @staticmethod
    def again(kept: Kept) -> Kept:
        """The same entry, pending again: its request is handled once more (its answer was a 5xx)."""
        if kept.done.ready():
            kept.done = Event()
        return kept

    def finish(self, kept: Kept | None, response: Response | None) -> None:
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
        if kept.final:  # the few bytes of the answer, not the objects that carried it
            self._kept.replace(kept.digest, f"{kept.status} {kept.content_type}\n".encode() + kept.body)

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
