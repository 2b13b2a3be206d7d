"""POS terminals authenticate to their store agent with a per-terminal key.

Every POS call carries four headers:

    X-Retailbus-Terminal   the terminal id (as in the payload's TERMINAL)
    X-Retailbus-Timestamp  unix seconds when the request was signed
    X-Retailbus-Nonce      8-64 characters [A-Za-z0-9_-], never reused
    X-Retailbus-Signature  hex HMAC-SHA256(key, "<timestamp>\\n<nonce>\\n<METHOD>\\n<path?query>\\n" + body)

A request outside the window (default 5 minutes either side), with an
unknown terminal, a wrong signature or a nonce seen within the window is
refused with 401. Method and path are signed too, so a signature for a
stock query cannot be replayed as a sale. Nonces are remembered in memory
until their window has passed (bounded: the oldest go first); a restart of
the agent forgets them, which reopens replay only for requests signed in
the five minutes before it.

Keys live in `terminal_keys.json` beside the store's outbox (`var/`, mode
0600, never in git), written by `retailbus agent keys add`; the agent
re-reads the file when it changes, so a new till needs no restart.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from pathlib import Path

from contracts.errors import RetailbusError
from routing.expiring import ExpiringMap

H_TERMINAL = "X-Retailbus-Terminal"
H_TIMESTAMP = "X-Retailbus-Timestamp"
H_NONCE = "X-Retailbus-Nonce"
H_SIGNATURE = "X-Retailbus-Signature"
NONCE = re.compile(r"[A-Za-z0-9_-]{8,64}")
TIMESTAMP = re.compile(r"[0-9]{1,12}")  # not str.isdigit: it takes "²", which int() refuses
SIGNATURE = re.compile(r"[0-9A-Fa-f]{64}")  # compare_digest raises on a non-ASCII str
MAX_NONCES = 500_000


class AuthError(RetailbusError):
    """Why a request is not authenticated (the message goes back to the POS)."""


def signature(key: bytes, timestamp: str, nonce: str, method: str, path: str, body: bytes) -> str:
    message = f"{timestamp}\n{nonce}\n{method.upper()}\n{path}\n".encode() + body
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def signed_headers(terminal: str, key: bytes, method: str, path: str, body: bytes,
                   timestamp: float | None = None, nonce: str | None = None) -> dict:
    """The headers a POS sends (used by tests, benchmarks and the demo traffic)."""
    ts = str(int(time.time() if timestamp is None else timestamp))
    nonce = nonce or secrets.token_urlsafe(16)
    return {H_TERMINAL: terminal, H_TIMESTAMP: ts, H_NONCE: nonce,
            H_SIGNATURE: signature(key, ts, nonce, method, path, body)}


class TerminalKeys:
    """The store's terminal keys, re-read when the file changes."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp = None
        self._keys: dict[str, bytes] = {}

    def get(self, terminal: str) -> bytes | None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._keys = {t: bytes.fromhex(k) for t, k in self._load().items()}
            self._stamp = stamp
        return self._keys.get(terminal)

    def _load(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def add(self, terminal: str) -> str:
        """Generate (or replace) the key of `terminal`; returns it once, as hex."""
        if not re.fullmatch(r"[A-Za-z0-9]{1,8}", terminal):
            raise ValueError(f"terminal: expected 1-8 letters or digits, got {terminal!r}")
        keys = self._load()
        keys[terminal] = secrets.token_hex(32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(keys, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return keys[terminal]


class NonceCache:
    """Nonces seen within the window: a short string each, dropped a slice at a time once
    expired (routing/expiring.py), the oldest first beyond `max_entries`."""

    def __init__(self, window: float, max_entries: int = MAX_NONCES):
        self.window = window
        self._seen = ExpiringMap(max(1.0, window / 10), max_entries)

    def claim(self, terminal: str, nonce: str, now: float) -> bool:
        """True the first time (terminal, nonce) is seen within the window."""
        key = f"{terminal}\n{nonce}"  # unambiguous: a NONCE has no newline
        self._seen.expire(now)
        if key in self._seen:
            return False
        self._seen.put(key, True, now + 2 * self.window, now)
        return True

    def __len__(self):
        return len(self._seen)


class Verifier:
    def __init__(self, keys: TerminalKeys, window: float = 300.0):
        self.keys = keys
        self.window = window
        self.nonces = NonceCache(window)

    def verify(self, headers, method: str, path: str, body: bytes, now: float | None = None) -> str:
        """The authenticated terminal id, or AuthError naming what is wrong."""
        now = time.time() if now is None else now
        terminal, ts, nonce, sig = (headers.get(h) for h in (H_TERMINAL, H_TIMESTAMP, H_NONCE, H_SIGNATURE))
        missing = [h for h, v in ((H_TERMINAL, terminal), (H_TIMESTAMP, ts), (H_NONCE, nonce),
                                  (H_SIGNATURE, sig)) if not v]
        if missing:
            raise AuthError(f"unsigned request: missing {', '.join(missing)}")
        if not TIMESTAMP.fullmatch(ts):
            raise AuthError(f"{H_TIMESTAMP}: expected unix seconds, got {ts[:20]!r}")
        if abs(now - int(ts)) > self.window:
            raise AuthError(f"{H_TIMESTAMP}: outside the {self.window:g}s window (check the till's clock)")
        if not NONCE.fullmatch(nonce):
            raise AuthError(f"{H_NONCE}: expected 8-64 characters [A-Za-z0-9_-]")
        if not SIGNATURE.fullmatch(sig):
            raise AuthError(f"{H_SIGNATURE}: expected 64 hex digits (HMAC-SHA256)")
        key = self.keys.get(terminal)
        if key is None:
            raise AuthError(f"{H_TERMINAL}: unknown terminal {terminal!r}")
        if not hmac.compare_digest(signature(key, ts, nonce, method, path, body), sig.lower()):
            raise AuthError(f"{H_SIGNATURE}: does not match the request")
        if not self.nonces.claim(terminal, nonce, now):
            raise AuthError(f"{H_NONCE}: replayed request")
        return terminal
