"""Safe file handling for drop folders: open only regular files inside the
folder (never through a symlink), and move files without clobbering."""
from __future__ import annotations

import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from contracts.errors import RetailbusError


class RefusedFileError(RetailbusError):
    """Not a regular file inside the drop folder: never read."""


def open_regular(folder: Path, name: str):
    """Open `folder/name` for reading, refusing symlinks, non-regular files and escapes.

    O_NOFOLLOW plus an fstat on the open descriptor closes the gap between
    looking at a name and reading it.
    """
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise RefusedFileError(f"{name!r} is not a plain file name")
    path = folder / name
    if path.is_symlink():
        raise RefusedFileError(f"{name} is a symlink")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RefusedFileError(f"{name} is not a regular file")
    return os.fdopen(fd, "rb", buffering=0), st


def inside(folder: Path, path: Path) -> bool:
    """True when `path` (resolved, symlinks followed) lies directly in `folder`."""
    return Path(os.path.realpath(path)).parent == Path(os.path.realpath(folder))


def move_unique(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / src.name
    n = 1
    while target.exists():
        target = folder / f"{src.name}.{n}"
        n += 1
    os.replace(src, target)
    return target


def archive_folder(drop_folder: Path) -> Path:
    return drop_folder / "archive" / datetime.now(timezone.utc).strftime("%Y-%m-%d")


def durable_write(path: Path, write) -> None:
    """Write via a hidden temp name, fsync, atomic rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
