"""The whole estate for bench/bench_soak.py: a throw-away project root with its own
ports, `retailbus up` on it, and what a soak samples of it (every process's RSS and
open files, every database's and folder's size, the pruning counters).

Kept apart from the soak's load and report so each file has one job.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from bus.settings import RetailbusSettings
from routing.edge_auth import TerminalKeys
from services.broker.node import ManagedBroker

REPO = Path(__file__).resolve().parents[1]
ROUTES = """legacy: {{base_url: "http://127.0.0.1:{port}", timeout: 5}}
routes:
  - {{name: sales, message: pos.sale.v1, legacy: POST /erp/sales, mode: bus}}
  - {{name: returns, message: pos.return.v1, legacy: POST /erp/returns, mode: bus}}
  - {{name: stock, message: pos.stock_query.v1, legacy: GET /erp/stock, mode: bus}}
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def retention_in_minutes(minutes: float) -> tuple[dict, dict]:
    """(agent, retention) settings that keep everything about `minutes` (the floor rules
    of bus/settings.py hold: keys outlive redeliveries, notes outlive the totals window)."""
    days = minutes / 1440
    agent = {"retention_days": days, "control_totals_days": days}
    retention = {"interval": 15, "dlq_days": 0, "journal_days": days, "relay_sent_days": days,
                 "reconcile_days": days, "outbound_files_days": days, "archive_days": days, "wal_idle_seconds": 10}
    return agent, retention


def keys_floor(settings: dict) -> float:
    """The shortest inbox and ledger retention `settings` (RETAILBUS) are accepted with."""
    probe = {**settings, "retention": {**settings.get("retention", {}), "inbox_days": 1e6, "ledger_days": 1e6}}
    return RetailbusSettings.model_validate({k: v for k, v in probe.items() if k != "root"}).redelivery_days()


