"""Wake a drop's watcher when its folder changes (Linux inotify), not at its next poll.

A polled folder sees a completed file up to `poll_seconds` late, half of it on
average: 250 ms at the default 0.5 s, as much as validating and publishing
30,000 rows takes. With inotify the watcher wakes as soon as a file is closed
after writing, renamed into the folder or touched (a done marker), and looks
at once. The poll stays as the timeout of each wait: it is what the
`stable` rule needs, and all there is where inotify is not (not Linux, the
process's watches used up), which is logged once.

inotify through ctypes (libc's `inotify_init1`/`inotify_add_watch`): three
calls do not justify a dependency. The events themselves are not read, only
drained: a wake-up means "look at the folder again".
"""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import eventlet
from eventlet.hubs import trampoline

log = logging.getLogger(__name__)

IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x4, 0x8, 0x80, 0x100
CHANGES = IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE


class _Quiet(Exception):
    """The wait's timeout: nothing changed."""


class FolderWakeup:
    """`wait(timeout)` returns True when `folder` changed, False after `timeout` seconds
    without a change; without inotify it sleeps `timeout` and returns False."""

    def __init__(self, folder: Path):
        self._fd = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError) as exc:  # not Linux
            log.info("file drop folder %s is polled (no inotify: %s)", folder, exc)
            return
        if fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(folder), CHANGES) >= 0:
            self._fd = fd
            return
        err = ctypes.get_errno()
        if fd >= 0:
            os.close(fd)
        log.warning("file drop folder %s is polled (inotify: %s)", folder, os.strerror(err))

    def wait(self, timeout: float) -> bool:
        if self._fd is None:
            eventlet.sleep(timeout)
            return False
        try:
            trampoline(self._fd, read=True, timeout=timeout, timeout_exc=_Quiet)
        except _Quiet:
            return False
        os.read(self._fd, 1 << 16)  # readable: the pending events (all that fit), never blocks
        return True

    def close(self):
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

