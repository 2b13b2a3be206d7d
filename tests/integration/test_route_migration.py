"""Route migration as ops run it, through the real command line, on real agents:
the first apply rolls back to the start-up table, every store's mode is explicit
(a rollout keeps the other stores where they are), a backward move is refused
until allowed, and a sale taken in legacy or shadow mode can be traced.
Tests run in file order on one estate (routing_estate: broker, demo legacy ERP,
erp service, journal, agents S001 and S002)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.routing_estate import STORES, Estate
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration

RETAILBUS = str(Path(sys.executable).with_name("retailbus"))


@pytest.fixture(scope="module")
def estate(tmp_path_factory):
    e = Estate(tmp_path_factory.mktemp("migration"))
    try:
        e.start_legacy_erp()
        e.start_erp()
        e.start_journal()
        for store in STORES:
            e.start_agent(store)
        yield e
    finally:
        e.stop_all()


def routes(estate, *args) -> subprocess.CompletedProcess:
    return subprocess.run([RETAILBUS, "routes", *args, "--config", str(estate.config)],
                          capture_output=True, text=True, cwd=estate.root, timeout=60)


def write(estate, name: str, sales: str) -> Path:
    """A routes file as ops keep it: no version line (apply numbers it)."""
    path = estate.root / name
    path.write_text(f"""legacy:
  base_url: http://127.0.0.1:{estate.erp_port}
routes:
  - name: sales
    message: pos.sale.v1
    legacy: POST /erp/sales
    on_legacy_failure: queue
    {sales}
  - name: stock
    message: pos.stock_query.v1
    legacy: GET /erp/stock
    mode: legacy
