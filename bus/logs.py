"""JSON log lines: one object per line with the message id and correlation id
when the call site passes them (`extra={"id": ..., "correlationid": ...}`)."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

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
