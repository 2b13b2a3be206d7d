"""Redemption at the till, end to end: a real store agent process, the real erp and
loyalty services on the real broker, the demo loyalty platform over HTTP and a real
legacy database. Tills sign their calls; nothing is mocked.

authorise -> sale accepted with the hold -> the ERP posts it -> loyalty captures the hold
once; a void releases it; two tills racing for one balance; the platform down (offline
within the floor, captured when it is back, across an agent kill -9) and the loyalty
service down (offline, and its late answer makes no hold)."""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import urllib.error
import urllib.request

import pytest
import yaml

from bus import topology
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from routing.edge_auth import TerminalKeys, signed_headers
from tests.conftest import free_port
from tests.integration.support import Platform, nameko_run, queue_state, stop, wait_for, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]  # four processes start with the first test

ROUTES = """version: 1
legacy: {base_url: "http://127.0.0.1:9"}
routes:
  - {name: sales, message: pos.sale.v1, legacy: POST /erp/sales, mode: bus}
  - {name: returns, message: pos.return.v1, legacy: POST /erp/returns, mode: bus}
  - {name: stock, message: pos.stock_query.v1, legacy: GET /erp/stock, mode: bus}
"""
SALES_QUEUE = topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale")
POSTED_QUEUE = topology.handler_queue("erp", "erp.sale_posted.v1", "loyalty", "on_sale_posted")
FLOOR = 500


