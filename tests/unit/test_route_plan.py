"""What applying a routes file does to each store, decided before anything is applied:
`others` (explicit, or what the stores run now), backward moves, stores that are
not configured, and the version the control plane gives the table."""
from __future__ import annotations

import pytest

from routing.control import RouteRegistry, apply_table, rollback_text, start_up_table
from routing.route_plan import BackwardMoveError, plan
from routing.route_table import RouteTableError, parse_route_table

pytestmark = pytest.mark.unit

STORES = ("S001", "S002", "S003")


def table(sales: str, version: str = "") -> str:
    return (f"{version}legacy:\n  base_url: http://127.0.0.1:8081\nroutes:\n"
            f"  - name: sales       # the till's sales\n    message: pos.sale.v1\n    legacy: POST /erp/sales\n"
            f"    {sales}\n")


ALL_BUS = parse_route_table(table("mode: bus", "version: 3\n"))


def lines(p) -> list[str]:
    return [line.strip() for line in p.lines()]


def test_a_rollout_without_others_keeps_the_other_stores_where_they_are():
    """The issue's case: S001 to shadow, everyone else stays on bus (not silently legacy)."""
    p = plan(table("mode: shadow\n    rollout: {stores: [S001], percent: 0}"), "f.yaml", ALL_BUS, STORES)
    assert p.table.version == 4
    assert p.table.route_named("sales").rollout.others == "bus"
    assert {s: p.table.decide("pos.sale.v1", s) for s in STORES} == {"S001": "shadow", "S002": "bus", "S003": "bus"}
    assert "S001: bus -> shadow   BACKWARD" in lines(p)
    assert "S002: bus (unchanged)" in lines(p) and "S003: bus (unchanged)" in lines(p)
    assert [(m.store, m.before, m.after) for m in p.backward] == [("S001", "bus", "shadow")]
    assert "keep what they run now (bus)" in p.notes[0]
    assert "others: bus}" in p.text and "# the till's sales" in p.text  # the operator's text, edited


def test_others_in_a_block_style_rollout_is_written_in_place():
    p = plan(table("mode: bus\n    rollout:\n      stores: [S001]\n      percent: 0"), "f.yaml",
             parse_route_table(table("mode: shadow", "version: 3\n")), STORES)
    assert "      others: shadow\n      stores: [S001]" in p.text
    assert not p.backward and "S001: shadow -> bus" in lines(p) and "S002: shadow (unchanged)" in lines(p)


def test_an_explicit_others_moving_stores_back_is_backward():
    p = plan(table("mode: shadow\n    rollout: {stores: [S001], others: legacy}"), "f.yaml", ALL_BUS, STORES)
    assert sorted(str(m) for m in p.backward) == [
        "S001: bus -> shadow   BACKWARD", "S002: bus -> legacy   BACKWARD", "S003: bus -> legacy   BACKWARD"]
    with pytest.raises(BackwardMoveError, match=r"3 store route\(s\) would move backwards .*--allow-backward"):
        raise BackwardMoveError(p)


def test_stores_that_run_different_modes_now_need_an_explicit_others():
    mixed = parse_route_table(table("mode: bus\n    rollout: {stores: [S001], others: legacy}", "version: 3\n"))
    with pytest.raises(RouteTableError, match=r"routes\[sales\]\.rollout: the stores outside the rollout run "
                                              r"different modes now \(S001 bus, S002 legacy\)"):
        plan(table("mode: shadow\n    rollout: {stores: [S003]}"), "f.yaml", mixed, ("S001", "S002", "S003"))


def test_a_rollout_naming_a_store_that_is_not_configured_is_refused():
    with pytest.raises(RouteTableError, match=r"f.yaml: routes\[sales\]\.rollout\.stores: S009 is not a "
                                              r"configured store \(RETAILBUS.stores: S001, S002, S003\)"):
        plan(table("mode: bus\n    rollout: {stores: [S001, S009]}"), "f.yaml", ALL_BUS, STORES)


def test_the_version_is_assigned_or_checked():
    assert plan(table("mode: bus"), "f.yaml", None, STORES).table.version == 1
    numbered = plan(table("mode: bus"), "f.yaml", ALL_BUS, STORES)
    assert numbered.table.version == 4 and numbered.text.startswith("version: 4    # numbered by")
    assert plan(table("mode: bus", "version: 9\n"), "f.yaml", ALL_BUS, STORES).table.version == 9
    with pytest.raises(RouteTableError, match=r"f.yaml: the file is behind: it says version 2, the active table "
                                              r"is version 3 .* `version: 4`"):
        plan(table("mode: bus", "version: 2\n"), "f.yaml", ALL_BUS, STORES)


def test_a_store_with_no_route_runs_legacy_and_a_new_route_moves_it_forward():
    p = plan(table("mode: shadow"), "f.yaml", parse_route_table("version: 1\nlegacy: {base_url: 'http://x'}\n"),
             ("S001",))
    assert [str(m) for m in p.moves] == ["S001: legacy -> shadow"] and not p.backward


def test_a_backward_apply_is_refused_before_anything_is_sent_or_recorded(tmp_path):
    registry = RouteRegistry(tmp_path)
    start, text = start_up_table(table("mode: bus"), "config/routes.yaml")
    registry.record(start, text, "start-up", "start-up")
    with pytest.raises(BackwardMoveError):  # the broker URI is never used: refused first
        apply_table(registry, "amqp://nobody@127.0.0.1:1/", table("mode: legacy"), "f.yaml", "oops", STORES)
    assert [e["version"] for e in registry.audit()] == [1]


def test_the_start_up_table_is_version_1_and_can_be_rolled_back_to(tmp_path):
    registry = RouteRegistry(tmp_path)
    start, text = start_up_table(table("mode: legacy"), "config/routes.yaml")
    assert start.version == 1 and text.startswith("version: 1")
    registry.record(start, text, "start-up", "start-up")
    first = plan(table("mode: bus"), "f.yaml", registry.active(), STORES)
    registry.record(first.table, first.text, "all on the bus", "apply")
    target, back = rollback_text(registry, None)
    rolled = parse_route_table(back)
    assert target == 1 and rolled.version == 3 and rolled.route_named("sales").mode == "legacy"
    assert back.startswith("# rollback to v1\n")
