"""`retailbus broker users [--show] [--dry-run]`: one least-privilege broker user per
component of the config (services/broker/users.py), created on the managed broker.

Passwords stay in their 0600 files; `--show` prints each component's AMQP URI
with its password (for running a component by hand), nothing else ever does.
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from services.broker import credentials, users as broker_users
from services.broker.node import AMQP_URI_ENV, BrokerError, ManagedBroker, resolve_amqp_uri
from bus.settings import DEFAULT_CONFIG, ConfigError, load_config, retailbus_settings


def managed_broker(settings) -> ManagedBroker:
    """The node to run rabbitmqctl against (any node of a local cluster will do)."""
    if settings.broker.nodes > 1:
        from services.broker.cluster import BrokerCluster

        return BrokerCluster.from_settings(settings).nodes[0]
    return ManagedBroker.from_settings(settings)


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"bus.yaml with RETAILBUS.services and RETAILBUS.stores (default {DEFAULT_CONFIG})")
@click.option("--show", is_flag=True, help="also print each component's AMQP URI with its password")
@click.option("--dry-run", is_flag=True, help="print the users and permissions, change nothing")
@click.pass_context
def users(ctx: click.Context, config_path: Path | None, show: bool, dry_run: bool) -> None:
    """Create or update one broker user per service and store (no tags, own resources only)."""
    path = config_path or Path((ctx.find_object(dict) or {}).get("config") or DEFAULT_CONFIG)
    try:
        config = load_config(path)
        settings = retailbus_settings(config, path)
        found = broker_users.components(settings, config)
    except (ConfigError, ImportError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for c in found:
        configure, write, read = c.access.permissions()
        click.echo(f"{c.name}: user {c.user} ({c.credentials})")
        click.echo(f"  configure {configure}\n  write     {write}\n  read      {read}")
        for exchange, (tw, tr) in c.access.topic_permissions().items():
            click.echo(f"  topic {exchange}: write {tw} read {tr}")
        for name in c.unknown:
            click.echo(f"warning: {c.name}: {name} uses the broker in a way not derived here; "
                       f"grant it with RETAILBUS.broker.access.{c.name}", err=True)
    if dry_run:
        return
    if os.environ.get(AMQP_URI_ENV, "").strip() or str(config.get("AMQP_URI") or "").strip():
        raise click.ClickException(
            "users are created on the managed broker only (an external one is configured): "
            "give them the permissions printed above with your broker's own tooling")
    broker = managed_broker(settings)
    try:
        if not broker.is_running():
            raise BrokerError(f"broker {broker.node} is not running: `retailbus broker start` first")
        credentials.provision(broker, found)
        bus_uri = resolve_amqp_uri(config, settings)
        declared = broker_users.declare_topology(bus_uri, found, settings.queue_type)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{len(found)} users provisioned on {broker.node} (vhost {broker.vhost!r}), none tagged; "
               f"{declared} exchanges and queues declared for them")
    if show:
        for c in found:
            click.echo(f"{c.name}: {credentials.component_uri(bus_uri, c)}")
