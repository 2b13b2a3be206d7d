"""The file drops' share of retention: ledger rows of long-finished files, outbound
batch files long handed over, and inbound archive days, a batch at a time.

An outbound file counts as handed over once its done marker exists; it goes
(with the marker) `outbound_files_days` after it was written. An archive day
folder (`archive/YYYY-MM-DD/`) goes once the whole day is older than
`archive_days`. "Goes" is `files_action`: deleted, or moved under `move_to`,
in a subfolder per drop, where ops' own tooling takes over.
"""
from __future__ import annotations

import shutil
import time
from datetime import date
from pathlib import Path

from nameko.extensions import DependencyProvider

from legacy_wrappers.filedrop.inbound import FileLedger
from bus.extensions import container_settings
from bus.retention import before, in_batches
from bus.settings import RetentionSettings


def _retire(path: Path, settings: RetentionSettings, drop: str, root: Path) -> None:
    if settings.files_action == "delete":
        path.unlink(missing_ok=True)
        return
    target = root / Path(settings.move_to) / drop / path.parent.name
    target.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), target / path.name)


def prune_outbound(folder: Path, prefix: str, suffix: str, marker_suffix: str, older_than: float,
                   limit: int, retire) -> int:
    """Retire up to `limit` handed-over files (and their markers) last written before
    `older_than` (unix time); returns how many files."""
    done = 0
    for path in sorted(folder.glob(f"{prefix}_*{suffix}")):
        marker = path.with_name(path.name + marker_suffix)
        try:
            if not marker.exists() or path.stat().st_mtime >= older_than:
                continue
        except FileNotFoundError:  # the legacy job took it meanwhile
            continue
        retire(path)
        retire(marker)
        done += 1
        if done >= limit:
            break
    return done


def prune_archive(drop_folder: Path, older_than: date, limit: int, retire) -> int:
    """Retire up to `limit` files of archive day folders before `older_than`; an emptied
    day folder is removed. Returns how many files."""
    done = 0
    archive = drop_folder / "archive"
    if not archive.is_dir():
        return 0
    for day in sorted(archive.iterdir()):
        try:
            if date.fromisoformat(day.name) >= older_than:
                break  # sorted by name, which is by date
        except ValueError:
            continue  # not a day folder of ours
        for path in sorted(day.iterdir()):
            retire(path)
            done += 1
            if done >= limit:
                return done
        day.rmdir()
    return done


class FileRetention(DependencyProvider):
    shared = FileLedger()

    def setup(self):
        settings = container_settings(self.container.config)[1]
        self.settings, self.root = settings.retention, settings.root

    def get_dependency(self, worker_ctx):
        return self

    def prune(self) -> dict[str, int]:
        r, drops = self.settings, self.shared.drops
        out = {"ledger": in_batches("filedrop_ledger", lambda n: self.shared.ledger.prune(
            before(r.ledger_days).isoformat(), n), r.batch, r.max_batches)}
        written_before = time.time() - r.outbound_files_days * 86400
        for name, d in drops.outbound.items():
            out[f"outbound:{name}"] = in_batches("outbound_files", lambda n, d=d, name=name: prune_outbound(
                d.folder, d.prefix, d.suffix, d.marker_suffix, written_before, n,
                lambda p: _retire(p, r, name, self.root)), r.batch, r.max_batches)
        archived_before = before(r.archive_days).date()
        for name, d in drops.inbound.items():
            out[f"archive:{name}"] = in_batches("archived_files", lambda n, d=d, name=name: prune_archive(
                d.folder, archived_before, n, lambda p: _retire(p, r, name, self.root)), r.batch, r.max_batches)
        return out
