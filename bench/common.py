"""Helpers shared by the benchmarks in bench/.

A benchmark needs a broker it may load freely (a throw-away node unless the
caller names one), realistic messages, honest statistics (every run and the
median, never a single lucky run) and one machine-readable line at the end so
results can be compared over time. These live here so every benchmark measures
the same way.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import amqp
from ulid import ULID

from contracts.envelope import CloudEvent
from services.broker.node import start_on_free_ports
from bus.publisher import connection_params

SAMPLE_TYPE = "pos.stock_query.v1"


@contextlib.contextmanager
def bench_broker(uri: str | None):
    """Yield (amqp_uri, broker): the given URI with broker None, or a throw-away node
    in a temporary folder that is stopped (killed if stop fails) whatever happens."""
    if uri:
        yield uri, None
        return
    with tempfile.TemporaryDirectory(prefix="retailbus-bench-") as home:
        print("starting a throw-away RabbitMQ node ...", flush=True)
        started = time.monotonic()
        broker = start_on_free_ports(Path(home))
        print(f"broker up in {time.monotonic() - started:.1f}s (pid {broker.pid()})", flush=True)
        try:
            yield broker.uri(), broker
        finally:
            try:
                broker.stop()
            finally:
                if broker.is_running():
                    broker.kill()


def connect(uri: str) -> amqp.Connection:
    conn = amqp.Connection(**connection_params(uri, 10))
    conn.connect()
    return conn


def rabbitmq_version(uri: str) -> str:
    conn = connect(uri)
    try:
        return str(conn.server_properties.get("version", "?"))
    finally:
        conn.close()


def sample_event() -> CloudEvent:
    """A realistic ~300-byte CloudEvent: a POS stock query."""
    return CloudEvent.new(SAMPLE_TYPE, "store/S001/pos/01",
                          {"store_id": "S001", "skus": ["100001"]}, idempotencykey="k")


def sample_events(n: int) -> list[CloudEvent]:
    """n copies of the sample with distinct ids (built outside any timed section)."""
    base = sample_event()
    return [base.model_copy(update={"id": str(ULID())}) for _ in range(n)]


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank p-th percentile (p in 0..100) of `values`."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (Linux /proc), for CPU per sale."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_http(url: str, timeout: float = 60) -> None:
    """Until `url` answers (a process we started is up), else RuntimeError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f}s")


def peak_rss_kib() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def process_hwm_kib(pid: int | None) -> int | None:
    """Peak resident set size (VmHWM) of another process, if /proc lets us read it."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def environment(uri: str) -> dict:
    return {
        "python": platform.python_version(),
        "rabbitmq": rabbitmq_version(uri),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def emit_json(record: dict) -> None:
    """The one machine-readable line, always last on stdout."""
    print(json.dumps(record, sort_keys=True), flush=True)


def start_process(argv: list[str], home: Path, name: str, **env) -> subprocess.Popen:
    log = (home / f"{name}.log").open("ab")
    return subprocess.Popen(argv, cwd=home, stdout=log, stderr=log, start_new_session=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **env})


def stop_process(process: subprocess.Popen):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
