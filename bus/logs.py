"""JSON log lines: one object per line with the message id and correlation id
when the call site passes them (`extra={"id": ..., "correlationid": ...}`)."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import eventlet

_CONTEXT = ("id", "correlationid", "outcome", "route", "store", "queue")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class MinuteSummary:
    """What a hot path did, said once a minute at INFO instead of once per message.

    Each event is still logged at DEBUG by its caller (switch a logger to DEBUG to
    see them); warnings and errors are never summarised. The minute's line is
    written by a timer when the minute ends, so the last minute before traffic
    stops is said too.
    """

    def __init__(self, logger: logging.Logger, what: str, every: float = 60.0):
        self.logger, self.what, self.every = logger, what, every
        self.counts: dict[str, int] = {}
        self._timer = None

    def note(self, outcome: str, n: int = 1) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + n
        if self._timer is None:
            self._timer = eventlet.spawn_after(self.every, self.flush)

    def flush(self) -> None:
        counts, self.counts, self._timer = self.counts, {}, None
        if counts:
            self.logger.info("%s in the last %gs: %s", self.what, self.every,
                             ", ".join(f"{outcome} {n}" for outcome, n in sorted(counts.items())),
                             extra={"outcome": "summary"})