class Estate:
    def __init__(self, root, amqp_uri: str):
        self.root, self.uri, self.processes = root, amqp_uri, {}
        self.legacy_db = root / "legacy_erp.db"
        engine = engine_for(f"sqlite:///{self.legacy_db}")
        create_schema(engine)
        with engine.begin() as conn:
            seed_demo_data(conn)
        engine.dispose()
        self.platform_db, self.platform_port = root / "platform.db", free_port()
        self.platform = Platform("demo.loyalty_platform", self.platform_db, self.platform_port)
        (root / "var").mkdir()
        (root / "config").mkdir()
        (root / "config" / "routes.yaml").write_text(ROUTES)
        (root / "config" / "loyalty.yaml").write_text(yaml.safe_dump(
            {"accrual": {"mode": "file"}, "redemption": {"offline_floor_points": FLOOR, "hold_ttl_seconds": 600}}))
        self.port = free_port()
        retries = {"attempts": 60, "delays": [0.5, 1, 2]}  # the platform is away for a while in the tests
        self.config = write_config(
            root, amqp_uri, legacy_db=f"sqlite:///{self.legacy_db}",
            stores=[{"id": "S001", "http": f"127.0.0.1:{self.port}"}],
            agent={"loyalty_rpc_timeout": 5.0}, retry={"delays": [0.5, 1, 2]},
            loyalty_platform={"http": f"127.0.0.1:{self.platform_port}", "db": "var/unused.db"},
            loyalty_rules="config/loyalty.yaml",
            handlers={"loyalty.on_sale_posted": retries, "erp.on_pos_sale": retries})
        keys = TerminalKeys(root / "var" / "stores" / "S001" / "terminal_keys.json")
        self.keys = {t: bytes.fromhex(keys.add(t)) for t in ("07", "08")}
        self.start("erp", "services.erp", lambda: queue_state(amqp_uri, SALES_QUEUE)[1] == 1)
        self.start_loyalty()
        self.start_agent()

    # processes ------------------------------------------------------------------------
    def start(self, name: str, module: str, ready, **env):
        self.processes[name] = nameko_run(self.config, module, self.root / f"{name}.log", RETAILBUS_AMQP_URI=self.uri,
                                          **env)
        assert wait_for(ready, timeout=120), self.log(name)

    def start_loyalty(self):
        self.start("loyalty", "services.loyalty", lambda: queue_state(self.uri, POSTED_QUEUE)[1] == 1
                   and queue_state(self.uri, "rpc-loyalty")[1] == 1)

    def start_agent(self):
        self.start("agent", "routing.store_agent", lambda: self.get("/healthz")[0] == 200,
                   RETAILBUS_STORE="S001", WEB_SERVER_ADDRESS=f"127.0.0.1:{self.port}")

    def stop(self, name: str, kill: bool = False):
        process = self.processes.pop(name)
        if kill:
            process.kill()  # the pid we started
            process.wait()
        else:
            stop(process)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def close(self):
        for name in list(self.processes):
            self.stop(name)
        self.platform.stop()

    # the agent's HTTP API, signed by a till --------------------------------------------
    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def post(self, terminal: str, path: str, body: dict) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json",
                   **signed_headers(terminal, self.keys[terminal], "POST", path, data)}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def authorize(self, card: str, points: int, txn: str, terminal: str = "07") -> tuple[int, dict]:
        return self.post(terminal, "/v1/loyalty/authorize", {"CARD": card, "POINTS": points, "TXN_ID": txn})

    def sell(self, card: str, txn: str, points: int, hold_id: str | None, terminal: str = "07") -> tuple[int, dict]:
        loyalty = {"TYPE": "LOYALTY", "AMOUNT": points, **({"HOLD_ID": hold_id} if hold_id else {})}
        return self.post(terminal, "/erp/sales", {
            "STORE": "S001", "TERMINAL": terminal, "TXN_ID": txn, "TXN_DATE": "20261207", "TXN_TIME": "101500",
            "CURRENCY": "EUR", "LOYALTY_CARD": card, "TOTAL": 3998,
            "LINES": [{"SKU": "100001", "QTY": 2, "PRICE": 1999, "DISC": 0, "LINE": 3998}],
            "TENDERS": [{"TYPE": "CASH", "AMOUNT": 3998 - points}, loyalty]})

    def metric(self, name: str, **labels) -> float:
        text = self.get("/metrics")[1]
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as prometheus_client writes them
        match = re.search(rf"^{name}\{{{want}\}} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    # the platform and the ERP --------------------------------------------------------
    def enrol(self, card: str, points: int):
        member = {"card": card, "customer_id": f"CU-{card}"}
        assert self.platform.call("POST", "/members", member, f"m-{card}")[0] == 201
        assert self.platform.call("POST", "/transactions", {"card": card, "type": "EARN", "points": points,
                                                            "reference": "seed"}, f"seed-{card}")[0] == 201

    def member(self, card: str) -> dict:
        return self.platform.call("GET", f"/members/{card}")[1]

    def redeemed(self, card: str) -> list[tuple[str, int, str]]:
        return self.platform.rows("SELECT type, points, reference FROM ledger WHERE card = ? AND type = 'REDEEM'", card)

    def hold_status(self, hold_id: str) -> str:
        return self.platform.call("GET", f"/holds/{hold_id}")[1]["status"]

    def gl(self, txn: str) -> list[tuple[str, int]]:
        with sqlite3.connect(self.legacy_db) as db:
            return db.execute("SELECT ACCOUNT, DR_CENTS FROM GL_PST JOIN SLS_HDR USING (DOC_NO) "
                              "WHERE POS_TXN_ID = ? AND DR_CENTS > 0 ORDER BY GL_ID", (txn,)).fetchall()

    def exceptions(self, txn: str) -> list[tuple[str, str]]:
        with sqlite3.connect(self.root / "var" / "loyalty.db") as db:
            return db.execute("SELECT KIND, CARD FROM LOY_EXCEPTION WHERE POS_TXN_ID = ?", (txn,)).fetchall()


@pytest.fixture(scope="module")
def estate(amqp_uri, tmp_path_factory):
    estate = Estate(tmp_path_factory.mktemp("till"), amqp_uri)
    yield estate
    estate.close()


def test_points_pay_part_of_a_sale_and_are_redeemed_once_when_it_posts(estate):
    estate.enrol("LC1000000001", 1000)
    status, hold = estate.authorize("LC1000000001", 300, "S001-07-100001")
    assert status == 200 and hold["OFFLINE"] is False and hold["BALANCE"] == 700, hold
    assert estate.member("LC1000000001")["held_points"] == 300
    for _ in range(2):  # a till that lost the answer sends the sale again
        status, body = estate.sell("LC1000000001", "S001-07-100001", 300, hold["HOLD_ID"])
        assert status == 200, body
    assert wait_for(lambda: estate.hold_status(hold["HOLD_ID"]) == "captured", timeout=90), estate.log("loyalty")
    assert estate.redeemed("LC1000000001") == [("REDEEM", -300, "S001/S001-07-100001")]
    member = estate.member("LC1000000001")
    assert (member["balance"], member["ledger_points"], member["held_points"]) == (700, 700, 0)
    assert estate.gl("S001-07-100001") == [("1000", 3698), ("1300", 300)]  # the ERP booked the points tender
    assert estate.metric("retailbus_loyalty_authorisations_total", store="S001", outcome="online") >= 1


def test_a_sale_without_a_valid_hold_is_refused_and_a_voided_hold_gives_its_points_back(estate):
    estate.enrol("LC1000000002", 1000)
    status, body = estate.sell("LC1000000002", "S001-07-100002", 200, None)
    assert status == 422 and body["MESSAGE"].startswith("TENDERS[2].HOLD_ID"), body
    status, hold = estate.authorize("LC1000000002", 200, "S001-07-100002")
    assert status == 200 and estate.member("LC1000000002")["balance"] == 800
    status, body = estate.sell("LC1000000002", "S001-07-100002", 250, hold["HOLD_ID"])
    assert status == 422 and body["MESSAGE"].startswith("TENDERS[2].AMOUNT: 250 is more than hold"), body
    status, body = estate.post("07", "/v1/loyalty/void", {"HOLD_ID": hold["HOLD_ID"]})
    assert status == 200 and body["VOIDED"] is True
    assert wait_for(lambda: estate.hold_status(hold["HOLD_ID"]) == "released", timeout=60), estate.log("agent")
    assert estate.member("LC1000000002")["balance"] == 1000
    status, body = estate.sell("LC1000000002", "S001-07-100002", 200, hold["HOLD_ID"])
    assert status == 422 and "was voided" in body["MESSAGE"]
    status, body = estate.authorize("LC1000000002", 5000, "S001-07-100003")
    assert status == 422 and body["BALANCE"] == 1000 and body["MESSAGE"].startswith("POINTS"), body
    status, body = estate.authorize("LC9999999999", 10, "S001-07-100004")
    assert status == 404 and body["MESSAGE"].startswith("CARD")
    assert estate.redeemed("LC1000000002") == []


def test_two_tills_redeeming_one_balance_at_once_get_exactly_one_hold(estate):
    estate.enrol("LC1000000003", 100)
    answers = {}

    def till(terminal: str):
        answers[terminal] = estate.authorize("LC1000000003", 80, f"S001-{terminal}-100005", terminal)
    threads = [threading.Thread(target=till, args=(t,)) for t in ("07", "08")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(status for status, _ in answers.values())
    assert statuses == [200, 422], answers
    granted = next(body for status, body in answers.values() if status == 200)
    refused = next(body for status, body in answers.values() if status == 422)
    assert granted["OFFLINE"] is False and refused["BALANCE"] == 20
    assert estate.platform.rows("SELECT count(*) FROM holds WHERE card = 'LC1000000003' AND status = 'held'") == [(1,)]


def test_with_the_platform_down_the_floor_is_taken_offline_and_captured_once_it_is_back(estate):
    estate.enrol("LC1000000004", 1000)
    estate.enrol("LC1000000005", 100)  # less than it will redeem offline
    estate.platform.stop()
    status, first = estate.authorize("LC1000000004", 300, "S001-07-100010")
    assert status == 200 and first["OFFLINE"] is True and first["FLOOR_LEFT"] == FLOOR - 300, first
    assert estate.sell("LC1000000004", "S001-07-100010", 300, first["HOLD_ID"])[0] == 200
    status, over = estate.authorize("LC1000000004", 300, "S001-07-100011")
    assert status == 503 and "loyalty offline: floor limit 500 points per card per day reached" in over["MESSAGE"]
    status, short = estate.authorize("LC1000000005", 300, "S001-07-100012")
    assert status == 200 and short["OFFLINE"] is True
    assert estate.sell("LC1000000005", "S001-07-100012", 300, short["HOLD_ID"])[0] == 200
    assert wait_for(lambda: estate.metric("retailbus_loyalty_offline_pending", store="S001") == 2, timeout=60)

    estate.stop("agent", kill=True)  # what it still has to tell loyalty survives a kill -9
    estate.start_agent()
    estate.platform = Platform("demo.loyalty_platform", estate.platform_db, estate.platform_port)

    assert wait_for(lambda: estate.redeemed("LC1000000004") == [("REDEEM", -300, "S001/S001-07-100010")],
                    timeout=120), estate.log("agent")
    assert wait_for(lambda: estate.exceptions("S001-07-100012") == [("over_redemption", "LC1000000005")],
                    timeout=120), estate.log("loyalty")
    assert estate.redeemed("LC1000000005") == [] and estate.member("LC1000000005")["balance"] == 100
    assert wait_for(lambda: estate.metric("retailbus_loyalty_offline_pending", store="S001") == 0, timeout=60)
    # the ERP posts both sales; loyalty captures nothing more for them
    assert wait_for(lambda: estate.gl("S001-07-100012") == [("1000", 3698), ("1300", 300)], timeout=120)
    assert wait_for(lambda: queue_state(estate.uri, POSTED_QUEUE)[0] == 0, timeout=120)
    assert estate.redeemed("LC1000000004") == [("REDEEM", -300, "S001/S001-07-100010")]
    assert estate.member("LC1000000004")["balance"] == 700


def test_with_the_loyalty_service_down_the_till_is_authorised_offline_and_no_late_hold_appears(estate):
    estate.enrol("LC1000000006", 1000)
    estate.stop("loyalty")  # its queue stays: the request waits there until it expires
    status, hold = estate.authorize("LC1000000006", 100, "S001-07-100020")
    assert status == 200 and hold["OFFLINE"] is True, hold
    assert estate.sell("LC1000000006", "S001-07-100020", 100, hold["HOLD_ID"])[0] == 200
    estate.start_loyalty()
    assert wait_for(lambda: estate.redeemed("LC1000000006") == [("REDEEM", -100, "S001/S001-07-100020")],
                    timeout=120), estate.log("agent")
    assert queue_state(estate.uri, "rpc-loyalty")[0] == 0
    assert estate.platform.rows("SELECT count(*) FROM holds WHERE card = 'LC1000000006'") == [(0,)]
    assert estate.member("LC1000000006")["balance"] == 900
