"""The simulated legacy ERP as POS systems see it: a real process over HTTP.

Each server is a subprocess we start on port 0 and stop by its own pid; rows
are checked by SELECT on the SQLite file it writes.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import func, select

from demo.legacy_erp.schema import (
    DOC_SEQ, GL_PST, SLS_HDR, SLS_LIN, SLS_TND, STK_LVL, CUST_MST,
    create_schema, engine_for, seed_demo_data,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class ErpProcess:
    """A ``python -m demo.legacy_erp serve`` child, its URL and its log."""

    def __init__(self, dsn: str, log: Path, *args: str):
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "demo.legacy_erp", "serve", "--db", dsn, "--port", "0", *args]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out)
        self.url = self._wait_ready()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://\S+)", self.log.read_text())
            if found and call("GET", found.group(1) + "/erp/health")[0] == 200:
                return found.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"legacy ERP did not start:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def call(method: str, url: str, body=None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except (urllib.error.URLError, ConnectionError):
        return 0, {}


def sale(txn_id: str, store="S001", sku="100001", qty=2, price=1999, tenders=None) -> dict:
    line = qty * price
    return {
        "STORE": store, "TERMINAL": "07", "TXN_ID": txn_id, "TXN_DATE": "20261127",
        "TXN_TIME": "101500", "CURRENCY": "EUR",
        "LINES": [{"SKU": sku, "QTY": qty, "PRICE": price, "DISC": 0, "LINE": line}],
        "TENDERS": tenders or [{"TYPE": "CASH", "AMOUNT": line}],
        "TOTAL": line, "LOYALTY_CARD": None, "CUST_NO": None,
    }


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("erp") / "erp.db"
    dsn = f"sqlite:///{path}"
    subprocess.run([sys.executable, "-m", "demo.legacy_erp", "init", "--db", dsn, "--seed"],
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return dsn


@pytest.fixture(scope="module")
def erp(db, tmp_path_factory):
    server = ErpProcess(db, tmp_path_factory.mktemp("log") / "erp.log", "--init")
    yield server
    assert server.stop() == 0, server.log.read_text()


@pytest.fixture(scope="module")
def engine(db):
    engine = engine_for(db)
    yield engine
    engine.dispose()


def on_hand(engine, store, sku):
    with engine.connect() as conn:
        return conn.execute(select(STK_LVL.c.ON_HAND)
                            .where(STK_LVL.c.STORE_NO == store, STK_LVL.c.SKU == sku)).scalar()


def headers_for(engine, txn_id):
    with engine.connect() as conn:
        return conn.execute(select(SLS_HDR).where(SLS_HDR.c.POS_TXN_ID == txn_id)).mappings().all()


def test_sale_writes_document_stock_and_gl(erp, engine):
    before = on_hand(engine, "S001", "100002")
    payload = sale("S001-07-000001", sku="100002", qty=3, price=500, tenders=[
        {"TYPE": "CARD", "AMOUNT": 1000}, {"TYPE": "VOUCHER", "AMOUNT": 500}])
    status, answer = call("POST", erp.url + "/erp/sales", payload)
    assert status == 200 and answer["STATUS"] == "OK"
    doc_no = answer["DOC_NO"]
    assert re.fullmatch(r"S\d{8}", doc_no)

    [hdr] = headers_for(engine, "S001-07-000001")
    assert (hdr["DOC_NO"], hdr["DOC_TYPE"], hdr["STORE_NO"], hdr["TERM_NO"]) == (doc_no, "S", "S001", "07")
    assert (hdr["TOTAL_CENTS"], hdr["CURRENCY"], hdr["CHANNEL"]) == (1500, "EUR", "POSAPI")
    assert (hdr["TXN_DATE"], hdr["TXN_TIME"], hdr["ORIG_DOC_NO"]) == ("20261127", "101500", None)
    assert len(hdr["CREATED_TS"]) == 26
    with engine.connect() as conn:
        lines = conn.execute(select(SLS_LIN).where(SLS_LIN.c.DOC_NO == doc_no)).mappings().all()
        tenders = conn.execute(select(SLS_TND.c.SEQ, SLS_TND.c.TND_TYPE, SLS_TND.c.AMOUNT_CENTS)
                               .where(SLS_TND.c.DOC_NO == doc_no).order_by(SLS_TND.c.SEQ)).all()
        gl = conn.execute(select(GL_PST.c.ACCOUNT, GL_PST.c.DR_CENTS, GL_PST.c.CR_CENTS,
                                 GL_PST.c.POST_DATE)
                          .where(GL_PST.c.DOC_NO == doc_no).order_by(GL_PST.c.GL_ID)).all()
    assert [(l["LINE_NO"], l["SKU"], l["QTY"], l["UNIT_PRICE_CENTS"], l["DISC_CENTS"], l["LINE_CENTS"])
            for l in lines] == [(1, "100002", 3, 500, 0, 1500)]
    assert tenders == [(1, "CARD", 1000), (2, "VOUCHER", 500)]
    assert gl == [("1100", 1000, 0, "20261127"), ("1200", 500, 0, "20261127"),
                  ("4000", 0, 1500, "20261127")]
    assert on_hand(engine, "S001", "100002") == before - 3


def test_same_txn_id_twice_gives_one_document(erp, engine):
    first = call("POST", erp.url + "/erp/sales", sale("S001-07-000002"))
    second = call("POST", erp.url + "/erp/sales", sale("S001-07-000002"))
    assert first[0] == second[0] == 200
    assert first[1]["DOC_NO"] == second[1]["DOC_NO"]
    assert len(headers_for(engine, "S001-07-000002")) == 1


def test_return_references_sale_and_restores_stock(erp, engine):
    before = on_hand(engine, "S002", "100005")
    _, sold = call("POST", erp.url + "/erp/sales", sale("S002-01-000001", store="S002", sku="100005", qty=4))
    assert on_hand(engine, "S002", "100005") == before - 4
    refund = {**sale("S002-01-R00001", store="S002", sku="100005", qty=4),
              "ORIG_STORE": "S002", "ORIG_TXN_ID": "S002-01-000001", "REASON": "damaged"}
    status, answer = call("POST", erp.url + "/erp/returns", refund)
    assert status == 200 and re.fullmatch(r"R\d{8}", answer["DOC_NO"])
    [hdr] = headers_for(engine, "S002-01-R00001")
    assert (hdr["DOC_TYPE"], hdr["ORIG_DOC_NO"]) == ("R", sold["DOC_NO"])
    assert on_hand(engine, "S002", "100005") == before
    with engine.connect() as conn:
        gl = conn.execute(select(GL_PST.c.ACCOUNT, GL_PST.c.DR_CENTS, GL_PST.c.CR_CENTS)
                          .where(GL_PST.c.DOC_NO == answer["DOC_NO"]).order_by(GL_PST.c.GL_ID)).all()
    assert gl == [("1000", 0, 7996), ("4000", 7996, 0)]


def test_return_without_known_original(erp, engine):
    refund = {**sale("S001-07-R00009"), "ORIG_STORE": "S001", "ORIG_TXN_ID": "never-sold"}
    assert call("POST", erp.url + "/erp/returns", refund)[0] == 200
    [hdr] = headers_for(engine, "S001-07-R00009")
    assert hdr["ORIG_DOC_NO"] is None


def test_gl_balances_per_document(erp, engine):
    call("POST", erp.url + "/erp/sales", sale("S001-07-000003", tenders=[
        {"TYPE": "LOYALTY", "AMOUNT": 998}, {"TYPE": "OTHER", "AMOUNT": 3000}]))
    with engine.connect() as conn:
        rows = conn.execute(select(GL_PST.c.DOC_NO, func.sum(GL_PST.c.DR_CENTS),
                                   func.sum(GL_PST.c.CR_CENTS)).group_by(GL_PST.c.DOC_NO)).all()
        docs = conn.execute(select(func.count()).select_from(SLS_HDR)).scalar()
    assert len(rows) == docs > 0
    assert all(dr == cr > 0 for _, dr, cr in rows)


@pytest.mark.parametrize("mutate, field", [
    (lambda p: p.update(LINES=[]), "LINES"),
    (lambda p: p["LINES"][0].update(QTY=0, LINE=0), "LINES[1].QTY: must not be zero"),
    (lambda p: p["LINES"][0].update(LINE=1), "LINES[1].LINE"),
    (lambda p: p["LINES"][0].update(QTY="2"), "LINES[1].QTY: must be an integer"),
    (lambda p: p.update(TOTAL=1), "TOTAL"),
    (lambda p: p["TENDERS"][0].update(AMOUNT=1), "TENDERS"),
    (lambda p: p["TENDERS"][0].update(TYPE="BITCOIN"), "TENDERS[1].TYPE"),
    (lambda p: p.pop("STORE"), "STORE: required"),
    (lambda p: p.update(TXN_DATE="20261332"), "TXN_DATE"),
    (lambda p: p.update(CURRENCY="euro"), "CURRENCY"),
])
def test_bad_payload_is_400_naming_the_field(erp, engine, mutate, field):
    payload = sale("S001-07-BAD")
    mutate(payload)
    status, answer = call("POST", erp.url + "/erp/sales", payload)
    assert status == 400 and answer["STATUS"] == "ERROR"
    assert answer["MESSAGE"].startswith(field), answer
    assert headers_for(engine, "S001-07-BAD") == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_body_is_400(erp, body):
    status, answer = call("POST", erp.url + "/erp/sales", body)
    assert status == 400 and answer["MESSAGE"].startswith("body: ")


def test_stock_query(erp, engine):
    status, answer = call("GET", erp.url + "/erp/stock?STORE=S002&SKU=100020")
    assert status == 200
    level = on_hand(engine, "S002", "100020")  # no click-and-collect order reserves any of it
    assert answer == {"STORE": "S002", "SKU": "100020", "ON_HAND": level, "RESERVED": 0, "AVAILABLE": level}
    status, answer = call("GET", erp.url + "/erp/stock?STORE=S009&SKU=100020")
    assert status == 404 and answer["STATUS"] == "ERROR"
    assert call("GET", erp.url + "/erp/stock?STORE=S001")[1]["MESSAGE"] == "SKU: required"


def test_unknown_path_and_method(erp):
    assert call("GET", erp.url + "/erp/nothing")[0] == 404
    assert call("GET", erp.url + "/erp/sales")[0] == 405


def test_concurrent_sales_get_distinct_numbers(erp, engine):
    before = on_hand(engine, "S001", "100010")
    txns = [f"S001-08-{n:06d}" for n in range(40)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda t: call("POST", erp.url + "/erp/sales",
                                               sale(t, sku="100010", qty=1)), txns))
    assert all(status == 200 for status, _ in answers), answers
    assert len({answer["DOC_NO"] for _, answer in answers}) == len(txns)
    assert on_hand(engine, "S001", "100010") == before - len(txns)


def test_fail_rate_answers_503_without_writing(db, engine, tmp_path):
    server = ErpProcess(db, tmp_path / "erp.log", "--fail-rate", "1")
    try:
        status, answer = call("POST", server.url + "/erp/sales", sale("S001-07-FAIL"))
        assert status == 503 and answer["STATUS"] == "ERROR"
        assert call("GET", server.url + "/erp/stock?STORE=S001&SKU=100001")[0] == 200
    finally:
        assert server.stop() == 0
    assert headers_for(engine, "S001-07-FAIL") == []


def test_latency_is_simulated(db, tmp_path):
    server = ErpProcess(db, tmp_path / "erp.log", "--latency-ms", "300")
    try:
        started = time.monotonic()
        assert call("GET", server.url + "/erp/stock?STORE=S001&SKU=100001")[0] == 200
        assert time.monotonic() - started >= 0.3
    finally:
        server.stop()


def test_database_failure_is_500_without_traceback(tmp_path):
    server = ErpProcess(f"sqlite:///{tmp_path / 'empty.db'}", tmp_path / "erp.log")  # no --init
    try:
        status, answer = call("POST", server.url + "/erp/sales", sale("S001-07-NODB"))
        assert status == 500 and answer["STATUS"] == "ERROR"
        assert "Traceback" not in answer["MESSAGE"]
    finally:
        server.stop()


def test_create_schema_and_seed_are_idempotent(tmp_path):
    engine = engine_for(f"sqlite:///{tmp_path / 'erp.db'}")
    try:
        create_schema(engine)
        with engine.begin() as conn:
            seed_demo_data(conn)
            conn.execute(DOC_SEQ.update().values(NEXT_NO=42))
        create_schema(engine)
        with engine.begin() as conn:
            seed_demo_data(conn)
        with engine.connect() as conn:
            assert dict(conn.execute(select(DOC_SEQ.c.SEQ_NAME, DOC_SEQ.c.NEXT_NO)).all()) == \
                {"SLS": 42, "RTN": 42, "ORD": 42}
            assert conn.execute(select(func.count()).select_from(STK_LVL)).scalar() == 40
            assert conn.execute(select(func.count()).select_from(CUST_MST)).scalar() == 5
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