class Estate:
    """`retailbus up` in `root` with `stores` store agents, signed tills, free ports."""

    def __init__(self, root: Path, stores: int, retention_minutes: float | None):
        self.root = root
        shipped = yaml.safe_load((REPO / "config" / "bus.yaml").read_text())
        config = {k: v for k, v in shipped.items() if k != "RETAILBUS"}
        settings = shipped["RETAILBUS"]
        services = list(settings["services"])  # every service the shipped config runs
        mq, dist, mgmt, self.erp_port, *rest = free_ports(4 + stores + len(services))
        self.broker_ports = (mq, dist, mgmt)
        self.stores = {f"S{i + 1:03d}": rest[i] for i in range(stores)}
        metrics = dict(zip(services, rest[stores:]))
        self.metrics_ports = metrics
        self.modules = {s["module"]: name for name, s in settings["services"].items()} | {"demo.legacy_erp": "legacy_erp"}
        settings.update(
            root=str(root), broker={**settings["broker"], "home": "var/broker", "port": mq, "dist_port": dist,
                                    "management_port": mgmt},
            services={name: {**settings["services"][name], "metrics_port": metrics[name]} for name in services},
            stores=[{"id": s, "http": f"127.0.0.1:{p}"} for s, p in self.stores.items()],
            legacy_erp={"http": f"127.0.0.1:{self.erp_port}"},
            reconcile={**settings["reconcile"], "interval": 60})
        if retention_minutes:
            agent, retention = retention_in_minutes(retention_minutes)
            settings["agent"] = {**settings.get("agent", {}), **agent}
            settings["retention"] = {**settings.get("retention", {}), **retention}
            floor = keys_floor(settings) + retention_minutes / 1440  # the floor, and the minutes past it
            settings["retention"].update(inbox_days=floor, ledger_days=floor)
        config["RETAILBUS"] = settings
        (root / "config").mkdir(parents=True, exist_ok=True)
        self.config = root / "config" / "bus.yaml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        (root / "config" / "routes.yaml").write_text(ROUTES.format(port=self.erp_port))
        for other in (REPO / "config").glob("*.yaml"):  # filedrops.yaml, and what other services read
            if other.name not in ("bus.yaml", "routes.yaml"):
                shutil.copyfile(other, root / "config" / other.name)
        self.keys = {}
        for store in self.stores:
            keys = TerminalKeys(root / "var" / "stores" / store / "terminal_keys.json")
            self.keys[store] = bytes.fromhex(keys.add("01"))
        self.up: subprocess.Popen | None = None
        self.log = root / "up.log"

    def start(self, timeout: float = 300):
        env = {k: v for k, v in os.environ.items() if k not in ("RETAILBUS_AMQP_URI", "RETAILBUS_LEGACY_DB")}
        # the demo stock, so a sale finds its SKU (`up` creates the schema only)
        subprocess.run([sys.executable, "-m", "demo.legacy_erp", "init", "--seed", "--db",
                        f"sqlite:///{self.root / 'var' / 'legacy_erp.db'}"], cwd=REPO, env=env, check=True,
                       capture_output=True)
        retailbus = Path(sys.executable).with_name("retailbus")
        self.up = subprocess.Popen([str(retailbus), "up", "--config", str(self.config)], cwd=self.root, env=env,
                                   stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        urls = [f"http://127.0.0.1:{p}/healthz" for p in self.stores.values()] + \
               [f"http://127.0.0.1:{p}/metrics" for p in self.metrics_ports.values()]
        while time.monotonic() < deadline:
            if self.up.poll() is not None:
                raise RuntimeError(f"retailbus up exited {self.up.returncode}: {self.log.read_text()[-3000:]}")
            if all(_answers(u) for u in urls):
                return
            time.sleep(1)
        raise RuntimeError(f"the estate did not come up in {timeout:g}s: {self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 180) -> int | None:
        """SIGTERM to the `retailbus up` we started (it drains and stops its children)."""
        if self.up is None:
            return None
        if self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
        try:
            code = self.up.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.up.pid, signal.SIGKILL)  # the group of the process we started
            code = self.up.wait()
        broker = ManagedBroker(self.root / "var" / "broker", *self.broker_ports)
        if broker.is_running():  # `up` stopped while it was starting its broker: ours to stop
            broker.stop()
        return code

    # -- what is sampled --------------------------------------------------------------

    def processes(self) -> dict[str, int]:
        """name -> pid of `up`'s children (by their command line) and the broker."""
        found = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid != self.up.pid:
                continue
            module = next((a.decode() for a in argv if a.startswith((b"services.", b"routing.", b"demo."))), "")
            if module == "routing.store_agent":
                store = re.search(rb"RETAILBUS_STORE=(\w+)", (proc / "environ").read_bytes())
                name = f"store_agent {store.group(1).decode() if store else proc.name}"
            else:
                name = self.modules.get(module) or Path(argv[0].decode(errors="replace")).name or proc.name
            found[name] = int(proc.name)
        broker = ManagedBroker(self.root / "var" / "broker", *self.broker_ports).pid()
        if broker is not None:
            found["rabbitmq"] = broker
        return found

    def sizes(self) -> dict[str, int]:
        """Bytes of every database (with its WAL) and every drop folder under var/."""
        out = {}
        var = self.root / "var"
        for db in var.rglob("*.db"):
            name = str(db.relative_to(var))
            out[name] = sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
        for folder in (var / "drops").glob("*") if (var / "drops").exists() else ():
            out[f"drops/{folder.name}"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        out["up.log"] = self.log.stat().st_size
        return out

    def pruned(self) -> dict[str, float]:
        """retailbus_pruned_total{what} summed over every service."""
        total: dict[str, float] = {}
        for port in list(self.metrics_ports.values()) + list(self.stores.values()):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                continue
            for what, value in re.findall(r'^retailbus_pruned_total\{what="([^"]+)"\} (\S+)$', text, re.M):
                total[what] = total.get(what, 0.0) + float(value)
        return total


def rss_and_fds(pid: int) -> tuple[float, int] | None:
    """(RSS in MiB, open file descriptors) of a live process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, AttributeError):
        return None


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False
