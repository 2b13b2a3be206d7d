"""A local RabbitMQ cluster of N `ManagedBroker` nodes, for tests and demos
(`retailbus broker start --nodes 3`); production clusters are run by ops and
reached through RETAILBUS_AMQP_URI (README, "Running on a RabbitMQ cluster").

Each node lives in `<home>/node<i>` with its own name, ports, database and
logs; they share one Erlang cookie (the cluster's secret, `<home>/.erlang.cookie`)
and one set of credentials. Node 1 starts first and creates the user and the
vhost; nodes 2..N are reset and joined to it once, after which the cluster
holds one user database. A stopped cluster is restarted all at once: a node
that was not the last to stop waits for its peers before it boots.

nameko's own RPC queues are classic queues declared by nameko; a policy mirrors
them on every node (`ha-mode: all`), so an RPC service survives the loss of the
node that created its queue. Everything retailbus declares follows
RETAILBUS.queue_type (quorum on a cluster).
"""
from __future__ import annotations

import json
import logging
import secrets
import string
import threading
from pathlib import Path

from services.broker.node import ManagedBroker
from bus.broker_uri import cluster_home, cluster_node_home
from services.broker.setup import BrokerError, free_ports, write_private

log = logging.getLogger(__name__)

RPC_MIRROR_POLICY = ("retailbus-rpc-mirror", "^rpc-", '{"ha-mode":"all","ha-sync-mode":"automatic"}')


class BrokerCluster:
    """N nodes joined into one cluster; node i uses the i-th (port, dist, management) triple."""

    def __init__(self, home: Path, ports: list[tuple[int, int, int]], vhost: str = "retailbus",
                 user: str = "retailbus", start_timeout: float = 120.0):
        if len(ports) < 2:
            raise BrokerError("a cluster needs at least 2 nodes (use ManagedBroker for one)")
        self.home = Path(home).absolute()
        self.vhost = vhost
        self.nodes = [ManagedBroker(cluster_node_home(self.home, i), port=p, dist_port=d, management_port=m,
                                    vhost=vhost, user=user, start_timeout=start_timeout)
                      for i, (p, d, m) in enumerate(ports, start=1)]

    @classmethod
    def from_settings(cls, settings, nodes: int | None = None, **kwargs) -> BrokerCluster:
        """Node i on the configured ports + i - 1, in `cluster_home(settings)`."""
        b = settings.broker
        n = nodes or b.nodes
        ports = [(b.port + i, b.dist_port + i, b.management_port + i) for i in range(n)]
        return cls(cluster_home(settings), ports, vhost=b.vhost, user=b.user, **kwargs)

    @classmethod
    def on_free_ports(cls, home: Path, nodes: int = 3, **kwargs) -> BrokerCluster:
        """A cluster (not started) on 3 × `nodes` ports free right now (tests)."""
        ports = free_ports(3 * nodes)
        return cls(home, [tuple(ports[3 * i:3 * i + 3]) for i in range(nodes)], **kwargs)

    def __repr__(self) -> str:
        return f"BrokerCluster(nodes={[n.node for n in self.nodes]!r}, home={str(self.home)!r})"

    @property
    def first(self) -> ManagedBroker:
        return self.nodes[0]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start every node and form the cluster; a no-op for nodes that run."""
        self._share_cookie()
        if not self.first.layout.data_dir(self.first.node).exists():
            self.first.start()  # a new cluster: node 1 provisions the user and vhost
        self._share_credentials()
        self._in_parallel(lambda node: node.start())
        for node in self.nodes[1:]:
            if self.first.node not in self.members(node):
                self._join(node)
        self.first.rabbitmqctl("set_policy", "-p", self.vhost, "--apply-to", "queues",
                               *RPC_MIRROR_POLICY)
        log.info("cluster of %d nodes running: %s", len(self.nodes), self.uri(show_password=False))

    def stop(self, timeout: float = 60.0) -> None:
        """Stop every node, node N first, node 1 last; SIGKILL one that does not stop."""
        errors = []
        for node in reversed(self.nodes):
            try:
                node.stop(timeout=timeout)
            except BrokerError as exc:
                errors.append(str(exc))
                node.kill()
        if errors:
            raise BrokerError("; ".join(errors))

    def kill(self) -> None:
        """SIGKILL every node by its own pid (cleanup after a failed test)."""
        for node in self.nodes:
            node.kill()

    def _share_cookie(self) -> None:
        """One cookie for all nodes and their CLI calls, made once for the cluster."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            write_private(cookie, "".join(secrets.choice(string.ascii_uppercase) for _ in range(32)), 0o400)
        secret = cookie.read_text()
        for node in self.nodes:
            node.home.mkdir(parents=True, exist_ok=True)
            node.home.chmod(0o700)
            mine = node.layout.cookie
            if not mine.exists() or mine.read_text() != secret:
                write_private(mine, secret, 0o400)

    def _share_credentials(self) -> None:
        """Nodes 2..N boot with node 1's user, so the cluster has one password."""
        text = self.first.layout.credentials.read_text()
        for node in self.nodes[1:]:
            path = node.layout.credentials
            if not path.exists() or path.read_text() != text:
                write_private(path, text)

    def _join(self, node: ManagedBroker) -> None:
        """Reset `node` (its standalone database) and join it to node 1."""
        log.info("joining %s to %s", node.node, self.first.node)
        node.rabbitmqctl("stop_app")
        node.rabbitmqctl("reset")
        node.rabbitmqctl("join_cluster", self.first.node, timeout=120)
        node.rabbitmqctl("start_app", timeout=120)
        node.rabbitmqctl("await_startup", timeout=120)

    def _in_parallel(self, action) -> None:
        """Run `action(node)` for every node at once; the first failure is raised."""
        errors: list[BaseException] = []

        def run(node):
            try:
                action(node)
            except BaseException as exc:  # reported below, after every node has finished
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(node,), daemon=True) for node in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ state
    def running(self) -> list[ManagedBroker]:
        return [node for node in self.nodes if node.is_running()]

    def is_running(self) -> bool:
        return bool(self.running())

    def members(self, via: ManagedBroker | None = None) -> list[str]:
        """Names of the nodes `via` (default: the first running node) knows as members."""
        via = via or next(iter(self.running()), None)
        if via is None:
            return []
        status = json.loads(via.rabbitmqctl("-q", "cluster_status", "--formatter", "json"))
        return sorted(set(status.get("disk_nodes", [])) | set(status.get("ram_nodes", [])))

    def running_members(self) -> list[str]:
        via = next(iter(self.running()), None)
        if via is None:
            return []
        status = json.loads(via.rabbitmqctl("-q", "cluster_status", "--formatter", "json"))
        return sorted(status.get("running_nodes", []))

    def uri(self, show_password: bool = True) -> str:
        """Every node's URI joined by `;`: kombu's failover form, and retailbus's."""
        return ";".join(node.uri(show_password=show_password) for node in self.nodes)

    def queues(self) -> list[dict]:
        """Every queue of our vhost with its type and (quorum) leader, from a running node."""
        via = next(iter(self.running()), None)
        if via is None:
            raise BrokerError("no node of the cluster is running")
        out = via.rabbitmqctl("-q", "list_queues", "-p", self.vhost, "name", "type", "leader",
                              "messages", "consumers", "--formatter", "json")
        return [{"name": r["name"], "type": r.get("type", ""), "leader": r.get("leader") or "",
                 "messages": int(r.get("messages") or 0), "consumers": int(r.get("consumers") or 0)}
                for r in json.loads(out or "[]")]

    def node_named(self, name: str) -> ManagedBroker:
        return next(node for node in self.nodes if node.node == name)
