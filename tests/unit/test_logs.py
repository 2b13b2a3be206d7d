"""bus/logs.py: one JSON object per line, carrying id and correlationid."""
from __future__ import annotations

import json
import logging
import sys

import pytest

from bus.logs import JsonFormatter

pytestmark = pytest.mark.unit


def record(msg="accepted %s", args=("S001-07-1",), level=logging.INFO, extra=None, exc_info=None):
    logger = logging.getLogger("retailbus.test")
    return logger.makeRecord("retailbus.test", level, __file__, 10, msg, args, exc_info, extra=extra)


def emit(**kwargs) -> dict:
    line = JsonFormatter().format(record(**kwargs))
    assert "\n" not in line  # one line per record
    return json.loads(line)


def test_message_level_logger_and_time():
    out = emit()
    assert out["message"] == "accepted S001-07-1"
    assert out["level"] == "INFO" and out["logger"] == "retailbus.test"
    assert out["time"].endswith("+00:00") and "T" in out["time"]
    assert "id" not in out and "correlationid" not in out


def test_id_and_correlationid_from_extra():
    out = emit(extra={"id": "01HXYZ", "correlationid": "01HABC", "outcome": "duplicate",
                      "route": "sales", "store": "S001", "queue": "q1"})
    assert out["id"] == "01HXYZ" and out["correlationid"] == "01HABC"
    assert (out["outcome"], out["route"], out["store"], out["queue"]) == ("duplicate", "sales", "S001", "q1")


def test_unknown_extra_is_not_emitted_and_none_is_skipped():
    out = emit(extra={"id": None, "correlationid": "c1", "secret": "x"})
    assert "id" not in out and "secret" not in out
    assert out["correlationid"] == "c1"


def test_exception_goes_into_error_on_the_same_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        info = sys.exc_info()
    out = emit(level=logging.ERROR, exc_info=info, extra={"id": "e1"})
    assert out["level"] == "ERROR" and out["id"] == "e1"
    assert "ValueError: boom" in out["error"] and "Traceback" in out["error"]


def test_non_json_values_are_stringified():
    out = emit(msg="%s", args=({"a": 1},), extra={"id": object.__new__(object)})
    assert out["message"] == "{'a': 1}"
    assert out["id"].startswith("<object object")


def test_handler_writes_one_parseable_line_per_record(capsys):
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("retailbus.test.handler")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("one", extra={"id": "i1", "correlationid": "c1"})
        logger.warning("two", extra={"id": "i2", "correlationid": "c1"})
    finally:
        logger.removeHandler(handler)
    lines = capsys.readouterr().out.splitlines()
    parsed = [json.loads(line) for line in lines]
    assert [(p["message"], p["id"], p["correlationid"]) for p in parsed] == [
        ("one", "i1", "c1"), ("two", "i2", "c1")]
