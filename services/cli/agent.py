"""`retailbus agent status|keys add|broker-user`: the store agents, for ops.

`status` reads `/healthz` of every configured agent (or one) and prints a
table; an agent that does not answer is shown as `down`, and the command
exits 1 so scripts notice. `keys add` provisions a POS terminal's key
(printed once; stored 0600 beside the store's outbox). `broker-user`
gives the store its own least-privilege broker user on the managed node.
"""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import click

from bus.settings import DEFAULT_CONFIG, ConfigError, load_config, retailbus_settings

COLUMNS = (("store", 6), ("status", 7), ("outbox_depth", 12), ("oldest_unsent_seconds", 21),
           ("breaker_state", 13), ("broker_connected", 16), ("route_table_version", 19),
           ("last_confirm_time", 32))

config_option = click.option("--config", "config_path", default=str(DEFAULT_CONFIG), show_default=True,
                             type=click.Path(dir_okay=False))


def _settings(config_path: str):
    try:
        return retailbus_settings(load_config(config_path), config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _store(settings, store_id: str):
    store = next((s for s in settings.stores if s.id == store_id), None)
    if store is None:
        known = ", ".join(s.id for s in settings.stores) or "none"
        raise click.ClickException(f"--store: {store_id!r} is not in RETAILBUS.stores (known: {known})")
    return store


def health(address: str, timeout: float = 2.0) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None


@click.group()
def agent():
    """The store agents."""


@agent.command()
@config_option
@click.option("--store", "store_id", default=None, help="only this store")
def status(config_path, store_id):
    """Outbox depth, oldest unsent age, breaker and broker state of each store agent."""
    settings = _settings(config_path)
    stores = [_store(settings, store_id)] if store_id else list(settings.stores)
    click.echo("  ".join(name.upper().ljust(width) for name, width in COLUMNS))
    down = 0
    for store in stores:
        row = health(store.http) or {"store": store.id, "status": "down"}
        down += row["status"] != "ok"
        click.echo("  ".join(str(row.get(name, "-") if row.get(name) is not None else "-").ljust(width)
                             for name, width in COLUMNS))
    sys.exit(1 if down else 0)


@agent.group()
def keys():
    """POS terminal keys (HMAC-SHA256, see routing/edge_auth.py)."""


@keys.command("add")
@config_option
@click.option("--store", "store_id", required=True)
@click.option("--terminal", required=True)
@click.option("--rotate", is_flag=True, help="replace the terminal's existing key (the till must get the new one)")
def keys_add(config_path, store_id, terminal, rotate):
    """Generate TERMINAL's key and print it once. A terminal that has a key keeps it
    unless --rotate: replacing it locks the till out until it is given the new key."""
    from routing.edge_auth import TerminalKeys

    settings = _settings(config_path)
    path = settings.outbox_path(_store(settings, store_id)).parent / "terminal_keys.json"
    keys_file = TerminalKeys(Path(path))
    if not rotate and keys_file.get(terminal) is not None:
        raise click.ClickException(
            f"terminal {terminal} of store {store_id} already has a key (in {path}); replacing it locks "
            "that till out until it gets the new one: add --rotate to replace it")
    try:
        key = keys_file.add(terminal)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(key)
    click.echo(f"stored in {path} (configure it on terminal {terminal}; it is not shown again)", err=True)


@agent.command("broker-user")
@config_option
@click.option("--store", "store_id", required=True)
def broker_user(config_path, store_id):
    """Create the store's own broker user (publish `pos.*` to store_agent.events only)."""
    from routing import broker_user as users
    from services.broker.node import BrokerError, ManagedBroker

    settings = _settings(config_path)
    store = _store(settings, store_id)
    try:
        user = users.provision(ManagedBroker.from_settings(settings), store.id,
                               users.credentials_path(settings.outbox_path(store)))
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"broker user {user} ready; restart store {store.id}'s agent to use it")
