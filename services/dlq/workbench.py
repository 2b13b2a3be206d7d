"""The dead-letter workbench behind `retailbus dlq`: select, edit, replay, purge, audit.

A replay goes to the failed handler's own queue (default exchange, routing key
= its queue), never to the original exchange: that would deliver the message
again to every other consumer, which already handled it. That queue is the one
whose DLQ held the message; a dead letter whose `x-retailbus-queue` header names
another is not replayed (someone wrote it there). An edited message is
validated as a CloudEvent and as its registered contract before anything is
sent, and may not change what identifies it: `id`, `type`, `idempotencykey`
(the inbox drops a repeat by it), `subject`, or its store (`data.store_id`,
the store in `source`, the `x-retailbus-store` header), which the consumers'
store check trusts from the original sender. Every replay and purge appends
one JSON line to the audit file (who: `--user` as given and the account the
process runs as; when, which message, why, and for an edit what changed) and
fsyncs it before the message is published or the dead letter acked: an audit
that cannot be written stops the replay; a publish that fails after it is
audited as failed.
"""
from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import os
import pwd
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from contracts.errors import RetailbusError
from contracts.envelope import CloudEvent
from contracts.errors import ContractError
from bus.constants import H_STORE
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

class ReplayRefused(RetailbusError, ValueError):
    """Raised for a dead letter that is not replayed as it is; `errors` are (field path, reason)."""

    what = "replay refused"

    def __init__(self, message_id: str, errors: list[tuple[str, str]]):
        self.message_id = message_id
        self.errors = errors
        super().__init__(f"{message_id}: {self.what}: " + "; ".join(f"{p}: {r}" for p, r in errors))


class EditRefused(ReplayRefused):
    """Raised for an edited body that is not a valid message or changes what identifies it."""

    what = "edit refused"


class AuditError(RetailbusError):
    """Raised when the audit file cannot be written: nothing is replayed or purged unaudited."""


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


def _source_store(source) -> str | None:
    """The store a `store/<id>/...` source names."""
    parts = source.split("/") if isinstance(source, str) else []
    return parts[1] if len(parts) > 1 and parts[0] == "store" else None


def _identity(doc: dict) -> dict:
    data = doc.get("data") if isinstance(doc.get("data"), dict) else {}
    return {"idempotencykey": doc.get("idempotencykey"), "subject": doc.get("subject"),
            "data.store_id": data.get("store_id"), "source (its store)": _source_store(doc.get("source"))}


def _identity_changes(letter: DeadLetter, original, doc: dict) -> list[tuple[str, object, object]]:
    """(path, was, now) of every identity field the edit changes: against the parked body
    when it was a JSON object, and the store against the x-retailbus-store header too."""
    now = _identity(doc)
    changed = []
    if isinstance(original, dict) and original:
        changed = [(path, old, now[path]) for path, old in _identity(original).items() if now[path] != old]
    header = letter.headers.get(H_STORE)
    header = header.decode("utf-8", "replace") if isinstance(header, bytes) else header
    seen = {path for path, _, _ in changed}
    if header is not None:
        changed += [(path, f"{header} (x-retailbus-store)", now[path])
                    for path in ("data.store_id", "source (its store)")
                    if now[path] not in (None, header) and path not in seen]
    return changed


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
    fixed += [(path, f"cannot change {old!r} to {new!r}: it identifies the message (the inbox drops a "
               "repeat by its key, consumers trust its store from the sender); purge it and have it sent again")
              for path, old, new in _identity_changes(letter, original, doc)]
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
        """Returns once the record is on disk; AuditError if it cannot be."""
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(f"short write to {self.path}")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise AuditError(f"cannot write the audit file {self.path}: {exc}") from exc

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _fingerprint(letter: DeadLetter) -> tuple[str, str, str]:
    return letter.dlq, letter.id, hashlib.sha256(letter.body).hexdigest()


def os_user() -> tuple[str, int]:
    """(name, uid) of the account this process runs as, from the kernel's uid: `--user`
    and $USER are whatever the caller typed or set."""
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name, uid
    except KeyError:  # a uid without a passwd entry (a container)
        return str(uid), uid


# --- the workbench ----------------------------------------------------------------------

@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)  # message ids replayed or purged
    refused: list[ReplayRefused] = field(default_factory=list)


class Workbench:
    def __init__(self, store: DeadLetterStore, audit: AuditLog, user: str):
        self.store = store
        self.audit = audit
        self.user = user

    def list(self, selection: Selection = Selection()) -> list[DeadLetter]:
        return self.store.browse(selection)

    def _record(self, action: str, letter: DeadLetter, reason: str | None, **extra) -> None:
        name, uid = os_user()
        self.audit.append({
            "at": datetime.now(timezone.utc).isoformat(), "action": action, "user": self.user,
            "os_user": name, "os_uid": uid,
            "message_id": letter.id, "type": letter.type, "queue": letter.queue, "dlq": letter.dlq,
            "attempts": letter.attempts, "error": letter.error, "reason": reason, **extra})

    def replay(self, selection: Selection, reason: str | None = None,
               editor: Callable[[str], str | None] | None = None) -> Outcome:
        """Audit, republish the selected dead letters to their handler queues (confirmed),
        then ack them. With `editor` (text in, edited text or None out) each body is
        edited first; an invalid edit is refused and that dead letter stays parked, as
        does one whose queue header is not its DLQ's. AuditError stops the replay."""
        outcome = Outcome()
        edits: dict[tuple, Edit | None] = {}
        if editor is not None:
            for letter in self.store.browse(selection):
                if letter.queue_header not in (None, letter.queue):
                    continue  # refused below whatever the edit: not worth an operator's time
                text = editor(pretty(letter.body))
                try:
                    edits[_fingerprint(letter)] = None if text is None else check_edit(letter, text)
                except EditRefused as refused:
                    outcome.refused.append(refused)

        def act(letter: DeadLetter, publish) -> bool:
            if letter.queue_header not in (None, letter.queue):
                outcome.refused.append(ReplayRefused(letter.id, [(
                    "x-retailbus-queue", f"names {letter.queue_header!r}, but the message was parked in "
                    f"{letter.dlq!r}: not written by {letter.queue}'s handler; purge it")]))
                return False
            edit = None
            if editor is not None:
                key = _fingerprint(letter)
                if key not in edits:  # refused, or arrived after the editing: left parked
                    return False
                edit = edits.pop(key)
            if edit is not None and not edit.changes:
                edit = None  # saved without a change
            self._record("replay", letter, reason, edited=edit is not None,
                         **({"changes": edit.changes, "diff": edit.diff} if edit else {}))
            try:
                publish(letter.replay_message(edit.body if edit else letter.body), letter.queue)
            except Exception as exc:
                self._record("replay_failed", letter, reason, failure=f"{type(exc).__name__}: {exc}")
                raise
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
