"""The estate for customer mastering tests: the demo CRM and loyalty platform, the legacy ERP's
database, and the customers, erp, crm, loyalty, files and journal services as real `nameko run`
processes on a real broker, in a temporary root. Plus what a test needs to drive it as the
estate's users would (a CRM user's edits, enrolments at the till, a legacy program's UPDATE,
the CRM's nightly file) and to look at every system."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import amqp

from bus import journal, topology
from bus.publisher import connection_params
from demo.batch.jobs import write_customer_export
from demo.legacy_erp.schema import create_schema, engine_for
from services.customers.propagation import binding
from tests.conftest import free_ports
from tests.integration.filedrop_support import write_drops
from tests.integration.support import Platform, ServiceProcesses, queue_state, write_config

MODULES = {"customers": "services.customers", "erp": "services.erp", "crm": "services.crm",
           "loyalty": "services.loyalty", "files": "services.files", "journal": "services.journal"}
READY = {  # a queue each service consumes once it runs
    "customers": topology.handler_queue("crm", "customer.updated.v2", "customers", "on_crm_change"),
    **{system: topology.handler_queue("customers", binding(system), system, "on_customer_mastered")
       for system in ("erp", "crm", "loyalty")},
    "files": topology.handler_queue("erp", "batch", "files", "on_posted"),
    "journal": journal.QUEUE,
}
TAPPED = ("customer.merged.v1", "case.opened.v1", "consent.changed.v1")


class CustomersEstate(ServiceProcesses):
    modules, ready = MODULES, READY

    def __init__(self, root: Path, amqp_uri: str, legacy_dsn: str | None = None):
        self.root, self.uri = root, amqp_uri
        (root / "var").mkdir(parents=True, exist_ok=True)
        crm_port, loyalty_port, *ports = free_ports(2 + len(MODULES))
        self.crm = Platform("demo.crm", root / "crm.db", crm_port)
        self.loyalty = Platform("demo.loyalty_platform", root / "loyalty_platform.db", loyalty_port)
        self.legacy_db = root / "var" / "legacy_erp.db"
        self.legacy_dsn = legacy_dsn or f"sqlite:///{self.legacy_db}"
        engine = engine_for(self.legacy_dsn)
        create_schema(engine)
        engine.dispose()
        write_drops(root)
        self.drop = root / "drops" / "customers"
        self.drop.mkdir(parents=True, exist_ok=True)
        self.metrics_ports = dict(zip(MODULES, ports))
        fast = {"attempts": 40, "delays": [0.5, 1, 2, 5]}  # ~3 min of retries: a loaded machine's slow platform
        self.config = write_config(
            root, amqp_uri, legacy_db=self.legacy_dsn,
            loyalty_platform={"http": self.loyalty.url.removeprefix("http://"), "db": "var/unused_l.db"},
            crm={"http": self.crm.url.removeprefix("http://"), "db": "var/unused_c.db"},
            services={name: {"module": module, "metrics_port": self.metrics_ports[name]}
                      for name, module in MODULES.items()},
            handlers={f"{s}.on_customer_mastered": fast for s in ("erp", "crm", "loyalty")}
            | {f"customers.{m}": fast for m in ("on_crm_change", "on_erp_change", "on_loyalty_change", "on_file_rows")})
        self._delete_queues()
        self.tap = Tap(amqp_uri, f"test.customers.{root.name}")
        self.processes: dict[str, subprocess.Popen] = {}

    def _delete_queues(self) -> None:
        """Queues another test of the session left on the shared broker (ordered handlers keep
        their single-active-consumer queues): ours start empty."""
        conn = amqp.Connection(**connection_params(self.uri, 5))
        conn.connect()
        try:
            for queue in READY.values():  # (the journal's: hops other tests' processes sent)
                for name in (queue, f"{queue}.dlq"):
                    with suppress(amqp.exceptions.NotFound):
                        conn.channel().queue_purge(name)
        finally:
            conn.collect()

    def diagnosis(self) -> str:
        """What a test that did not converge prints: parked messages and each service's last errors."""
        parked = {q: queue_state(self.uri, f"{q}.dlq")[0] for q in READY.values()}
        errors = {name: [line[:300] for line in self.log(name).splitlines() if '"level": "ERROR"' in line
                         or '"level": "WARNING"' in line][-3:] for name in MODULES}
        return json.dumps({"parked": {q: n for q, n in parked.items() if n}, "errors": errors}, indent=1)

    def close(self) -> None:
        self.stop_all()
        for platform in (self.crm, self.loyalty):
            with suppress(Exception):
                platform.stop()
        with suppress(Exception):
            self.tap.close()

    # ------------------------------------------------------------------ the estate's users
    def crm_users_write(self, profiles: list[dict]) -> None:
        """CRM users change profiles (the CRM's own screens: no X-Api-Client)."""
        for start in range(0, len(profiles), 250):
            chunk = profiles[start:start + 250]
            status, answer = self.crm.call("POST", "/customers/batch", {"customers": chunk},
                                           f"user-{chunk[0]['customer_id']}-{len(chunk)}-{hash(json.dumps(chunk))}")
            assert status == 200, answer

    def enrol(self, card: str, **profile) -> None:
        """A till enrols a member."""
        status, answer = self.loyalty.call("POST", "/members", {"card": card, "customer_id": f"TILL-{card}", **profile},
                                           f"enrol-{card}")
        assert status == 201, answer

    def member_update(self, card: str, **profile) -> None:
        status, answer = self.loyalty.call("PUT", f"/members/{card}", profile, f"edit-{card}-{sorted(profile.items())}")
        assert status == 200, answer

    def nightly_file(self, name: str, rows: list[list]) -> None:
        write_customer_export(self.drop / name, rows)

    def legacy_update(self, sql: str, *args) -> int:
        """A legacy ERP program writes CUST_MST directly."""
        with sqlite3.connect(self.legacy_db, timeout=30) as db:
            return db.execute(sql, args).rowcount

    # ------------------------------------------------------------------ looking
    def crm_profiles(self) -> dict[str, tuple]:
        return {r[0]: r[1:] for r in self.crm.rows(
            "SELECT customer_id, name, email, phone, consent_marketing_email, consent_sms, consent_data_sharing, "
            "golden_id FROM customers")}

    def members(self) -> dict[str, tuple]:
        return {r[0]: r[1:] for r in self.loyalty.rows(
            "SELECT card, name, email, phone, household_id, reward_preference, consent_marketing_email, consent_sms, "
            "consent_data_sharing, golden_id FROM members")}

    def accounts(self) -> dict[str, tuple]:
        with sqlite3.connect(self.legacy_db, timeout=30) as db:
            return {r[0]: r[1:] for r in db.execute(
                "SELECT CUST_NO, NAME, EMAIL, PHONE, LOYALTY_CARD, TAX_ID, BILL_ADDR, MKT_EMAIL, MKT_SMS, DATA_SHARE, "
                "MASTER_ID FROM CUST_MST")}

    def hub_rows(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(self.root / "var" / "customers.db", timeout=30) as db:
            return db.execute(sql, args).fetchall()

    def golden_of(self, system: str, record_id: str) -> str | None:
        rows = self.hub_rows("SELECT GOLDEN_ID FROM CUS_RECORD WHERE SYSTEM = ? AND RECORD_ID = ?", system, record_id)
        return rows[0][0] if rows else None

    def writes_seen(self) -> tuple:
        """Every customer write each system has received so far: the CRM's and the loyalty
        platform's write requests (each carries an idempotency key) and changes, CUST_MST's
        row versions."""
        crm = self.crm.rows("SELECT (SELECT count(*) FROM idempotency), (SELECT count(*) FROM changes)")[0]
        loyalty = self.loyalty.rows("SELECT (SELECT count(*) FROM idempotency), (SELECT count(*) FROM changes)")[0]
        with sqlite3.connect(self.legacy_db, timeout=30) as db:
            erp = db.execute("SELECT count(*), max(UPD_TS) FROM CUST_MST").fetchone()
        return crm, loyalty, erp

    def settled(self) -> bool:
        """No customer message in flight: the hub's outbox sent, every queue empty."""
        unsent = self.hub_rows("SELECT count(*) FROM RB_OUTBOX WHERE SENT_TS IS NULL")[0][0]
        queues = [*READY.values(), topology.handler_queue("erp", "customer.updated.v2", "customers", "on_erp_change"),
                  topology.handler_queue("loyalty", "customer.updated.v2", "customers", "on_loyalty_change"),
                  topology.handler_queue("files", "event.batch.v1", "customers", "on_file_rows")]
        return unsent == 0 and all(queue_state(self.uri, q)[0] == 0 for q in queues)


class Tap:
    """A queue on customers.events for the hub's notices (merges, cases, consents), read here."""

    def __init__(self, uri: str, queue: str):
        self.uri, self.queue = uri, queue
        conn = amqp.Connection(**connection_params(uri, 5))
        conn.connect()
        try:
            channel = conn.channel()
            topology.declare_exchange(channel, "customers.events")
            channel.queue_declare(queue, durable=True, auto_delete=False)
            channel.queue_purge(queue)
            for key in TAPPED:
                channel.queue_bind(queue, "customers.events", key)
        finally:
            conn.collect()
        self.events: list[dict] = []

    def drain(self) -> list[dict]:
        conn = amqp.Connection(**connection_params(self.uri, 5))
        conn.connect()
        try:
            channel = conn.channel()
            while (message := channel.basic_get(self.queue, no_ack=True)) is not None:
                self.events.append(json.loads(message.body))
        finally:
            conn.collect()
        return self.events

    def of(self, type_name: str) -> list[dict]:
        return [e["data"] for e in self.drain() if e["type"] == type_name]

    def diagnosis(self) -> str:
        """What a test that did not converge prints: parked messages and each service's last errors."""
        parked = {q: queue_state(self.uri, f"{q}.dlq")[0] for q in READY.values()}
        errors = {name: [line[:300] for line in self.log(name).splitlines() if '"level": "ERROR"' in line
                         or '"level": "WARNING"' in line][-3:] for name in MODULES}
        return json.dumps({"parked": {q: n for q, n in parked.items() if n}, "errors": errors}, indent=1)

    def close(self) -> None:
        conn = amqp.Connection(**connection_params(self.uri, 5))
        conn.connect()
        try:
            conn.channel().queue_delete(self.queue)
        finally:
            conn.collect()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=config.parent.parent)
