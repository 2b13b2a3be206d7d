"""`retailbus files status|reprocess`: the inbound file drops as ops see them.

Status comes from where the truth is: the folders (what waits, what sits in
`error/`) and the durable ledger (what is in progress, what finished today).
Reprocess takes a fixed file back from a drop's `error/` folder: the ledger
forgets why it was refused or rejected, then the file is moved back (with its
done marker when the drop needs one), so the running wrapper reads it again.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from datetime import datetime, timezone
from pathlib import Path

import click

from legacy_wrappers.filedrop import config as fd_config
from legacy_wrappers.filedrop.config import DropIn
from legacy_wrappers.filedrop.files import inside
from legacy_wrappers.filedrop.ledger import Ledger, identity

drops_option = click.option("--drops", "drops_path", type=click.Path(dir_okay=False, path_type=Path),
                            default=fd_config.DEFAULT_PATH, show_default=True,
                            help="the file drops config (folders relative to the project root)")


def _load(drops_path: Path) -> fd_config.FileDrops:
    try:
        return fd_config.load(drops_path)
    except fd_config.FileDropConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _regular_files(folder: Path):
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if not e.name.startswith(".") and e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def waiting(drop: DropIn, ledger: Ledger, name: str) -> int:
    """Data files in the drop folder the wrapper has not finished with (complete or not)."""
    c = drop.completion
    count = 0
    for entry in _regular_files(drop.folder):
        if not fnmatch.fnmatch(entry.name, drop.pattern) or entry.name.endswith((c.marker_suffix, c.temp_suffix)):
            continue
        if not ledger.seen(name, entry.name, identity(entry.stat(follow_symlinks=False))):
            count += 1
    return count


def rejected(drop: DropIn) -> int:
    """Files parked in `error/` (their `.rejects.csv` reports not counted)."""
    return len(rejected_files(drop))


def rejected_files(drop: DropIn) -> list:
    """The data files in `error/`, newest first."""
    files_ = [e for e in _regular_files(drop.folder / "error") if not e.name.endswith(".rejects.csv")]
    return sorted(files_, key=lambda e: e.stat(follow_symlinks=False).st_mtime, reverse=True)


SHOWN_REJECTED = 10  # per drop; the rest are counted


def why_rejected(ledger: Ledger, name: str, entry) -> str:
    """Why the file sits in error/: the ledger's reason (found by the file's content), and
    where its report of bad rows is."""
    record = ledger.file(name, _sha256(Path(entry.path)))
    reason = (record or {}).get("REASON") or "no reason recorded (moved by hand?)"
    bad = (record or {}).get("BAD_ROWS") or 0
    report = Path(entry.path).with_name(entry.name + ".rejects.csv")
    rows = f"{bad} bad row(s), " if bad else ""
    where = f" (rows in {report})" if report.exists() else ""
    state = (record or {}).get("STATE", "rejected")
    return f"{state}: {rows}{reason}{where}"


@click.group()
def files():
    """Legacy batch file drops."""


@files.command("status")
@drops_option
def files_status(drops_path):
    """Per inbound drop: files waiting, in progress, done today, rejected (in error/), and
    why each rejected file was refused."""
    cfg = _load(drops_path)
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0).isoformat()
    ledger = Ledger(cfg.ledger)
    try:
        click.echo(f"{'drop':<16} {'waiting':>8} {'in_progress':>12} {'done_today':>11} {'rejected':>9}  folder")
        for name, drop in cfg.inbound.items():
            done = ledger.counts_since(name, today).get("done", 0)
            bad = rejected_files(drop)
            click.echo(f"{name:<16} {waiting(drop, ledger, name):>8} {ledger.in_progress(name):>12} "
                       f"{done:>11} {len(bad):>9}  {drop.folder}")
            for entry in bad[:SHOWN_REJECTED]:
                click.echo(f"  error/{entry.name}: {why_rejected(ledger, name, entry)}")
            if len(bad) > SHOWN_REJECTED:
                click.echo(f"  ... and {len(bad) - SHOWN_REJECTED} more in {drop.folder / 'error'}")
    finally:
        ledger.close()


def _owning_drop(cfg: fd_config.FileDrops, path: Path) -> tuple[str, DropIn]:
    for name, drop in cfg.inbound.items():
        if inside(drop.folder / "error", path):
            return name, drop
    raise click.ClickException(
        f"{path} is not in the error/ folder of any inbound drop "
        f"({', '.join(str(d.folder / 'error') for d in cfg.inbound.values()) or 'none configured'})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@files.command("reprocess")
@drops_option
@click.argument("path", type=click.Path(path_type=Path))
def files_reprocess(drops_path, path):
    """Put PATH, a fixed file from a drop's error/ folder, back into its drop to be read again."""
    cfg = _load(drops_path)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise click.ClickException(f"{path} is not a regular file (symlinks are never reprocessed)")
    name, drop = _owning_drop(cfg, path)
    if path.name.endswith(".rejects.csv"):
        raise click.ClickException(f"{path.name} is a reject report, not a data file")
    if not fnmatch.fnmatch(path.name, drop.pattern):
        raise click.ClickException(f"{path.name} does not match the drop's pattern {drop.pattern!r}: "
                                   "rename it first")
    target = drop.folder / path.name
    if os.path.lexists(target):
        raise click.ClickException(f"{target} already exists in the drop folder")
    ledger = Ledger(cfg.ledger)
    try:
        sha = _sha256(path)
        if ledger.forget_failure(name, sha) == "done":
            raise click.ClickException(f"{path.name}: this content (sha256 {sha}) was published before; "
                                       "reprocessing it would publish nothing. Fix the file first.")
        ledger.forget(name, path.name)
    finally:
        ledger.close()
    os.rename(path, target)
    if drop.completion.rule == "marker":
        (drop.folder / (path.name + drop.completion.marker_suffix)).touch()
    click.echo(f"{path.name} is back in drop {name!r} ({target}); it will be read again")
