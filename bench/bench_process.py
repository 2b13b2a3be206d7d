"""The process engine (bus/process): returns per second end to end, and the engine's own
overhead per step against a bare reliable_handler doing the same effects, in the same run.

    python bench/bench_process.py [--amqp-uri URI] [--runs 3] [--sales 150] [--instances 300] [--steps 4]

(a) returns/s end to end: the erp, loyalty, crm and returns services and the demo platforms as
    real processes (tests/integration/returns_estate.py), a seeded legacy ERP; SALES sales with
    cards posted and accrued, then their 2 x SALES returns published at once; returns/s =
    returns / (first publish -> every instance completed). Four steps a return: post in the
    ERP, refund and reverse points at the platform, the CRM entry.
(b) the engine, per step: a process of STEPS steps on the engine (bench/process_services.py),
    each step a command to a target service whose command_handler does the step's effect and
    answers; INSTANCES started at once; per step = wall time / (INSTANCES x STEPS), and CPU per
    step (target + process service).
(c) raw: the same target doing the same effect as a bare reliable_handler chain (then it
    publishes the next step's event itself); same count, same measures (CPU: the target).
(b) and (c) run with two effects: `row` (an inbox key and a row in one SQLite commit: the
engine's overhead against next to nothing) and `platform` (first a keyed EARN at the demo
loyalty platform over HTTP, 16 at a time, as the return's loyalty steps book: a real step).
Runs alternate (b) and (c), so a slow spell hits both; each figure is the median of the runs',
the ratio the median of each run's b / c (a run's pair shares its minute of a shared machine).
Goal: the engine adds at most 50 % per step: b / c <= 1.5 (wall time; CPU shown besides).
"""
import eventlet

eventlet.monkey_patch()  # the publisher runs on eventlet; must precede other imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
from bench.common import (bench_broker, cpu_seconds, emit_json, environment, median, process_hwm_kib,  # noqa: E402
                          start_process, stop_process, wait_http)
from bus.extensions import event_message  # noqa: E402
from bus.publisher import ConfirmingPublisher  # noqa: E402
from contracts.envelope import CloudEvent  # noqa: E402
from contracts.returns import CrmRecordReturnV1  # noqa: E402
from services.broker.setup import free_ports  # noqa: E402
from tests.integration.returns_estate import ReturnsEstate, workload  # noqa: E402
from tests.integration.support import queue_state, wait_for  # noqa: E402

GOALS = {"engine_over_bare_per_step_platform": 1.5, "engine_over_bare_per_step_row": 1.5}


