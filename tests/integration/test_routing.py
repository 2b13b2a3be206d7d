"""The strangler under live traffic, with real processes: store agents, a broker
node of this module's own, the demo legacy ERP, the erp service, the route
guard. Tests run in file order on one estate; each leaves it running, with
the sales route back in legacy mode, for the next."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import eventlet
import pytest

from routing.route_table import store_bucket
from tests.integration.routing_estate import STORES, Estate, table_text
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration

RETAILBUS = str(Path(sys.executable).with_name("retailbus"))


@pytest.fixture(scope="module")
def estate(tmp_path_factory):
    e = Estate(tmp_path_factory.mktemp("routing"))
    try:
        e.start_legacy_erp()
        e.start_erp()
        for store in STORES:
            e.start_agent(store)
        yield e
    finally:
        e.stop_all()


def cli(estate, *args) -> subprocess.CompletedProcess:
    config = () if args[0] == "validate" else ("--config", str(estate.config))
    return subprocess.run([RETAILBUS, "routes", *args, *config],
                          capture_output=True, text=True, cwd=estate.root, timeout=60)


def test_an_invalid_table_is_refused_with_its_line_and_agents_keep_serving(estate):
    bad = estate.root / "bad.yaml"
    bad.write_text(table_text(9, estate.erp_port, "mode: bus\n    rollout: {percent: 140}"))
    for command in (("validate", str(bad)), ("apply", str(bad), "--reason", "typo")):
        done = cli(estate, *command)
        assert done.returncode != 0
        assert f"{bad}:11: routes[sales].rollout.percent" in done.stderr, done.stderr
    assert estate.registry.audit() == []
    assert estate.versions() == {"S001": 1, "S002": 1}
    status, answer = estate.post("S001", "S001-INV00001")
    assert status == 200 and answer["DOC_NO"].startswith("S"), answer
    assert [t for t, _ in estate.sales("INV")] == ["S001-INV00001"]


def test_a_new_table_reaches_every_agent(estate):
    good = estate.root / "v2.yaml"
    good.write_text(table_text(2, estate.erp_port))
    done = cli(estate, "apply", str(good), "--reason", "first apply")
    applied = time.monotonic()
    assert done.returncode == 0, done.stderr
    assert wait_for(lambda: estate.versions() == {"S001": 2, "S002": 2}, timeout=60), estate.versions()
    print(f"\ntable v2 on both agents {(time.monotonic() - applied) * 1000:.0f} ms after apply returned")
    estate.version = 2
    entry = estate.registry.audit()[-1]
    assert entry["version"] == 2 and entry["reason"] == "first apply" and "+version: 2" in entry["diff"]
    for store in STORES:  # kept on disk for an offline start
        assert "version: 2" in (estate.root / "var" / "stores" / store / "routes.yaml").read_text()


def _drive(estate, prefix: str, per_store: int, rate: float) -> list:
    tills = [eventlet.spawn(estate.till, store, prefix, per_store, rate) for store in STORES]
    return [r for t in tills for r in t.wait()]


def _parity(estate) -> tuple[int, int, int]:
    counts = [(estate.health(s) or {}).get("routes", {}).get("sales", {}) for s in STORES]
    return tuple(sum(c.get(f"shadow_{k}", 0) for c in counts) for k in ("parity", "mismatch", "error"))


@pytest.mark.timeout(120)
def test_shadow_over_500_sales_reports_parity_1(estate):
    estate.apply("mode: shadow", "shadow the sales route")
    assert wait_for(lambda: set(estate.versions().values()) == {estate.version}, timeout=60)
    before = _parity(estate)
    results = _drive(estate, "SHD", 250, 50.0)
    assert {status for _, status, _ in results} == {200}
    assert wait_for(lambda: sum(_parity(estate)) - sum(before) >= 500, timeout=60), _parity(estate)
    parity, mismatch, error = (a - b for a, b in zip(_parity(estate), before))
    print(f"\nshadow: {parity} parity, {mismatch} mismatches, {error} errors")
    assert (parity, mismatch, error) == (500, 0, 0)
    assert all(channel != "RBUS" for _, channel in estate.sales("SHD")) and len(estate.sales("SHD")) == 500
    assert all(estate.health(s)["shadow_parity"]["sales"] == 1.0 for s in STORES)


@pytest.mark.timeout(180)
def test_a_changed_mapping_produces_mismatches_naming_the_field(estate):
    estate.stop("erp")
    estate.start_erp("tests.integration.erp_changed_mapping")
    try:
        results = _drive(estate, "MAP", 10, 20.0)
        assert {status for _, status, _ in results} == {200}
        assert wait_for(lambda: _parity(estate)[1] >= 20, timeout=30), _parity(estate)
        done = cli(estate, "mismatches", "sales")
        assert done.returncode == 0, done.stderr
        assert "20 mismatches on sales" in done.stdout, done.stdout
        assert "gl[1].ACCOUNT bus='1001' legacy='1000'" in done.stdout, done.stdout
    finally:
        estate.stop("erp")
        estate.start_erp()


@pytest.mark.timeout(180)
def test_the_guard_rolls_the_route_back_when_the_bus_side_fails(estate):
    estate.stop("erp")  # the bus side cannot answer: every shadow comparison times out
    estate.start_guard()
    try:
        version = estate.apply("mode: shadow\n    guard: {max_error_rate: 0.05, min_parity: 0.99, window: 20}",
                               "shadow with a guard")
        started = time.monotonic()
        till = eventlet.spawn(_drive, estate, "GRD", 100, 10.0)
        rolled = wait_for(lambda: any(e["who"] == "route-guard" for e in estate.registry.audit()),
                          timeout=120, interval=0.2)
        took = time.monotonic() - started
        results = till.wait()
        assert rolled, estate.log("guard")
        assert {status for _, status, _ in results} == {200}
        entry = estate.registry.audit()[-1]
        print(f"\nguard rolled back after {took:.1f}s: {entry['reason']}")
        assert entry["version"] == version + 1 and entry["action"] == "guard-rollback"
        assert "shadow error rate" in entry["reason"] and "sales" in entry["reason"]
        assert estate.registry.active().route_named("sales").mode == "legacy"
        assert wait_for(lambda: set(estate.versions().values()) == {version + 1}, timeout=60)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{estate.guard_metrics}/metrics").read().decode()
        assert 'retailbus_route_guard_rollbacks_total{route="sales"} 1.0' in metrics
        estate.version = version + 1
    finally:
        estate.stop("guard")
        estate.start_erp()


@pytest.mark.timeout(180)
def test_with_the_legacy_erp_stopped_sales_queue_and_reach_the_erp(estate):
    estate.apply("mode: legacy", "legacy, queue on failure")
    assert wait_for(lambda: set(estate.versions().values()) == {estate.version}, timeout=60)
    estate.stop("legacy")
    try:
        results = _drive(estate, "DWN", 50, 25.0)
        assert {status for _, status, _ in results} == {200}, {s for _, s, _ in results}
        assert all(body["DOC_NO"] == "PENDING" for _, _, body in results)
    finally:
        estate.start_legacy_erp()
    assert wait_for(lambda: len(estate.sales("DWN")) == 100, timeout=120), len(estate.sales("DWN"))
    assert sorted(t for t, _ in estate.sales("DWN")) == sorted(t for t, _, _ in results)
    counts = [estate.health(s)["routes"]["sales"] for s in STORES]
    assert sum(c.get("legacy_queued", 0) for c in counts) >= 100


@pytest.mark.timeout(600)
def test_2000_sales_while_the_route_migrates_and_rolls_back(estate):
    # with two stores, percent 15 puts S001 (bucket 7.6) on the bus and keeps S002 (22.4) on legacy
    assert store_bucket("S001") < 15 < store_bucket("S002")
    steps = [("mode: shadow", "shadow"), ("mode: bus\n    rollout: {percent: 15}", "bus 15%"),
             ("mode: bus", "bus 100%")]
    till = eventlet.spawn(_drive, estate, "BIG", 1000, 50.0)
    first = estate.version

    def some_traffic():  # each table sees sales of its own, however fast this machine is
        mark = len(estate.sales("BIG"))
        assert wait_for(lambda: len(estate.sales("BIG")) >= mark + 200, timeout=120, interval=0.2)
    for sales, reason in steps:
        some_traffic()
        estate.apply(sales, reason)
    some_traffic()
    from routing.control import apply_table, rollback_text
    target, text = rollback_text(estate.registry, first)
    apply_table(estate.registry, estate.broker.uri(), text, f"rollback to v{first}", "rollback to legacy",
                STORES, action="rollback", allow_backward=True)
    results = till.wait()
    assert len(results) == 2000
    failed = [(t, s, b) for t, s, b in results if s != 200]
    assert not failed, failed[:5]
    assert wait_for(lambda: len(estate.sales("BIG")) >= 2000, timeout=120, interval=0.5), len(estate.sales("BIG"))
    assert wait_for(estate.settled, timeout=120, interval=1)  # nothing in flight: a duplicate would be here
    posted = estate.sales("BIG")
    assert len(posted) == 2000 and len({t for t, _ in posted}) == 2000
    assert {t for t, _ in posted} == {t for t, _, _ in results}
    channels = {c: sum(1 for _, ch in posted if ch == c) for c in {ch for _, ch in posted}}
    print(f"\n2000 sales: by channel {channels}")
    assert channels.get("RBUS", 0) > 0 and sum(n for c, n in channels.items() if c != "RBUS") > 0
    assert estate.registry.active().route_named("sales").mode == "legacy"


@pytest.mark.timeout(180)
def test_an_agent_restarted_while_the_broker_is_down_serves_its_saved_table(estate):
    version = estate.apply("mode: bus", "bus before the outage")
    assert wait_for(lambda: set(estate.versions().values()) == {version}, timeout=60)
    estate.stop("S001")
    estate.broker.stop()
    try:
        estate.start_agent("S001", broker_up=False)
        health = estate.health("S001")
        assert health["route_table_version"] == version and health["broker_connected"] is False
        status, answer = estate.post("S001", "S001-OFF00001")
        assert status == 200 and answer["DOC_NO"] == "PENDING"  # bus mode: into the outbox
    finally:
        estate.broker.start()
    assert wait_for(lambda: len(estate.sales("OFF")) == 1, timeout=120)
