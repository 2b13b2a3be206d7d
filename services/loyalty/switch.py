"""Switching the accrual mode at run time (`retailbus loyalty mode`), audited, the way routes are.

The switch rewrites only the `accrual:` block of config/loyalty.yaml (the rest, its
comments included, stays as written), to a temporary file that is validated,
fsynced and renamed over the old one; the services see the new file on their next
message (services/loyalty/config.py). The new mode applies to sales the ERP posts
from `lead` seconds ahead, and the mode before it is kept for the sales posted
earlier (`Accrual.mode_at`): the files service and the loyalty service read the
file each on its own and each with its own backlog, yet agree on every sale about
who earns it, so no sale is earned twice or not at all across a switch.

Every switch is first appended and fsynced to the audit file (who: `--user` as
given and the OS account; when; the mode before -> after and from when; why): if
the audit cannot be written, the file is not switched.
"""
from __future__ import annotations

import fcntl
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml
from pydantic import ValidationError

from contracts.errors import RetailbusError, format_validation_error
from services.dlq.workbench import AuditLog, os_user
from services.loyalty.rules import Accrual, EarlierMode, LoyaltyConfig, Mode, load

KEEP = 20  # earlier modes kept: older sales than the oldest listed earn by it
BLOCK_START = re.compile(r"^accrual\s*:")


class SwitchRefusedError(RetailbusError):
    """Raised when a mode switch is not made: same mode, a bad rules file, or the audit not writable."""


@dataclass(frozen=True)
class Switch:
    before: Accrual
    after: Accrual
    audit: dict


def switched(current: Accrual, mode: Mode, at: datetime) -> Accrual:
    """`current` moved to `mode` for sales posted from `at` on, the earlier modes kept."""
    if current.since is not None and at <= current.since:
        at = current.since + timedelta(milliseconds=1)  # a switch still pending: this one follows it
    earlier = (EarlierMode(mode=current.mode, since=current.since), *current.before)[:KEEP]
    return Accrual(mode=mode, since=at, before=earlier)


def render(accrual: Accrual) -> str:
    """The `accrual:` block as YAML text."""
    lines = ["accrual:",
             f"  mode: {accrual.mode}              # file | api | shadow: written by `retailbus loyalty mode` "
             "(audit: RETAILBUS.loyalty_audit)"]
    if accrual.since is not None:
        lines.append(f"  since: {accrual.since.isoformat()}   # sales the ERP posts from then on earn by `mode`")
    if accrual.before:
        lines.append("  before:                 # earlier modes, newest first: sales posted before `since`")
        for earlier in accrual.before:
            since = f", since: {earlier.since.isoformat()}" if earlier.since else ""
            lines.append(f"    - {{mode: {earlier.mode}{since}}}")
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    """`text` with its top-level `accrual:` block (the key and the indented or blank lines after
    it) replaced by `block`; appended when there is none."""
    lines = text.splitlines(keepends=True)
    start = next((n for n, line in enumerate(lines) if BLOCK_START.match(line)), None)
    if start is None:
        return text + ("" if not text or text.endswith("\n") else "\n") + block
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t"):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines before the next key stay
        end -= 1
    return "".join(lines[:start]) + block + "".join(lines[end:])


def switch_mode(rules: Path, audit: Path, mode: Mode, reason: str, user: str, lead: float = 5.0,
                now: datetime | None = None) -> Switch:
    """Switch the accrual mode of the rules file at `rules` to `mode`; see the module."""
    rules, now = Path(rules), now or datetime.now(timezone.utc)
    lock = os.open(rules.with_name(rules.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two operators at once: one after the other
        try:
            current = load(rules)
        except RetailbusError as exc:
            raise SwitchRefusedError(f"the running rules file is not valid, fix it first: {exc}") from None
        if current.accrual.mode == mode and (current.accrual.since is None or current.accrual.since <= now):
            raise SwitchRefusedError(f"accrual mode is {mode} already (since {current.accrual.since or 'the start'})")
        after = switched(current.accrual, mode, now + timedelta(seconds=lead))
        text = replace_block(rules.read_text(), render(after))
        try:
            checked = LoyaltyConfig.model_validate(yaml.safe_load(text))
        except (yaml.YAMLError, ValidationError) as exc:
            detail = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
            raise SwitchRefusedError(f"{rules}: the switched file would not be valid: {detail}") from None
        if checked.accrual != after or checked.model_copy(update={"accrual": current.accrual}) != current:
            raise SwitchRefusedError(f"{rules}: the accrual block could not be replaced alone; edit it by hand")
        temp = rules.with_name(f".{rules.name}.{os.getpid()}.tmp")
        _write_synced(temp, text)
        os_name, uid = os_user()
        record = {"time": now.isoformat(), "action": "accrual_mode", "user": user, "os_user": os_name,
                  "os_uid": uid, "file": str(rules), "reason": reason,
                  "before": {"mode": current.accrual.mode, "since": _iso(current.accrual.since)},
                  "after": {"mode": after.mode, "since": _iso(after.since)}}
        try:
            AuditLog(audit).append(record)
        except RetailbusError as exc:
            temp.unlink(missing_ok=True)
            raise SwitchRefusedError(f"{exc}: the mode was not switched") from None
        os.replace(temp, rules)
        _sync_dir(rules.parent)
        return Switch(current.accrual, after, record)
    finally:
        os.close(lock)


def history(audit: Path) -> list[dict]:
    return [r for r in AuditLog(audit).records() if r.get("action") == "accrual_mode"]


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