def wait_rows(db: Path, sql: str, want: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(db, timeout=30) as conn:
                if conn.execute(sql).fetchone()[0] >= want:
                    return
        except sqlite3.OperationalError:  # not created yet
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{db}: {sql} did not reach {want} in {timeout:.0f} s")


def end_to_end(uri: str, home: Path, runs: int, sales: int) -> list[float]:
    """(a): returns/s per run, on one estate (a new workload each run)."""
    estate = ReturnsEstate(home / "estate", uri, processes={"return_to_refund": {"poll_seconds": 0.5}})
    rates = []
    try:
        estate.start("erp", "loyalty", "crm", "returns")
        for run in range(runs):
            prefix = f"B{run}"
            work = workload(prefix, sales, 40, seed=run)
            for card in sorted({s.txn.loyalty_card for s in work}):
                estate.enrol(card)
            estate.publish([s.txn for s in work])
            assert wait_for(lambda: len(estate.loyalty("SELECT DISTINCT POS_TXN_ID FROM LOY_ACCRUAL WHERE "
                                                       f"POS_TXN_ID LIKE '{prefix}-S%'")) == sales, 300)
            returns = [r for s in work for r in s.returns]
            started = time.monotonic()
            estate.publish(returns)
            assert estate.settled(len(returns), 600, prefix=f"{prefix}-R"), estate.log("returns")
            rates.append(len(returns) / (time.monotonic() - started))
            print(f"  (a) run {run + 1}: {len(returns)} returns, {rates[-1]:.1f} returns/s, "
                  f"{estate.instances(f'{prefix}-R')}", flush=True)
    finally:
        estate.close()
    return rates


def write_config(home: Path, uri: str, platform_port: int) -> Path:
    shipped = yaml.safe_load((REPO / "config" / "bus.yaml").read_text())
    config = {k: v for k, v in shipped.items() if k != "RETAILBUS"}
    config.update(AMQP_URI=uri, BENCH_DB_URI=f"sqlite:///{home / 'target.db'}",
                  BENCH_PROCESS_DB_URI=f"sqlite:///{home / 'process.db'}")
    config["RETAILBUS"] = {"root": str(home), "journal": {"enabled": False},
                           "processes": {"bench": {"poll_seconds": 1.0}},
                           "loyalty_platform": {"http": f"127.0.0.1:{platform_port}", "db": "var/platform.db"}}
    (home / "config").mkdir(parents=True, exist_ok=True)
    path = home / "config" / "bus.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def steps_of(prefix: str, n: int) -> list[CloudEvent]:
    out = []
    for k in range(n):
        step = CrmRecordReturnV1(store_id="S001", pos_txn_id=f"{prefix}-{k:06d}", loyalty_card="L",
                                 amount_minor=0, posted_at=datetime.now(timezone.utc))
        out.append(CloudEvent.new(step.TYPE, "bench", step, subject=step.pos_txn_id,
                                  idempotencykey=f"start:{step.pos_txn_id}"))
    return out


def per_step(publisher, uri, home, pids, exchange, prefix, instances, steps, done_sql, done_db) -> tuple[float, float]:
    """(ms, CPU ms) per step of `instances` started at once on `exchange`."""
    events = steps_of(prefix, instances)
    cpu0 = sum(cpu_seconds(pid) for pid in pids)
    started = time.monotonic()
    assert publisher.publish_many([event_message(e, exchange) for e in events]) == [None] * instances
    wait_rows(done_db, done_sql.format(prefix=prefix), instances)
    wall = time.monotonic() - started
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
    return wall * 1000 / (instances * steps), cpu * 1000 / (instances * steps)


def engine_vs_bare(uri: str, home: Path, runs: int, instances: int, steps: int, effect: str) -> dict:
    home.mkdir(parents=True)
    [platform_port] = free_ports(1)
    config = write_config(home, uri, platform_port)
    env = {"PYTHONPATH": str(REPO), "BENCH_STEPS": str(steps), "EVENTLET_NO_GREENDNS": "yes", "BENCH_EFFECT": effect}
    platform = start_process([sys.executable, "-m", "demo.loyalty_platform", "--db", str(home / "platform.db"),
                              "--port", str(platform_port)], home, "platform")
    wait_http(f"http://127.0.0.1:{platform_port}/health")
    enrol = urllib.request.Request(f"http://127.0.0.1:{platform_port}/members", method="POST",
                                   data=json.dumps({"card": "BENCH", "customer_id": "B"}).encode(),
                                   headers={"Content-Type": "application/json", "Idempotency-Key": "bench"})
    urllib.request.urlopen(enrol, timeout=10).read()
    runner = [sys.executable, "-m", "bus.runner", "--config", str(config)]
    target = start_process(runner + ["bench.process_services:BenchTarget"], home, "target", **env)
    process = start_process(runner + ["bench.process_services:BenchProcess"], home, "process", **env)
    publisher = ConfirmingPublisher(uri, window=1000)
    engine, bare = [], []
    try:
        for queue in ("evt-bench_driver-crm.record_return.v1--bench_process.on_start",
                      "evt-bench_target-crm.record_return.v1--bench_target.on_step",
                      "evt-bench_target-crm.record_return.v1--bench_target.on_chain"):
            assert wait_for(lambda: queue_state(uri, queue)[1] >= 1, 120), queue
        per_step(publisher, uri, home, [target.pid, process.pid], "bench_driver.events", "warm", 50, steps,
                 'SELECT count(*) FROM "RB_PROCESS" WHERE "STATE" = \'completed\' AND "CORR_KEY" LIKE \'{prefix}-%\'',
                 home / "process.db")
        for run in range(runs):
            engine.append(per_step(
                publisher, uri, home, [target.pid, process.pid], "bench_driver.events", f"e{run}", instances, steps,
                'SELECT count(*) FROM "RB_PROCESS" WHERE "STATE" = \'completed\' AND "CORR_KEY" LIKE \'{prefix}-%\'',
                home / "process.db"))
            bare.append(per_step(
                publisher, uri, home, [target.pid], "bench_target.events", f"c{run}", instances, steps,
                f'SELECT count(*) FROM "BENCH_EFFECT" WHERE "STEP" = {steps - 1} AND "TXN" LIKE \'{{prefix}}-%\' '
                "AND \"KEY\" LIKE 'chain:%'", home / "target.db"))
            print(f"  {effect} run {run + 1}: (b) engine {engine[-1][0]:.2f} ms/step (CPU {engine[-1][1]:.2f} ms), "
                  f"(c) bare {bare[-1][0]:.2f} ms/step (CPU {bare[-1][1]:.2f} ms)", flush=True)
        hwm = {"target": process_hwm_kib(target.pid), "process": process_hwm_kib(process.pid)}
    finally:
        publisher.close()
        stop_process(process)
        stop_process(target)
        stop_process(platform)
    return {"engine_over_bare_runs": [round(e[0] / b[0], 3) for e, b in zip(engine, bare)],
            "engine_ms_per_step": median([e[0] for e in engine]), "engine_cpu_ms_per_step": median([e[1] for e in engine]),
            "bare_ms_per_step": median([b[0] for b in bare]), "bare_cpu_ms_per_step": median([b[1] for b in bare]),
            "engine_runs_ms": [round(e[0], 3) for e in engine], "bare_runs_ms": [round(b[0], 3) for b in bare],
            "peak_rss_kib": hwm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-uri")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sales", type=int, default=150, help="(a): sales, each returned in two returns")
    parser.add_argument("--instances", type=int, default=300, help="(b), (c): instances started at once")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    with bench_broker(args.amqp_uri) as (uri, _broker), tempfile.TemporaryDirectory(prefix="bench-process-") as tmp:
        home = Path(tmp)
        print(f"(b)/(c): {args.instances} instances x {args.steps} steps, {args.runs} runs", flush=True)
        steps = {effect: engine_vs_bare(uri, home / effect, args.runs, args.instances, args.steps, effect)
                 for effect in ("row", "platform")}
        rates = [] if args.skip_end_to_end else end_to_end(uri, home, args.runs, args.sales)
        record = {"bench": "process", **environment(uri), "load": os.getloadavg(),
                  "returns_per_s": median(rates) if rates else None, "returns_runs": rates}
        print(f"(a) returns/s end to end: {median(rates) if rates else float('nan'):.1f} (runs "
              f"{', '.join(f'{r:.1f}' for r in rates)})")
        for effect, figures in steps.items():
            ratio = median(figures["engine_over_bare_runs"])  # each run's pair shares its minute of the machine
            cpu_ratio = figures["engine_cpu_ms_per_step"] / figures["bare_cpu_ms_per_step"]
            print(f"{effect}: (b) engine {figures['engine_ms_per_step']:.2f} ms/step vs (c) bare "
                  f"{figures['bare_ms_per_step']:.2f} ms/step: {ratio:.2f}x ({(ratio - 1) * 100:+.0f} %); CPU "
                  f"{figures['engine_cpu_ms_per_step']:.2f} vs {figures['bare_cpu_ms_per_step']:.2f} ms/step: "
                  f"{cpu_ratio:.2f}x")
            record.update({f"{k}_{effect}": v for k, v in figures.items()})
            record[f"engine_over_bare_per_step_{effect}"] = ratio
            record[f"engine_over_bare_cpu_per_step_{effect}"] = cpu_ratio
        record["goals"] = GOALS
        record["goals_met"] = {k: record[k] <= v for k, v in GOALS.items()}
        emit_json(record)


if __name__ == "__main__":
    main()
