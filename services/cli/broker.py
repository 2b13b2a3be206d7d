"""`retailbus broker start|stop|status|uri`: the managed local RabbitMQ node.

The main CLI (services/cli/__init__.py) mounts this group with `main.add_command(broker)`.
`--config` may be given to the group or to each command (default config/bus.yaml);
if the main CLI put a `config` into `ctx.obj`, that is used when neither is given.
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from services.broker.node import AMQP_URI_ENV, BrokerError, ManagedBroker, mask_uri
from services.broker.cluster import BrokerCluster
from bus.settings import DEFAULT_CONFIG, ConfigError, load_config, retailbus_settings

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help=f"bus.yaml to read the RETAILBUS.broker section from (default {DEFAULT_CONFIG})")
nodes_option = click.option(
    "--nodes", type=click.IntRange(1, 9), default=None,
    help="N > 1: a local cluster of N nodes on ports port..port+N-1 (default RETAILBUS.broker.nodes)")


def _config_path(ctx: click.Context, given: Path | None) -> tuple[Path, bool]:
    """(path, explicit)."""
    if given is not None:
        return given, True
    obj = ctx.find_object(dict) or {}
    if obj.get("config"):
        return Path(obj["config"]), True
    return DEFAULT_CONFIG, False


def _managed(ctx: click.Context, given: Path | None, nodes: int | None = None) -> ManagedBroker | BrokerCluster:
    path, explicit = _config_path(ctx, given)
    try:
        if not explicit and not path.exists():
            settings = retailbus_settings({})  # no bus.yaml yet: defaults, root = cwd
        else:
            settings = retailbus_settings(load_config(path), path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if (nodes or settings.broker.nodes) > 1:
        return BrokerCluster.from_settings(settings, nodes=nodes)
    return ManagedBroker.from_settings(settings)


def _external() -> str | None:
    return os.environ.get(AMQP_URI_ENV, "").strip() or None


@click.group()
@config_option
@click.pass_context
def broker(ctx: click.Context, config_path: Path | None) -> None:
    """Run the local RabbitMQ node (state in RETAILBUS.broker.home, e.g. var/broker/)."""
    obj = ctx.ensure_object(dict)
    if config_path is not None:
        obj["config"] = str(config_path)


@broker.command()
@config_option
@nodes_option
@click.pass_context
def start(ctx: click.Context, config_path: Path | None, nodes: int | None) -> None:
    """Start the node or cluster (a no-op when it runs); first start creates its user."""
    ext = _external()
    if ext:
        click.echo(f"{AMQP_URI_ENV} is set: using the external broker {mask_uri(ext)}; "
                   "retailbus does not manage it, nothing started.")
        return
    b = _managed(ctx, config_path, nodes)
    if isinstance(b, BrokerCluster):
        click.echo(f"starting a cluster of {len(b.nodes)} RabbitMQ nodes in {b.home} ...")
        try:
            b.start()
        except BrokerError as exc:
            raise click.ClickException(str(exc)) from None
        for node in b.nodes:
            click.echo(f"  {node.node} (pid {node.pid()})")
        click.echo(f"cluster started: {b.uri(show_password=False)}")
        return
    was_running = b.is_running()
    if not was_running:
        click.echo(f"starting RabbitMQ node {b.node} in {b.home} ...")
    try:
        b.start()
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    state = "already running" if was_running else "started"
    click.echo(f"broker {state} (pid {b.pid()}): {b.uri(show_password=False)}")


@broker.command()
@config_option
@nodes_option
@click.pass_context
def stop(ctx: click.Context, config_path: Path | None, nodes: int | None) -> None:
    """Stop the node and wait for it to exit (a no-op when it is stopped)."""
    ext = _external()
    if ext:
        click.echo(f"{AMQP_URI_ENV} is set: the external broker {mask_uri(ext)} is not "
                   "managed by retailbus, nothing stopped.")
        return
    b = _managed(ctx, config_path, nodes)
    if isinstance(b, BrokerCluster):
        try:
            b.stop()
        except BrokerError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"cluster of {len(b.nodes)} nodes in {b.home} stopped")
        return
    if not b.is_running():
        click.echo(f"broker {b.node} is not running")
        return
    try:
        b.stop()
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"broker {b.node} stopped")


@broker.command()
@config_option
@nodes_option
@click.option("--show-password", is_flag=True, help="print the password instead of ***")
@click.pass_context
def uri(ctx: click.Context, config_path: Path | None, nodes: int | None, show_password: bool) -> None:
    """Print the AMQP URI of the bus (password masked unless --show-password)."""
    ext = _external()
    if ext:
        click.echo(ext if show_password else mask_uri(ext))
        return
    try:
        click.echo(_managed(ctx, config_path, nodes).uri(show_password=show_password))
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None


def queue_owner(name: str) -> str:
    """The service that consumes a queue, read from its name (bus/topology.py's scheme):
    `evt-<source>-<type>--<service>.<method>` with its `.retry.*`/`.dlq`, `rpc-<service>`,
    the agents' `routes.<store>` and `store_agent-<store>.*`."""
    if name.startswith("evt-") and "--" in name:
        return name.split("--", 1)[1].split(".", 1)[0]
    if name.startswith("rpc-"):
        return name[4:]
    if name.startswith(("routes.", "store_agent-")):
        return "store agents"
    return "other"


def _table(rows: list[dict]) -> list[str]:
    """Queues grouped by the service that consumes them, sorted by name within a group."""
    headers = ("queue", "messages", "consumers")
    groups: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["name"]):
        groups.setdefault(queue_owner(r["name"]), []).append(r)
    cells = [(r["name"], str(r["messages"]), str(r["consumers"])) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    fmt = f"    {{:<{widths[0]}}}  {{:>{widths[1]}}}  {{:>{widths[2]}}}"
    lines = [fmt.format(*headers)]
    for owner in sorted(groups, key=lambda g: ({"store agents": 1, "other": 2}.get(g, 0), g)):
        lines.append(f"  {owner}:")
        lines += [fmt.format(r["name"], r["messages"], r["consumers"]) for r in groups[owner]]
    return lines


@broker.command()
@config_option
@nodes_option
@click.pass_context
def status(ctx: click.Context, config_path: Path | None, nodes: int | None) -> None:
    """URI (masked), health and every queue with depth and consumers; exit 1 when down."""
    ext = _external()
    if ext:
        _external_status(ext)
        return
    b = _managed(ctx, config_path, nodes)
    if isinstance(b, BrokerCluster):
        _cluster_status(ctx, b)
        return
    try:
        click.echo(f"uri:     {b.uri(show_password=False)}")
    except BrokerError:
        click.echo("uri:     (not provisioned yet: run `retailbus broker start`)")
    click.echo(f"node:    {b.node}")
    click.echo(f"home:    {b.home}")
    pid = b.pid()
    if pid is None:
        click.echo("health:  not running")
        ctx.exit(1)
    try:
        version = b.version()
        queues = b.queues()
    except BrokerError as exc:
        click.echo(f"health:  process {pid} alive but not answering: {exc}")
        ctx.exit(1)
    click.echo(f"health:  running, pid {pid}, RabbitMQ {version}")
    click.echo(f"management: http://127.0.0.1:{b.management_port}/")
    click.echo(f"queues in vhost {b.vhost!r}: {len(queues)}")
    for line in _table(queues):
        click.echo(line)


def _cluster_status(ctx: click.Context, cluster: BrokerCluster) -> None:
    """Each node's pid and membership, then the queues with type and leader; exit 1
    when a node is down (the cluster may still serve: quorum queues need a majority)."""
    click.echo(f"home:    {cluster.home}")
    try:
        click.echo(f"uri:     {cluster.uri(show_password=False)}")
    except BrokerError:
        click.echo("uri:     (not provisioned yet: run `retailbus broker start --nodes N`)")
    try:
        members = cluster.running_members()
    except BrokerError as exc:
        members = []
        click.echo(f"cluster: not answering: {exc}")
    for node in cluster.nodes:
        pid = node.pid()
        state = ("running, in cluster" if node.node in members else "running") if pid else "not running"
        click.echo(f"node:    {node.node}  pid {pid or '-'}  {state}")
    down = len(cluster.nodes) - len(members)
    click.echo(f"health:  {len(members)} of {len(cluster.nodes)} nodes running"
               + (f", {down} down" if down else ""))
    if members:
        queues = cluster.queues()
        click.echo(f"queues in vhost {cluster.vhost!r}: {len(queues)}")
        for line in _table([{**q, "name": f"{q['name']} ({q['type']}, leader {q['leader'] or '-'})"}
                            for q in queues]):
            click.echo(line)
    if down:
        ctx.exit(1)


def _external_status(uri_: str) -> None:
    from kombu import Connection

    click.echo(f"uri:     {mask_uri(uri_)}")
    click.echo(f"external broker in use ({AMQP_URI_ENV}); retailbus does not manage it")
    try:
        with Connection(uri_, connect_timeout=5) as conn:
            conn.connect()
            props = conn.connection.server_properties or {}
            product = props.get("product", "AMQP broker")
            version = props.get("version", "?")
            if isinstance(product, bytes):
                product = product.decode()
            if isinstance(version, bytes):
                version = version.decode()
    except Exception as exc:  # any connection failure means: not healthy
        click.echo(f"health:  unreachable: {exc.__class__.__name__}: {exc}")
        raise click.exceptions.Exit(1) from None
    click.echo(f"health:  reachable, {product} {version}")
    click.echo("queues:  not listed for an external broker (use its management UI or rabbitmqctl)")


from services.cli.broker_users import users  # noqa: E402  (`retailbus broker users`)

broker.add_command(users)