""")
    return path


def modes(estate) -> dict[str, str]:
    return {s: ((estate.health(s) or {}).get("route_modes") or {}).get("sales") for s in STORES}


def trace(estate, txn: str) -> subprocess.CompletedProcess:
    return subprocess.run([RETAILBUS, "trace", txn, "--config", str(estate.config)],
                          capture_output=True, text=True, cwd=estate.root, timeout=60)


def test_an_idle_fresh_agent_says_the_broker_is_connected(estate):
    assert wait_for(lambda: all((estate.health(s) or {}).get("broker_connected") for s in STORES), timeout=30), \
        [estate.health(s) for s in STORES]
    health = estate.health("S001")
    assert health["status"] == "ok" and health["problems"] == [] and health["outbox_depth"] == 0
    assert health["route_modes"] == {"sales": "legacy", "stock": "legacy"}


def test_the_first_apply_rolls_back_to_the_start_up_table(estate):
    done = routes(estate, "apply", str(write(estate, "shadow.yaml", "mode: shadow")), "--reason", "shadow all")
    assert done.returncode == 0, done.stderr
    assert "S001: legacy -> shadow" in done.stdout and "S002: legacy -> shadow" in done.stdout
    assert "applied version 2 (was 1)" in done.stdout
    assert wait_for(lambda: modes(estate) == {"S001": "shadow", "S002": "shadow"}, timeout=10), modes(estate)

    done = routes(estate, "rollback", "--reason", "back to the start")
    assert done.returncode == 0, done.stderr
    assert "rolled back to v1 as version 3" in done.stdout and "S001: shadow -> legacy" in done.stdout
    assert wait_for(lambda: estate.versions() == {"S001": 3, "S002": 3}, timeout=10), estate.versions()
    assert modes(estate) == {"S001": "legacy", "S002": "legacy"}

    history = routes(estate, "history").stdout.splitlines()
    assert history[0].split() == ["VERSION", "TIME", "(UTC)", "ACTION", "WHO", "RESTORES", "REASON"]
    assert [line.split()[0] for line in history[1:]] == ["v1", "v2", "v3"]
    assert "start-up" in history[1] and "rollback" in history[3] and " v1 " in history[3]


def test_a_legacy_sale_is_traced(estate):
    status, answer = estate.post("S002", "S002-TRL00001")
    assert status == 200 and answer["DOC_NO"].startswith("S"), answer
    assert wait_for(lambda: "legacy_answered" in trace(estate, "S002-TRL00001").stdout, timeout=30)
    shown = trace(estate, "S002-TRL00001").stdout
    hops = [line.split()[3] for line in shown.splitlines()[1:]]
    assert hops == ["accepted", "legacy_forwarded", "legacy_answered"], shown
    assert "mode legacy" in shown and f"doc_no {answer['DOC_NO']}" in shown and "status 200" in shown


def test_a_rollout_keeps_the_other_stores_and_a_backward_move_waits_for_permission(estate):
    done = routes(estate, "apply", str(write(estate, "bus.yaml", "mode: bus")), "--reason", "all on the bus")
    assert done.returncode == 0, done.stderr
    assert wait_for(lambda: modes(estate) == {"S001": "bus", "S002": "bus"}, timeout=10), modes(estate)
    version = estate.versions()["S001"]

    one_back = write(estate, "s001-shadow.yaml", "mode: shadow\n    rollout: {stores: [S001]}")
    diff = routes(estate, "diff", str(one_back))
    assert diff.returncode == 0, diff.stderr
    assert "S001: bus -> shadow   BACKWARD" in diff.stdout and "S002: bus (unchanged)" in diff.stdout, diff.stdout

    refused = routes(estate, "apply", str(one_back), "--reason", "S001 to shadow")
    assert refused.returncode != 0 and "would move backwards (sales S001: bus -> shadow)" in refused.stderr
    assert "--allow-backward" in refused.stderr
    assert estate.registry.active().version == version and estate.versions() == {"S001": version, "S002": version}

    done = routes(estate, "apply", str(one_back), "--reason", "S001 to shadow", "--allow-backward")
    assert done.returncode == 0, done.stderr
    assert wait_for(lambda: modes(estate) == {"S001": "shadow", "S002": "bus"}, timeout=10), modes(estate)
    assert estate.registry.active().route_named("sales").rollout.others == "bus"  # written into the version
    status, answer = estate.post("S002", "S002-PER00001")
    assert status == 200 and answer["DOC_NO"] == "PENDING"  # the bus: the outbox answers
    status, answer = estate.post("S001", "S001-PER00001")
    assert status == 200 and answer["DOC_NO"].startswith("S")  # shadow: the legacy ERP answers

    shown = routes(estate, "status").stdout
    agents = {line.split()[0]: line.split() for line in shown.splitlines() if line.strip().startswith("S00")
              and "127.0.0.1" in line}
    assert agents["S001"][2:4] == [f"v{version + 1}", "shadow"] and agents["S002"][2:4] == [f"v{version + 1}", "bus"]


def test_a_shadow_sale_is_traced_with_its_comparison(estate):
    status, answer = estate.post("S001", "S001-TRS00001")
    assert status == 200 and answer["DOC_NO"].startswith("S"), answer
    assert wait_for(lambda: "shadow_compared" in trace(estate, "S001-TRS00001").stdout, timeout=30), \
        trace(estate, "S001-TRS00001")
    shown = trace(estate, "S001-TRS00001").stdout
    hops = {line.split()[3]: line.split()[4] for line in shown.splitlines()[1:]}
    assert hops == {"accepted": "ok", "legacy_forwarded": "ok", "legacy_answered": "ok",
                    "shadow_compared": "parity"}, shown
    status_out = routes(estate, "status").stdout
    assert "S001 sales: last 60s" in status_out and "shadow parity 100.0% of 2 compared" in status_out, status_out


def test_validate_refuses_an_unknown_store_and_a_file_behind_the_active_table(estate):
    typo = write(estate, "typo.yaml", "mode: bus\n    rollout: {stores: [S009]}")
    done = routes(estate, "validate", str(typo))
    assert done.returncode != 0
    assert "routes[sales].rollout.stores: S009 is not a configured store (RETAILBUS.stores: S001, S002)" \
        in done.stderr, done.stderr

    active = estate.registry.active().version
    stale = estate.root / "stale.yaml"
    stale.write_text("version: 2\n" + write(estate, "x.yaml", "mode: bus").read_text())
    done = routes(estate, "validate", str(stale))
    assert done.returncode != 0
    assert f"the file is behind: it says version 2, the active table is version {active}" in done.stderr
