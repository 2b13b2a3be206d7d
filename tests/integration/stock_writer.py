"""A legacy program in its own process, updating STK_LVL directly (for test_change_capture).

    python -m tests.integration.stock_writer DSN LOG N REWRITES GO

N updates of distinct rows, then (once the file GO exists: the test creates it when
it has seen every first version, so no version is overwritten before change capture
could read it) REWRITES updates of rows already updated, in
transactions of 50 rows that share one timestamp, as a batch program stamps
`now` once. Every 10th transaction commits late: it takes its timestamp, then
other transactions commit newer timestamps before it does (on PostgreSQL it
holds its updates open meanwhile; SQLite has one writer, so it waits before
writing). After each commit the versions written go to LOG as JSON lines.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import datetime, timezone

from sqlalchemy import bindparam, create_engine, update

from demo.legacy_erp.schema import STK_LVL

BATCH, LATE_EVERY, LATE_BY, PAUSE = 50, 10, 0.6, 0.03
UPDATE = (update(STK_LVL).where(STK_LVL.c.STORE_NO == bindparam("store"), STK_LVL.c.SKU == bindparam("sku"))
          .values(ON_HAND=bindparam("on_hand"), UPD_TS=bindparam("ts")))


def keys(n: int) -> list[tuple[str, str]]:
    return [(f"T{i % 10:03d}", f"SKU{i // 10:06d}") for i in range(n)]


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def main(dsn: str, log_path: str, n: int, rewrites: int, go: str):
    engine = create_engine(dsn, connect_args={"timeout": 30} if dsn.startswith("sqlite") else {})
    log = open(log_path, "a")
    lock = threading.Lock()
    postgres = not dsn.startswith("sqlite")
    targets = keys(n) + keys(n)[:rewrites]
    late_threads = []

    def commit(rows, ts, late):
        if late and not postgres:
            time.sleep(LATE_BY)  # the timestamp is old by the time it is written
        with engine.begin() as conn:
            conn.execute(UPDATE, rows)
            if late and postgres:
                time.sleep(LATE_BY)  # written, not yet committed
        with lock:
            for r in rows:
                log.write(json.dumps([r["store"], r["sku"], r["on_hand"], ts]) + "\n")
            log.flush()

    for t, start in enumerate(range(0, len(targets), BATCH)):
        if start == n:
            for th in late_threads:
                th.join()
            while not os.path.exists(go):
                time.sleep(0.05)  # polling for the test's file: a process has no better signal here
        ts = stamp()
        rows = [dict(store=s, sku=k, on_hand=(start + i) % 997 + (1000 if start >= n else 0), ts=ts)
                for i, (s, k) in enumerate(targets[start:start + BATCH])]
        if t % LATE_EVERY == LATE_EVERY - 1:
            th = threading.Thread(target=commit, args=(rows, ts, True))
            th.start()
            late_threads.append(th)
        else:
            commit(rows, ts, False)
        time.sleep(PAUSE)
    for th in late_threads:
        th.join()
    log.close()
    engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
