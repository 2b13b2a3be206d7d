"""Shared pieces of the file-drop integration tests: a config in a temp root, a tap
queue that sees every chunk the files service publishes, and queue helpers."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import amqp
import yaml

from bus import topology
from bus.publisher import connection_params

SHIPPED = Path(__file__).parents[2] / "config" / "filedrops.yaml"


def write_drops(root: Path, **overrides) -> dict:
    """The shipped filedrops.yaml with folders under `root`; `overrides` per inbound drop."""
    cfg = yaml.safe_load(SHIPPED.read_text())
    cfg["ledger"] = str(root / "var" / "filedrops.db")
    for name, drop in cfg["inbound"].items():
        drop["folder"] = str(root / "drops" / name)
        drop["poll_seconds"] = 0.1
        drop.update(overrides.get(name, {}))
    for name, drop in cfg["outbound"].items():
        drop["folder"] = str(root / "drops" / name)
        drop.update(overrides.get(name, {}))
    path = root / "config" / "filedrops.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def service_config(amqp_uri: str, root: Path, **extra) -> dict:
    return {"AMQP_URI": amqp_uri, "max_workers": 16, "RETAILBUS": {"root": str(root)}, **extra}


class Tap:
    """A queue bound to files.events event.batch.v1: every chunk published lands here."""

    def __init__(self, uri: str, name: str):
        self.uri, self.queue = uri, name
        with self._channel() as channel:
            topology.declare_exchange(channel, "files.events")
            channel.queue_declare(name, durable=True, auto_delete=False)
            channel.queue_purge(name)
            channel.queue_bind(name, "files.events", "event.batch.v1")
        self.keys: list[str] = []
        self.chunks: list[dict] = []

    @contextlib.contextmanager
    def _channel(self):
        """A fresh connection per use: an idle one would miss its heartbeats."""
        conn = amqp.Connection(**connection_params(self.uri, 5))
        conn.connect()
        try:
            yield conn.channel()
        finally:
            conn.collect()

    def drain(self) -> list[str]:
        with self._channel() as channel:
            while True:
                msg = channel.basic_get(self.queue, no_ack=True)
                if msg is None:
                    return self.keys
                data = json.loads(msg.body)["data"]
                self.chunks.append(data)
                self.keys.extend(item["idempotencykey"] for item in data["items"])

    def close(self):
        with self._channel() as channel:
            channel.queue_delete(self.queue)
