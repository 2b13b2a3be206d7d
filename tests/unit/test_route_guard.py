"""The guard's rules and the shadow mismatch log, on real files: when a route's
new side breaches its guard, what it is rolled back to, what is kept."""
from __future__ import annotations

import socket

import pytest

from legacy_wrappers.legacy_http import LegacyUnavailable
from routing.control import RouteRegistry
from routing.guard import breach, rolled_back_text
from routing.modes import maybe_written
from routing.route_table import Guard, parse_route_table
from routing.shadow import MismatchLog

pytestmark = pytest.mark.unit

GUARD = Guard(max_error_rate=0.05, min_parity=0.99, window=60)


def table(version: int, sales: str) -> str:
    return (f"version: {version}\nlegacy: {{base_url: 'http://127.0.0.1:8081'}}\nroutes:\n"
            f"  - name: sales\n    message: pos.sale.v1\n    legacy: POST /erp/sales\n    {sales}\n"
            f"  - name: stock\n    message: pos.stock_query.v1\n    legacy: GET /erp/stock\n    mode: bus\n")


def test_breach_needs_enough_samples_and_names_the_rate():
    assert breach(GUARD, "bus", {"bus_ok": 5, "bus_error": 5}) is None  # 10 < 20 samples
    why = breach(GUARD, "bus", {"bus_ok": 90, "bus_error": 10})
    assert why == "bus error rate 0.100 > 0.05 (10/100)"
    assert breach(GUARD, "bus", {"bus_ok": 96, "bus_error": 4, "legacy_error": 50}) is None


def test_breach_on_shadow_parity():
    assert breach(GUARD, "shadow", {"shadow_parity": 99, "shadow_mismatch": 1}) is None
    assert breach(GUARD, "shadow", {"shadow_parity": 95, "shadow_mismatch": 5}) == \
        "shadow parity 0.9500 < 0.99 (100 compared)"


def test_the_route_goes_back_to_its_previous_mode_only(tmp_path):
    registry = RouteRegistry(tmp_path)
    for version, sales in ((1, "mode: legacy"), (2, "mode: shadow"), (3, "mode: bus\n    rollout: {percent: 25}"),
                           (4, "mode: bus\n    guard: {window: 60}")):
        registry.record(parse_route_table(table(version, sales)), table(version, sales), "r", "apply")
    text = rolled_back_text(registry, registry.active(), "sales", "bus error rate 0.5")
    back = parse_route_table(text)
    assert back.version == 5
    sales = back.route_named("sales")
    assert (sales.mode, sales.rollout, sales.guard.window) == ("shadow", None, 60)
    assert back.route_named("stock").mode == "bus"  # other routes untouched
    assert text.startswith("# written by route-guard: sales back to shadow: bus error rate 0.5")


def test_only_calls_that_surely_wrote_nothing_may_be_queued():
    assert maybe_written(LegacyUnavailable("legacy_erp: timed out"))  # the client says otherwise only when sure
    assert maybe_written(socket.timeout("timed out"))
    assert not maybe_written(LegacyUnavailable("legacy_erp: circuit breaker open", not_posted=True))


def test_the_mismatch_log_keeps_the_newest_records(tmp_path):
    log = MismatchLog(tmp_path / "mismatches.jsonl", keep=5)
    for n in range(12):
        log.add({"route": "sales" if n % 2 else "stock", "ref": n})
    kept = log.read()
    assert 5 <= len(kept) <= 10 and kept[-1]["ref"] == 11
    assert [r["ref"] for r in log.read("sales", limit=2)] == [9, 11]
    assert [r["ref"] for r in MismatchLog(tmp_path / "mismatches.jsonl", keep=5).read()] == [r["ref"] for r in kept]
