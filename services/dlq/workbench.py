"""The dead-letter workbench behind `retailbus dlq`: select, edit, replay, purge, audit.

A replay goes to the failed handler's own queue (default exchange, routing key
= its queue), never to the original exchange: that would deliver the message
again to every other consumer, which already handled it. An edited message is
validated as a CloudEvent and as its registered contract before anything is
sent; every replay and purge appends one JSON line to the audit file (who,
when, which message, why, and for an edit what changed), before the dead
letter is acked.
"""
from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from contracts.errors import RetailbusError
from contracts.envelope import CloudEvent
from contracts.errors import ContractError
from services.dlq.store import DeadLetter, DeadLetterStore

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`30m`, `2h`, `1d`, `90s` ago, or an ISO time (UTC when it names no zone)."""
    text = text.strip()
    relative = _RELATIVE.match(text)
    if relative:
        now = now or datetime.now(timezone.utc)
        return now - timedelta(**{_UNITS[relative.group(2)]: float(relative.group(1))})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a duration like 30m, 2h, 1d or an ISO time "
                         "like 2026-11-27T10:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command works on. `queue` and `type` are shell-style
    patterns (`evt-*erp*`, `pos.*`); `queue` matches the handler queue or the DLQ."""

    ids: frozenset[str] = frozenset()
    queue: str | None = None
    type: str | None = None
    since: datetime | None = None

    def __call__(self, letter: DeadLetter) -> bool:
        if self.ids and letter.id not in self.ids:
            return False
        if self.queue and not (fnmatch.fnmatchcase(letter.queue, self.queue)
                               or fnmatch.fnmatchcase(letter.dlq, self.queue)):
            return False
        if self.type and not fnmatch.fnmatchcase(letter.type or "", self.type):
            return False
        if self.since:
            failed = letter.last_failure
            if failed is None or (failed if failed.tzinfo else failed.replace(tzinfo=timezone.utc)) < self.since:
                return False
        return True


# --- editing ----------------------------------------------------------------------------

class EditRefused(RetailbusError, ValueError):
    """An edited body that is not a valid message; `errors` are (field path, reason)."""

    def __init__(self, message_id: str, errors: list[tuple[str, str]]):
        self.message_id = message_id
        self.errors = errors
        super().__init__(f"{message_id}: edit refused: " + "; ".join(f"{p}: {r}" for p, r in errors))


def pretty(body: bytes) -> str:
    """The body as an operator edits it: indented JSON (raw text if it is not JSON)."""
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False) + "\n"
    except ValueError:
        return body.decode("utf-8", "replace")


def changes(old: Any, new: Any, path: str = "") -> list[dict]:
    """Every leaf that differs, as {path, old, new}; paths like `data.lines.0.line_no`."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append({"path": sub, "old": old[key], "new": None, "removed": True})
            elif key not in old:
                out.append({"path": sub, "old": None, "new": new[key], "added": True})
            else:
                out += changes(old[key], new[key], sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in changes(a, b, f"{path}.{i}" if path else str(i))]
    return [] if old == new and type(old) is type(new) else [{"path": path or "<root>", "old": old, "new": new}]


@dataclass
class Edit:
    body: bytes  # what is published: the edited JSON, compact
    changes: list[dict]
    diff: str


def check_edit(letter: DeadLetter, text: str) -> Edit:
    """Validate an edited body; raise EditRefused naming every bad field path."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise EditRefused(letter.id, [("<body>", f"not JSON: {exc}")]) from None
    if not isinstance(doc, dict):
        raise EditRefused(letter.id, [("<body>", "expected a JSON object (a CloudEvent)")])
    try:
        event = CloudEvent.model_validate(doc)
        event.payload()
    except ValidationError as exc:
        raise EditRefused(letter.id, ContractError.from_validation(exc, "event").errors) from None
    except ContractError as exc:
        raise EditRefused(letter.id, exc.errors or [("<body>", str(exc))]) from None
    try:
        original = json.loads(letter.body)
    except ValueError:  # parked because it was not JSON: every field is new
        original = {}
    was = {"id": letter.id, "type": letter.type}
    fixed = [(name, f"cannot change {was[name]!r} to {doc.get(name)!r}: the dead letter is "
              "replayed to the queue of the handler that failed on this message")
             for name in ("id", "type") if doc.get(name) != was[name]]
    if fixed:
        raise EditRefused(letter.id, fixed)
    diff = "".join(difflib.unified_diff(
        pretty(letter.body).splitlines(True), pretty(json.dumps(doc).encode()).splitlines(True),
        f"{letter.id} (dead letter)", f"{letter.id} (replayed)"))
    return Edit(json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode(), changes(original, doc), diff)


# --- audit ------------------------------------------------------------------------------

class AuditLog:
    """Append-only JSON lines; each record is written and fsynced in one append."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _fingerprint(letter: DeadLetter) -> tuple[str, str, str]:
    return letter.dlq, letter.id, hashlib.sha256(letter.body).hexdigest()


# --- the workbench ----------------------------------------------------------------------

@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)  # message ids replayed or purged
    refused: list[EditRefused] = field(default_factory=list)


class Workbench:
    def __init__(self, store: DeadLetterStore, audit: AuditLog, user: str):
        self.store = store
        self.audit = audit
        self.user = user

    def list(self, selection: Selection = Selection()) -> list[DeadLetter]:
        return self.store.browse(selection)

    def _record(self, action: str, letter: DeadLetter, reason: str | None, **extra) -> None:
        self.audit.append({
            "at": datetime.now(timezone.utc).isoformat(), "action": action, "user": self.user,
            "message_id": letter.id, "type": letter.type, "queue": letter.queue, "dlq": letter.dlq,
            "attempts": letter.attempts, "error": letter.error, "reason": reason, **extra})

    def replay(self, selection: Selection, reason: str | None = None,
               editor: Callable[[str], str | None] | None = None) -> Outcome:
        """Republish the selected dead letters to their handler queues (confirmed), audit,
        then ack them. With `editor` (text in, edited text or None out) each body is
        edited first; an invalid edit is refused and that dead letter stays parked."""
        outcome = Outcome()
        edits: dict[tuple, Edit | None] = {}
        if editor is not None:
            for letter in self.store.browse(selection):
                text = editor(pretty(letter.body))
                try:
                    edits[_fingerprint(letter)] = None if text is None else check_edit(letter, text)
                except EditRefused as refused:
                    outcome.refused.append(refused)

        def act(letter: DeadLetter, publish) -> bool:
            edit = None
            if editor is not None:
                key = _fingerprint(letter)
                if key not in edits:  # refused, or arrived after the editing: left parked
                    return False
                edit = edits.pop(key)
            if edit is not None and not edit.changes:
                edit = None  # saved without a change
            publish(letter.replay_message(edit.body if edit else letter.body), letter.queue)
            self._record("replay", letter, reason, edited=edit is not None,
                         **({"changes": edit.changes, "diff": edit.diff} if edit else {}))
            outcome.done.append(letter.id)
            return True

        self.store.settle(selection, act)
        return outcome

    def purge(self, selection: Selection, reason: str) -> Outcome:
        """Drop the selected dead letters; the audit record keeps the body."""
        outcome = Outcome()

        def act(letter: DeadLetter, _publish) -> bool:
            self._record("purge", letter, reason, body=letter.body.decode("utf-8", "replace"),
                         headers=letter.describe()["headers"])
            outcome.done.append(letter.id)
            return True

        self.store.settle(selection, act)
        return outcome
