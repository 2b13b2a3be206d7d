"""Retention and the legacy GL index (issue 25), on SQLite files in a temporary folder:

    python bench/bench_retention.py [--runs 3] [--sales 20000] [--instances 20000]

(a) reconcile's loyalty side per store and day (services/reconcile/loyalty_sources.py
    `erp_loyalty_tenders`: the day's sales joined to their GL postings on GL_PST.DOC_NO), CPU
    per call with and without IX_GL_PST_DOC; SALES sales over 28 days in 2 stores, 3 GL rows each.
(b) what the index costs the hot path: a sale's 3 GL rows inserted, 64 sales a transaction
    (as the erp batches), CPU per sale with and without it.
(c) a retention batch of 500 completed process instances (6 history rows each) among INSTANCES,
    and (d) of 500 resolved cases (3 history rows each): CPU and wall time of the batch, which
    is how long the database's write lock is held, so how long a hot path may wait on it.
Each figure is the median of RUNS. Goals: (a) with the index < 50 ms; (c), (d) < 100 ms wall.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import emit_json, median  # noqa: E402
from bus.process import store as process_store  # noqa: E402
from demo.legacy_erp import schema  # noqa: E402
from services.cases import store as cases_store  # noqa: E402
from services.reconcile.loyalty_sources import erp_loyalty_tenders  # noqa: E402

OLD = datetime.now(timezone.utc) - timedelta(days=400)


def legacy(folder: Path, sales: int, index: bool):
    engine = schema.engine_for(f"sqlite:///{folder / f'legacy_{index}.db'}")
    schema.create_schema(engine)
    with engine.begin() as conn:
        if not index:
            conn.exec_driver_sql('DROP INDEX "IX_GL_PST_DOC"')
        conn.execute(insert(schema.SLS_HDR), [dict(
            DOC_NO=f"S{n:09d}", DOC_TYPE="S", STORE_NO=f"S00{n % 2 + 1}", TERM_NO="01", POS_TXN_ID=f"T{n}",
            TXN_DATE=f"202612{n % 28 + 1:02d}", TOTAL_CENTS=100, CURRENCY="EUR", CHANNEL="RBUS", CREATED_TS="x")
            for n in range(sales)])
        conn.execute(insert(schema.GL_PST), [dict(DOC_NO=f"S{n // 3:09d}", ACCOUNT=("1000", "4000", "1300")[n % 3],
                                                  DR_CENTS=10, CR_CENTS=0, POST_DATE="20261201")
                                             for n in range(3 * sales)])
    return engine


def join_ms(engine) -> float:
    started = time.process_time()
    erp_loyalty_tenders(engine, "S001", date(2026, 12, 5))
    return (time.process_time() - started) * 1000


def insert_us(folder: Path, index: bool, sales: int = 20_000) -> float:
    engine = schema.engine_for(f"sqlite:///{folder / f'inserts_{index}_{time.monotonic_ns()}.db'}")
    schema.create_schema(engine)
    if not index:
        with engine.begin() as conn:
            conn.exec_driver_sql('DROP INDEX "IX_GL_PST_DOC"')
    started = time.process_time()
    for first in range(0, sales, 64):
        with engine.begin() as conn:
            conn.execute(insert(schema.GL_PST), [dict(DOC_NO=f"S{n:09d}", ACCOUNT=a, DR_CENTS=1, CR_CENTS=0,
                                                      POST_DATE="20261205")
                                                 for n in range(first, first + 64) for a in ("1000", "4000", "1300")])
    engine.dispose()
    return (time.process_time() - started) / sales * 1e6


def timed(prune) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    assert prune() == 500
    return (time.process_time() - cpu) * 1000, (time.perf_counter() - wall) * 1000


def process_batches(folder: Path, instances: int, runs: int) -> list[tuple[float, float]]:
    engine = process_store.open_engine(f"sqlite:///{folder / 'process.db'}")
    process_store.create(engine)
    with process_store.transaction(engine) as conn:
        conn.execute(insert(process_store.INSTANCES), [dict(
            PROCESS_ID=f"P{n:08d}", PROCESS="returns", CORR_KEY=f"K{n}", STATE="completed" if n % 11 else "running",
            STEP=0, ROUND=0, VERSION=5, DATA=json.dumps({"x": "y" * 300}), STEPS="[]", DUE_AT=None, TRACE_ID="t",
            CREATED_AT=OLD.isoformat(), UPDATED_AT=OLD.isoformat()) for n in range(instances)])
        conn.execute(insert(process_store.HISTORY), [dict(PROCESS_ID=f"P{n // 6:08d}", AT=OLD.isoformat(), STEP="s",
                                                          WHAT="sent", DETAIL='{"a": 1}') for n in range(instances * 6)])
    cut = datetime.now(timezone.utc) - timedelta(days=30)
    return [timed(lambda: process_store.prune_completed(engine, cut, 500)) for _ in range(runs)]


def case_batches(folder: Path, cases: int, runs: int) -> list[tuple[float, float]]:
    engine = cases_store.open_engine(f"sqlite:///{folder / 'cases.db'}")
    stamp = cases_store.stamp(OLD)
    with engine.begin() as conn:
        conn.execute(insert(cases_store.CASES), [dict(
            case_id=f"c{n}", case_type="return_over_quantity", state="resolved", summary="s" * 200, opened_at=stamp,
            due_at=stamp, opened_by="x", received_at=stamp, updated_at=stamp, resolved_at=stamp, resolution="r")
            for n in range(cases)])
        conn.execute(insert(cases_store.HISTORY), [dict(case_id=f"c{n // 3}", at=stamp, actor="a", action="x",
                                                        detail="d" * 100) for n in range(cases * 3)])
    cut = datetime.now(timezone.utc) - timedelta(days=90)
    return [timed(lambda: cases_store.prune(engine, cut, 500)) for _ in range(runs)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sales", type=int, default=20_000)
    parser.add_argument("--instances", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scan, search = legacy(folder, args.sales, False), legacy(folder, args.sales, True)
        join = {name: round(median([join_ms(engine) for _ in range(args.runs)]), 1)
                for name, engine in (("without_index", scan), ("with_index", search))}
        inserts = {"without_index": [], "with_index": []}
        for _ in range(args.runs):  # alternated: a slow spell of the machine hits both
            inserts["without_index"].append(insert_us(folder, False))
            inserts["with_index"].append(insert_us(folder, True))
        process = process_batches(folder, args.instances, args.runs)
        cases = case_batches(folder, args.instances, args.runs)
    record = {
        "bench": "retention", "load": os.getloadavg(), "sales": args.sales, "instances": args.instances,
        "a_join_cpu_ms": join,
        "b_insert_cpu_us_per_sale": {k: round(median(v), 1) for k, v in inserts.items()},
        "c_process_batch_ms": {"cpu": round(median([c for c, _ in process]), 1),
                               "wall": round(median([w for _, w in process]), 1)},
        "d_cases_batch_ms": {"cpu": round(median([c for c, _ in cases]), 1),
                             "wall": round(median([w for _, w in cases]), 1)},
        "goals": {"a_join_with_index_ms": "< 50", "c_d_batch_wall_ms": "< 100"},
    }
    record["goals_met"] = {"a_join_with_index_ms": join["with_index"] < 50,
                           "c_d_batch_wall_ms": max(record["c_process_batch_ms"]["wall"],
                                                    record["d_cases_batch_ms"]["wall"]) < 100}
    for name in ("a_join_cpu_ms", "b_insert_cpu_us_per_sale", "c_process_batch_ms", "d_cases_batch_ms"):
        print(f"{name}: {record[name]}")
    emit_json(record)


if __name__ == "__main__":
    main()
