"""The managed local broker: a RabbitMQ node from the system's rabbitmq-server
package, with all its state (database, logs, config, pid file, Erlang cookie)
in one project-local folder, on non-default ports, with its own user.

`retailbus broker start|stop|status` drive it (services/cli/broker.py); tests
start throw-away nodes in temporary folders (tests/conftest.py).

Notes on the Debian package (3.10): `rabbitmq-server` is a shell script that
runs `erl` in the background and waits for it (it only execs when run under
systemd), so the process we spawn is a `sh` wrapper and the node's OS process
(beam.smp) is its child. The node writes its own pid to RABBITMQ_PID_FILE,
which is what `pid()`, `stop()` and `kill()` use. All nodes on the machine
share one epmd; it is left running.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from services.broker.setup import (
    RABBITMQ_BIN,
    BrokerError,
    Credentials,
    Layout,
    create_credentials,
    free_ports,
    load_credentials,
    port_in_use,
    prepare_home,
    process_alive,
    process_cmdline,
    render_config,
    tail,
    write_private,
)

from bus.broker_uri import AMQP_URI_ENV, mask_uri, node_credentials, node_uri, resolve_amqp_uri  # noqa: F401  (re-exported)

__all__ = ["ManagedBroker", "BrokerError", "resolve_amqp_uri", "mask_uri", "AMQP_URI_ENV"]

log = logging.getLogger(__name__)

PERMS = (".*", ".*", ".*")


class ManagedBroker:
    """One RabbitMQ node living in `home`. Methods are idempotent where it makes sense:
    `start()` on a running node and `stop()` on a stopped one do nothing.
    `tls` (RETAILBUS.broker.tls with absolute paths) adds an AMQPS listener."""

    tls = None

    def __init__(self, home: Path, port: int, dist_port: int, management_port: int,
                 vhost: str = "retailbus", user: str = "retailbus", start_timeout: float = 90.0):
        self.home = Path(home).absolute()
        self.layout = Layout(self.home)
        self.port = int(port)
        self.dist_port = int(dist_port)
        self.management_port = int(management_port)
        self.vhost = vhost
        self.user = user
        self.start_timeout = start_timeout
        self.node = f"retailbus-{self.port}@localhost"
        self._proc: subprocess.Popen | None = None

    @classmethod
    def from_settings(cls, settings, **kwargs) -> ManagedBroker:
        b = settings.broker
        broker = cls(settings.path(b.home), port=b.port, dist_port=b.dist_port,
                     management_port=b.management_port, vhost=b.vhost, user=b.user, **kwargs)
        if b.tls is not None:
            broker.tls = b.tls.model_copy(update={
                k: settings.path(getattr(b.tls, k)).absolute() for k in ("certfile", "keyfile", "cacertfile")})
        return broker

    def __repr__(self) -> str:
        return f"ManagedBroker(node={self.node!r}, home={str(self.home)!r})"

    # ------------------------------------------------------------------ environment
    def _env(self) -> dict[str, str]:
        """The environment of the node and of every CLI call: nothing inherited that
        could point the scripts at another node or at /etc/rabbitmq."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_")) and k not in ("HOME", "NOTIFY_SOCKET")}
        lay = self.layout
        env.update({
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(lay.mnesia_base),
            "RABBITMQ_LOG_BASE": str(lay.log_base),
            "RABBITMQ_CONFIG_FILE": str(lay.config_file),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(lay.advanced_config),
            "RABBITMQ_CONF_ENV_FILE": str(lay.env_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(lay.plugins_file),
            "RABBITMQ_PID_FILE": str(lay.pid_file),
            # Erlang distribution (used by rabbitmqctl) only on loopback
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            # the CLI's own distribution port: the default range has 11 ports, too few
            # when several nodes and test runs share the machine
            "RABBITMQ_CTL_DIST_PORT_MIN": "35672",
            "RABBITMQ_CTL_DIST_PORT_MAX": "35972",
            "ERL_CRASH_DUMP": str(lay.log_base / "erl_crash.dump"),
        })
        return env

    def rabbitmqctl(self, *args: str, input: str | None = None, timeout: float = 60.0) -> str:
        """Run `rabbitmqctl -n NODE ARGS` against this node only; stdout on success,
        BrokerError with stderr otherwise. Secrets go through `input`, never args."""
        cmd = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args]
        try:
            res = subprocess.run(cmd, env=self._env(), cwd=self.home if self.home.is_dir() else None,
                                 input=input, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BrokerError(f"rabbitmqctl {args[0] if args else ''} on {self.node}: "
                              f"no answer within {timeout:g}s") from None
        except FileNotFoundError:
            raise BrokerError(f"{cmd[0]} not found: install the rabbitmq-server package") from None
        if res.returncode != 0:
            msg = (res.stderr.strip() or res.stdout.strip() or "(no output)")
            raise BrokerError(f"rabbitmqctl {' '.join(args)} on {self.node} failed "
                              f"(exit {res.returncode}): {msg}")
        return res.stdout

    # ------------------------------------------------------------------ state
    def pid(self) -> int | None:
        """The OS pid of this node's beam process, if it is alive."""
        try:
            pid = int(self.layout.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not process_alive(pid):
            return None
        cmd = process_cmdline(pid)
        if cmd and ("beam" not in cmd or str(self.home) not in cmd):
            return None  # a stale pid file whose number was reused by another process
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def credentials(self) -> Credentials:
        return node_credentials(self.home)

    def uri(self, show_password: bool = True) -> str:
        return node_uri(self.home, self.port, self.vhost, show_password)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the node (or wait for one that is booting); a no-op when it runs."""
        deadline = time.monotonic() + self.start_timeout
        if self.is_running():
            self._await_startup(deadline)
            return
        self._reap()
        for name, port in (("AMQP", self.port), ("distribution", self.dist_port),
                           ("management", self.management_port), ("AMQPS", self.tls and self.tls.port)):
            if not port:
                continue
            if port_in_use(port):
                raise BrokerError(f"cannot start {self.node}: {name} port {port} is already in use "
                                  "by another process (choose another port in config/bus.yaml)")
        prepare_home(self.layout)
        creds = load_credentials(self.layout.credentials)
        new_creds = creds is None
        if new_creds:
            creds = create_credentials(self.layout, self.user)
        elif creds.user != self.user:
            raise BrokerError(f"{self.layout.credentials} is for user {creds.user!r}, "
                              f"configured user is {self.user!r}; remove the file to re-provision")
        fresh = not self.layout.data_dir(self.node).exists()
        write_private(self.layout.config_file, render_config(
            self.port, self.management_port, self.vhost, bootstrap=creds if fresh else None, tls=self.tls))
        try:
            self._launch()
            self._await_startup(deadline)
        except BaseException:
            self._abort()
            raise
        finally:
            if fresh:  # the bootstrap password does not stay in rabbitmq.conf
                write_private(self.layout.config_file,
                              render_config(self.port, self.management_port, self.vhost, tls=self.tls))
        self._provision(creds, set_password=new_creds and not fresh)
        log.info("broker %s started (pid %s) at %s", self.node, self.pid(), self.uri(show_password=False))

    def _launch(self) -> None:
        try:
            self.layout.pid_file.unlink()  # stale after a kill; we wait for the new one
        except FileNotFoundError:
            pass
        out = open(self.layout.stdout_log, "ab")
        try:
            self._proc = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")], env=self._env(), cwd=self.home,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True)
        except FileNotFoundError:
            raise BrokerError(f"{RABBITMQ_BIN / 'rabbitmq-server'} not found: "
                              "install the rabbitmq-server package") from None
        finally:
            out.close()

    def _await_startup(self, deadline: float) -> None:
        """Wait until the rabbit application runs. `await_startup` fails at once while
        the node is not yet registered with epmd, so retry until the deadline."""
        last = ""
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(self._failure(f"exited while starting (exit status {self._proc.returncode})"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(self._failure(f"did not start within {self.start_timeout:g}s ({last})"))
            if self.layout.pid_file.exists():
                try:
                    self.rabbitmqctl("await_startup", "--timeout", str(max(1, int(remaining))),
                                     timeout=remaining + 15)
                    return
                except BrokerError as exc:
                    last = str(exc).splitlines()[0]
            time.sleep(0.3)

    def _failure(self, what: str) -> str:
        node_log = self.layout.log_base / f"{self.node}.log"
        parts = [f"RabbitMQ node {self.node} {what}."]
        for path in (self.layout.stdout_log, node_log):
            text = tail(path, 25)
            if text:
                parts.append(f"--- last lines of {path} ---\n{text}")
        return "\n".join(parts)

    def _abort(self) -> None:
        """Failed start: leave nothing running behind."""
        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait_gone(pid, 15)
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)  # its own session, started by us
            except ProcessLookupError:
                pass
        self._reap()

    def _provision(self, creds: Credentials, set_password: bool) -> None:
        """Idempotently: our user with our password, our vhost, full rights on it, no
        tags, and no guest. One definitions export tells us what is missing."""
        defs = json.loads(self.rabbitmqctl("-q", "export_definitions", "-", "--format", "json"))
        users = {u["name"]: u for u in defs.get("users", [])}
        user = users.get(creds.user)
        if user is None:
            self.rabbitmqctl("add_user", creds.user, input=creds.password + "\n")
        elif set_password:
            self.rabbitmqctl("change_password", creds.user, input=creds.password + "\n")
        if user is not None and user.get("tags"):
            self.rabbitmqctl("set_user_tags", creds.user)  # no tags: rabbitmqctl serves status
        if self.vhost not in {v["name"] for v in defs.get("vhosts", [])}:
            self.rabbitmqctl("add_vhost", self.vhost)
        has_perms = any(p["user"] == creds.user and p["vhost"] == self.vhost
                        and (p["configure"], p["write"], p["read"]) == PERMS
                        for p in defs.get("permissions", []))
        if user is None or not has_perms:
            self.rabbitmqctl("set_permissions", "-p", self.vhost, creds.user, *PERMS)
        if "guest" in users and creds.user != "guest":
            self.rabbitmqctl("delete_user", "guest")

    def ensure_user(self, user: str, password: str, configure: str, write: str, read: str,
                    topic_exchange: str | None = None, topic_write: str | None = None) -> None:
        """A least-privilege user on our vhost (e.g. a store agent's): created, or given
        this password, with exactly these permissions. `topic_write` limits the routing
        keys it may publish to `topic_exchange`. The password goes on stdin."""
        if user in self.users():
            self.rabbitmqctl("change_password", user, input=password + "\n")
        else:
            self.rabbitmqctl("add_user", user, input=password + "\n")
        self.rabbitmqctl("set_permissions", "-p", self.vhost, user, configure, write, read)
        if topic_exchange and topic_write:
            self.rabbitmqctl("set_topic_permissions", "-p", self.vhost, user, topic_exchange, topic_write, "^$")

    def stop(self, timeout: float = 60.0) -> None:
        """Stop this node only and wait for its process to exit; no-op when stopped."""
        pid = self.pid()
        if pid is None:
            self._reap()
            return
        try:
            # with the pid file, rabbitmqctl waits until the OS process has exited
            self.rabbitmqctl("stop", str(self.layout.pid_file), timeout=timeout)
        except BrokerError as exc:
            log.warning("rabbitmqctl stop failed (%s); sending SIGTERM to %s", exc, pid)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not self._wait_gone(pid, timeout):
            raise BrokerError(f"RabbitMQ node {self.node} (pid {pid}) still running {timeout:g}s after stop")
        self._reap()
        log.info("broker %s stopped", self.node)

    def kill(self, timeout: float = 30.0) -> None:
        """SIGKILL the node's beam process (chaos tests) and wait until it is gone."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not self._wait_gone(pid, timeout):
            raise BrokerError(f"RabbitMQ node {self.node} (pid {pid}) survived SIGKILL")
        self._reap()

    @staticmethod
    def _wait_gone(pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while process_alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _reap(self) -> None:
        """Collect our `sh` wrapper once the node has gone, so no zombie is left."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                return
            self._proc = None

    # ------------------------------------------------------------------ inspection
    def queues(self) -> list[dict]:
        out = self.rabbitmqctl("-q", "list_queues", "-p", self.vhost, "name", "messages", "consumers",
                               "--formatter", "json")
        rows = json.loads(out or "[]")
        return [{"name": r["name"], "messages": int(r.get("messages") or 0),
                 "consumers": int(r.get("consumers") or 0)} for r in rows]

    def users(self) -> list[str]:
        rows = json.loads(self.rabbitmqctl("-q", "list_users", "--formatter", "json") or "[]")
        return [r["user"] for r in rows]

    def version(self) -> str:
        status = json.loads(self.rabbitmqctl("-q", "status", "--formatter", "json"))
        return str(status.get("rabbitmq_version", "?"))


PORT_CLASH = ("already in use", "already_used", "eaddrinuse")


def start_on_free_ports(home: Path, attempts: int = 3) -> ManagedBroker:
    """A started node in `home` on free ports (tests, benchmarks, demos); retries on new
    ports when one was taken between our check and the node's bind (ephemeral ports race)."""
    for attempt in range(attempts):
        port, dist_port, management_port = free_ports(3)
        broker = ManagedBroker(home, port=port, dist_port=dist_port, management_port=management_port)
        try:
            broker.start()
            return broker
        except BrokerError as exc:
            if attempt == attempts - 1 or not any(s in str(exc).lower() for s in PORT_CLASH):
                raise
    raise AssertionError("unreachable")
