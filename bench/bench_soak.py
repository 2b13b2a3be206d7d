"""A soak of the whole estate: does anything grow with the day or with time?

    python bench/bench_soak.py [--minutes 20] [--rate 75] [--stores 2] [--file-every 300]
                               [--file-rows 20000] [--sample 60] [--retention-minutes M] [--keep]

`retailbus up` on a throw-away project root (bench/soak_estate.py), then signed
sales from the tills of every store at a steady open-loop rate (each sale is due
at its time whatever the answers before it did, and its latency counts from then,
so a stall shows in full), one in fifty sent twice as a till's retry, and a
customer export dropped every `--file-every` seconds. Every `--sample` seconds it
notes each process's RSS and open files, each database's and drop folder's size,
POS latency and what retention pruned. At the end: the exactly-once check (every
accepted sale in SLS_HDR once), `retailbus reconcile` on the day, a clean stop.

Reported: growth per hour (least squares over the second half, after warm-up) and
per million sales of each process's RSS and each store's size; POS p99 of the first
and last fifth of the run and their ratio. `--retention-minutes M` keeps every
retained thing about M minutes, to show pruning bounds storage within a short run.

Goals (issue 25, at 2 x 75 sales/s for 20 minutes on this machine): every process's
RSS grows < 10 MiB/hour in the second half, POS p99 of the last fifth <= 1.5 x the
first fifth's and < 50 ms, 0 sales lost, 0 doubled, the day reconciles (not asked of a
`--retention-minutes` run: it prunes the day's notes and points files by design).
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import emit_json  # noqa: E402
from bench.soak_estate import Estate, rss_and_fds  # noqa: E402
from routing.edge_auth import signed_headers  # noqa: E402

GOALS = {"rss_growth_mib_per_hour": 10.0, "p99_drift": 1.5, "p99_last_fifth_ms": 50.0, "lost": 0, "doubled": 0}
DAY = datetime.now(timezone.utc).strftime("%Y%m%d")


def percentile(values: list[float], p: float) -> float | None:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else None


def sale(store: str, txn: str) -> bytes:
    return json.dumps({"STORE": store, "TERMINAL": "01", "TXN_ID": txn, "TXN_DATE": DAY, "TXN_TIME": "101500",
                       "CURRENCY": "EUR", "LOYALTY_CARD": "LC0000000001",
                       "LINES": [{"SKU": "100001", "QTY": 2, "PRICE": 1999, "DISC": 0, "LINE": 3998}],
                       "TENDERS": [{"TYPE": "CARD", "AMOUNT": 3998}], "TOTAL": 3998}).encode()


class Tills:
    """The tills of one store: `threads` connections sharing one open-loop schedule."""

    def __init__(self, store: str, port: int, key: bytes, rate: float, until: float, threads: int = 6):
        self.store, self.port, self.key, self.rate, self.until = store, port, key, rate, until
        self.accepted: set[str] = set()
        self.latencies: list[tuple[float, float]] = []  # (due, seconds)
        self.errors: dict[str, int] = {}
        self.sampled = 0  # latencies already in a sample
        self._next = itertools.count()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self, t0: float):
        self.t0 = t0
        for thread in self.threads:
            thread.start()

    def join(self):
        for thread in self.threads:
            thread.join()

    def _run(self):
        conn = None
        while True:
            with self._lock:
                n = next(self._next)
            due = self.t0 + n / self.rate
            if due >= self.until:
                break
            time.sleep(max(0.0, due - time.time()))
            txn = f"{self.store}-{n - 1 if n % 50 == 49 else n:09d}"  # every 50th: the previous one again
            body = sale(self.store, txn)
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                conn.request("POST", "/erp/sales", body, {"Content-Type": "application/json", **signed_headers(
                    "01", self.key, "POST", "/erp/sales", body)})
                answer = conn.getresponse()
                answer.read()
                status = answer.status
            except (OSError, http.client.HTTPException) as exc:
                conn, status = None, type(exc).__name__
            with self._lock:
                self.latencies.append((due, time.time() - due))
                if status == 200:
                    self.accepted.add(txn)
                else:
                    self.errors[str(status)] = self.errors.get(str(status), 0) + 1


def customer_file(folder: Path, n: int, rows: int):
    """The CRM's export: every customer again with a new `updated_at` (so every row changes)."""
    folder.mkdir(parents=True, exist_ok=True)
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    path = folder / f"customers_{n:04d}.csv"
    with open(path, "w", encoding="utf-8") as f:
        f.write("customer_id,name,email,phone,loyalty_card,updated_at\n")
        for i in range(1, rows + 1):
            f.write(f"C{i:08d},Customer {i},c{i}@example.com,+49 30 {i:07d},LC{i:010d},{at}\n")
        f.write(f"TRL,{rows},,,,\n")
    Path(f"{path}.done").touch()


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (time s, value) in value per hour."""
    if len(points) < 2:
        return None
    mt = sum(t for t, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / den * 3600 if den else None


def erp_check(root: Path, accepted: set[str]) -> dict:
    with sqlite3.connect(root / "var" / "legacy_erp.db") as db:
        rows = db.execute("SELECT POS_TXN_ID, count(*) FROM SLS_HDR WHERE DOC_TYPE = 'S' GROUP BY POS_TXN_ID").fetchall()
    posted = dict(rows)
    return {"accepted": len(accepted), "in_erp": sum(posted.values()),
            "lost": len(accepted - posted.keys()), "doubled": sum(1 for n in posted.values() if n > 1),
            "unexpected": len(posted.keys() - accepted)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--rate", type=float, default=75, help="sales/s per store")
    parser.add_argument("--stores", type=int, default=2)
    parser.add_argument("--file-every", type=float, default=300, help="seconds between customer files")
    parser.add_argument("--file-rows", type=int, default=20000)
    parser.add_argument("--sample", type=float, default=60, help="seconds between samples")
    parser.add_argument("--retention-minutes", type=float, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the project root (its path is printed)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="retailbus-soak-"))
    estate = Estate(root, args.stores, args.retention_minutes)
    print(f"soak in {root}: {args.stores} stores x {args.rate:g} sales/s for {args.minutes:g} min", flush=True)
    samples, report = [], {}
    try:
        estate.start()
        t0 = time.time() + 2
        until = t0 + args.minutes * 60
        tills = [Tills(s, p, estate.keys[s], args.rate, until) for s, p in estate.stores.items()]
        for t in tills:
            t.start(t0)
        files, next_file, next_sample = 0, t0 + args.file_every / 2, t0
        while time.time() < until:
            now = time.time()
            if now >= next_file:
                files += 1
                customer_file(root / "var" / "drops" / "customers", files, args.file_rows)
                next_file += args.file_every
            if now >= next_sample:
                samples.append(sample(estate, tills, now - t0))
                s = samples[-1]
                print(f"{s['t']:7.0f}s  sales {s['sales']:>8}  in ERP {s['posted']:>8}  p99 {s['p99_ms'] or 0:7.1f} ms  "
                      + "  ".join(f"{k} {v['rss_mib']:.0f}" for k, v in sorted(s['processes'].items())), flush=True)
                next_sample += args.sample
            time.sleep(min(1.0, max(0.05, min(next_file, next_sample, until) - time.time())))
        for t in tills:
            t.join()
        samples.append(sample(estate, tills, time.time() - t0))
        report = summarise(args, samples, tills)
        report["exactly_once"] = drain_and_check(estate, tills)
        # a --retention-minutes run has pruned the day's notes and points files: asked once, not waited for
        report["reconcile_exit"] = reconcile(estate, timeout=0 if args.retention_minutes else 300)
    finally:
        report["up_exit"] = estate.stop()
        report["up_log_mib"] = round(estate.log.stat().st_size / 2 ** 20, 2) if estate.log.exists() else None
        if args.keep:
            print(f"kept {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    report["goals"] = GOALS
    report["goals_met"] = goals_met(report)
    emit_json(report)


def sample(estate: Estate, tills: list[Tills], t: float) -> dict:
    latest = []
    for till in tills:  # the latencies since the last sample
        with till._lock:
            latest += [lat for _, lat in till.latencies[till.sampled:]]
            till.sampled = len(till.latencies)
    processes = {}
    for name, pid in estate.processes().items():
        found = rss_and_fds(pid)
        if found:
            processes[name] = {"rss_mib": round(found[0], 1), "fds": found[1]}
    try:
        with sqlite3.connect(estate.root / "var" / "legacy_erp.db") as db:
            posted = db.execute("SELECT count(*) FROM SLS_HDR").fetchone()[0]
    except sqlite3.Error:  # not created yet
        posted = 0
    return {"t": round(t, 1), "sales": sum(len(x.accepted) for x in tills), "posted": posted,
            "p99_ms": _ms(percentile(latest, 99)),
            "processes": processes, "sizes": estate.sizes(), "pruned": estate.pruned()}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def summarise(args, samples: list[dict], tills: list[Tills]) -> dict:
    """Growth per hour over the second half, per million sales, and the p99 drift."""
    span = samples[-1]["t"]
    half = [s for s in samples if s["t"] >= span / 2]
    sales = samples[-1]["sales"] - half[0]["sales"]
    per_million = (lambda delta: round(delta / sales * 1e6, 1) if sales else None)
    processes = {}
    for name in samples[-1]["processes"]:
        series = [(s["t"], s["processes"][name]["rss_mib"]) for s in samples if name in s["processes"]]
        second = [(t, v) for t, v in series if t >= span / 2]
        fds = [s["processes"][name]["fds"] for s in samples if name in s["processes"]]
        growth = slope_per_hour(second)
        processes[name] = {"rss_first_mib": series[0][1], "rss_last_mib": series[-1][1],
                           "rss_max_mib": max(v for _, v in series),
                           "rss_growth_mib_per_hour": None if growth is None else round(growth, 1),
                           "rss_mib_per_million_sales": per_million(second[-1][1] - second[0][1]) if second else None,
                           "fds_first": fds[0], "fds_last": fds[-1], "fds_max": max(fds)}
    storage = {}
    for name in samples[-1]["sizes"]:
        series = [(s["t"], s["sizes"].get(name, 0) / 2 ** 20) for s in samples]
        second = [(t, v) for t, v in series if t >= span / 2]
        growth = slope_per_hour(second)
        storage[name] = {"last_mib": round(series[-1][1], 2), "max_mib": round(max(v for _, v in series), 2),
                         "growth_mib_per_hour": None if growth is None else round(growth, 2),
                         "mib_per_million_sales": per_million(second[-1][1] - second[0][1])}
    everything = sorted((due, lat) for till in tills for due, lat in till.latencies)
    start, end = everything[0][0], everything[-1][0]
    fifth = (end - start) / 5
    first = [lat for due, lat in everything if due < start + fifth]
    last = [lat for due, lat in everything if due >= end - fifth]
    p99_first, p99_last = percentile(first, 99), percentile(last, 99)
    return {
        "minutes": args.minutes, "rate_per_store": args.rate, "stores": args.stores,
        "retention_minutes": args.retention_minutes, "file_rows": args.file_rows, "file_every": args.file_every,
        "sales_sent": len(everything), "sales_accepted": sum(len(t.accepted) for t in tills),
        "errors": {k: v for t in tills for k, v in t.errors.items()},
        "p50_ms": _ms(percentile([lat for _, lat in everything], 50)),
        "p99_first_fifth_ms": _ms(p99_first), "p99_last_fifth_ms": _ms(p99_last),
        "p99_drift": round(p99_last / p99_first, 2) if p99_first else None,
        "max_ms": _ms(max(lat for _, lat in everything)),
        "per_sample_p99_ms": [s["p99_ms"] for s in samples],
        "erp_posted_per_s_second_half": round((samples[-1]["posted"] - half[0]["posted"]) / (span - half[0]["t"]), 1)
        if span > half[0]["t"] else None,
        "processes": processes, "storage": storage, "pruned": samples[-1]["pruned"],
    }


def drain_and_check(estate: Estate, tills: list[Tills], stall: float = 180, cap: float = 7200) -> dict:
    """Until every accepted sale is in SLS_HDR, waiting as long as the ERP keeps posting
    (an estate slower than the offered rate drains its backlog after the run); then lost
    and doubled. `drained` False: the ERP stopped posting for `stall` s (or `cap` passed)
    with sales still missing, which then count as lost."""
    accepted = set().union(*(t.accepted for t in tills))
    started = last_change = time.monotonic()
    seen = -1
    while True:
        check = erp_check(estate.root, accepted)
        if check["in_erp"] >= check["accepted"]:
            break
        if check["in_erp"] != seen:
            seen, last_change = check["in_erp"], time.monotonic()
            print(f"draining: {check['in_erp']} of {check['accepted']} in the ERP", flush=True)
        if time.monotonic() - last_change > stall or time.monotonic() - started > cap:
            break
        time.sleep(10)
    time.sleep(5)  # a doubled posting would be in by now: the queues were drained
    return {**erp_check(estate.root, accepted), "drained": check["in_erp"] >= check["accepted"],
            "drain_seconds": round(time.monotonic() - started)}


def reconcile(estate: Estate, timeout: float = 300) -> int:
    """`retailbus reconcile` on the day until it exits 0 (the control totals travel behind
    the sales, once a minute) or the deadline; its last exit code."""
    day = f"{DAY[:4]}-{DAY[4:6]}-{DAY[6:]}"
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run([str(Path(sys.executable).with_name("retailbus")), "reconcile", "--date", day,
                               "--config", str(estate.config)], capture_output=True, text=True, cwd=estate.root)
        if done.returncode == 0 or time.monotonic() > deadline:
            if done.returncode:
                print(done.stdout[-2000:], done.stderr[-2000:], flush=True)
            return done.returncode
        time.sleep(10)


def goals_met(report: dict) -> dict[str, bool]:
    processes = report.get("processes", {})
    once = report.get("exactly_once", {})
    growth = [p["rss_growth_mib_per_hour"] for p in processes.values()]
    return {
        "rss_growth_mib_per_hour": bool(growth) and all(g is not None and g < GOALS["rss_growth_mib_per_hour"]
                                                        for g in growth),
        "p99_drift": (report.get("p99_drift") or 99) <= GOALS["p99_drift"],
        "p99_last_fifth_ms": (report.get("p99_last_fifth_ms") or 1e9) < GOALS["p99_last_fifth_ms"],
        "lost": bool(once.get("drained")) and once.get("lost") == GOALS["lost"],
        "doubled": once.get("doubled") == GOALS["doubled"],
        # a --retention-minutes run prunes the day's notes and points files by design
        "reconciles": report.get("reconcile_exit") == 0 or report.get("retention_minutes") is not None,
    }


if __name__ == "__main__":
    main()
