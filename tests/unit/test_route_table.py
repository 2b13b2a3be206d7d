"""The route table: validation with line numbers, the pure decision, rollout
stability, and the control plane's audited record of versions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from routing.control import RouteRegistry, rollback_text
from routing.route_table import RouteTableError, load_route_table, parse_route_table, store_bucket

pytestmark = pytest.mark.unit

TABLE = """\
version: 4
legacy:
  base_url: http://127.0.0.1:8081
routes:
  - name: sales
    message: pos.sale.v1
    legacy: POST /erp/sales
    mode: bus
    rollout: {stores: [S001], percent: 25}
  - name: stock
    message: pos.stock_query.v1
    legacy: GET /erp/stock
    mode: shadow
"""


def refused(text: str) -> str:
    with pytest.raises(RouteTableError) as info:
        parse_route_table(text, "routes.yaml")
    return str(info.value)


def test_the_design_example_parses():
    table = parse_route_table(TABLE)
    assert table.version == 4
    assert table.route_named("sales").method == "POST" and table.route_named("sales").path == "/erp/sales"


def test_the_shipped_routes_file_is_valid():
    table = load_route_table(Path(__file__).parents[2] / "config" / "routes.yaml")
    assert {r.message for r in table.routes} >= {"pos.sale.v1", "pos.return.v1", "pos.stock_query.v1"}


@pytest.mark.parametrize(("broken", "line", "reason"), [
    (TABLE.replace("mode: bus", "mode: buss"), 8, "routes[sales].mode: Input should be"),
    (TABLE.replace("pos.stock_query.v1", "pos.stock_query.v7"), 11, "unknown message type"),
    (TABLE.replace("percent: 25", "percent: 101"), 9, "routes[sales].rollout.percent"),
    (TABLE.replace("percent: 25", "percent: -1"), 9, "routes[sales].rollout.percent"),
    (TABLE.replace("name: stock", "name: sales"), 10,
     "route name 'sales' is already used by the route on line 5"),
    (TABLE.replace("pos.stock_query.v1", "pos.sale.v1"), 11,
     "route message 'pos.sale.v1' is already used by the route on line 5"),
    (TABLE.replace("GET /erp/stock", "FETCH /erp/stock"), 12, "routes[stock].legacy"),
    (TABLE.replace("version: 4", "version: 0"), 1, "version"),
    (TABLE.replace("    mode: shadow", "    mode: shadow\n    colour: red"), 14,
     "routes[stock]: unknown key 'colour' (known keys: name, message, legacy, mode"),
    (TABLE.replace("    mode: shadow", "    mode: shadow\n    on_legacy_falure: queue"), 14,
     "routes[stock]: unknown key 'on_legacy_falure' (did you mean 'on_legacy_failure'?)"),
    (TABLE.replace("percent: 25}", "percent: 25, other: bus}"), 9,
     "routes[sales].rollout: unknown key 'other' (did you mean 'others'?)"),
    (TABLE.replace("    mode: shadow", "    mode: shadow\n    mode: bus"), 14,
     "routes[stock]: key 'mode' is given twice (first on line 13)"),
    (TABLE.replace("base_url: http://127.0.0.1:8081", "base_url: ftp://x"), 3, "legacy.base_url"),
    (TABLE.replace("    legacy: GET /erp/stock", "    legacy: GET /erp/stock\n    mode"), 13,
     "a key without ':' after it"),
    (TABLE.replace("  - name: stock", "   - name: stock"), 10,
     'the indentation does not line up: this line is indented differently from the keys around it '
     '("- name: stock")'),
    (TABLE.replace("    mode: shadow", "      mode: shadow"), 13, "a ':' where none may be"),
    (TABLE.replace("    mode: shadow", "\tmode: shadow"), 13, "a tab: indent with spaces only"),
    ("version: 4\nlegacy: [\n", 3, "the file ends where a value was expected"),
    ("- just\n- a list\n", 1, "expected a mapping"),
])
def test_a_bad_table_is_refused_with_its_line_and_reason(broken, line, reason):
    message = refused(broken)
    assert f"routes.yaml:{line}:" in message and reason in message, message
    assert "<block" not in message and "routes.0" not in message and "routes.1" not in message


def test_env_placeholders_are_not_substituted(monkeypatch, tmp_path):
    """A route table is audited text: `${...}` must not be expanded from the environment,
    even in a process where bus.yaml was loaded (nameko's ${ENV} resolver on SafeLoader)."""
    from bus.settings import load_config

    monkeypatch.setenv("EVIL", "http://attacker")
    bus_yaml = tmp_path / "bus.yaml"
    bus_yaml.write_text("url: ${EVIL}\n")
    assert load_config(bus_yaml) == {"url": "http://attacker"}  # the resolver is live here
    message = refused(TABLE.replace("http://127.0.0.1:8081", "${EVIL}"))
    assert "legacy.base_url" in message


def test_decision_is_pure_and_follows_rollout():
    table = parse_route_table(TABLE)
    assert table.decide("pos.sale.v1", "S001") == "bus"        # listed store
    assert table.decide("pos.stock_query.v1", "S777") == "shadow"  # no rollout: everyone
    assert table.decide("pos.return.v1", "S001") == "legacy"   # no route: legacy
    stores = [f"S{n:03d}" for n in range(1000)]
    on_bus = [s for s in stores if table.decide("pos.sale.v1", s) == "bus"]
    assert 200 <= len(on_bus) <= 300  # about 25% of the unlisted stores


def test_a_store_bucket_is_the_same_in_every_process():
    """Fixed values: a per-process hash (Python's salted hash()) would move stores between modes."""
    assert [store_bucket(s) for s in ("S001", "S002", "S003", "T0000")] == [7.64, 22.39, 41.62, 66.17]


def test_raising_the_percent_only_moves_stores_towards_the_new_mode():
    stores = [f"T{n:04d}" for n in range(2000)]
    previous = set()
    for percent in (0, 5, 25, 50, 75, 100):
        table = parse_route_table(TABLE.replace("percent: 25", f"percent: {percent}"))
        now = {s for s in stores if table.decide("pos.sale.v1", s) == "bus"}
        assert previous <= now, f"a store went back to legacy at {percent}%"
        previous = now
    assert previous == set(stores)
    assert all(0 <= store_bucket(s) < 100 for s in stores)


def test_registry_records_versions_audit_and_refuses_an_old_version(tmp_path):
    registry = RouteRegistry(tmp_path)
    v4 = parse_route_table(TABLE)
    registry.record(v4, TABLE, "start", "apply", who="ops1")
    v5_text = TABLE.replace("version: 4", "version: 5").replace("mode: shadow", "mode: bus")
    applied = registry.record(parse_route_table(v5_text), v5_text, "stock on the bus", "apply", who="ops2")
    assert applied.previous == 4 and any(line.startswith("+    mode: bus") for line in applied.diff)
    with pytest.raises(RouteTableError, match="greater than the active version 5"):
        registry.check(parse_route_table(TABLE), "old.yaml")
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(a["version"], a["who"], a["reason"]) for a in audit] == [
        (4, "ops1", "start"), (5, "ops2", "stock on the bus")]
    assert registry.active().version == 5

    target, text = rollback_text(registry, None)
    rolled = parse_route_table(text)
    assert target == 4 and rolled.version == 6
    assert rolled.route_named("stock").mode == "shadow"
    with pytest.raises(RouteTableError, match="no route table version 9"):
        rollback_text(registry, 9)
