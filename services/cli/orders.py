"""`retailbus orders keys add --client ID [--rotate]`: an ecommerce client's signing key.

The experience API (services/orders/api.py) verifies every call with the key of the
client named in `X-Retailbus-Terminal`, as a store agent verifies its tills'; the keys
live in `api.clients_file` of config/orders.yaml (mode 0600, never in git) and are read
again when the file changes, so a new client needs no restart.
"""
from __future__ import annotations

import click

from bus.settings import DEFAULT_CONFIG, ConfigError, load_config, retailbus_settings

config_option = click.option("--config", "config_path", default=str(DEFAULT_CONFIG), show_default=True,
                             type=click.Path(dir_okay=False))


@click.group()
def orders():
    """Click and collect: the experience API's clients."""


@orders.group()
def keys():
    """Ecommerce clients' keys (HMAC-SHA256, as tills sign: routing/edge_auth.py)."""


@keys.command("add")
@config_option
@click.option("--client", required=True, help="the client's id, 1-8 letters or digits (e.g. WEB)")
@click.option("--rotate", is_flag=True, help="replace the client's existing key (the client must get the new one)")
def keys_add(config_path, client, rotate):
    """Generate CLIENT's key and print it once. A client that has a key keeps it unless --rotate."""
    from routing.edge_auth import TerminalKeys
    from services.orders.config import load

    try:
        settings = retailbus_settings(load_config(config_path), config_path)
        path = settings.path(load(settings.path(settings.orders_rules)).api.clients_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    keys_file = TerminalKeys(path)
    if not rotate and keys_file.get(client) is not None:
        raise click.ClickException(f"client {client} already has a key (in {path}); replacing it locks the client "
                                   "out until it gets the new one: add --rotate to replace it")
    try:
        key = keys_file.add(client)
    except ValueError as exc:
        raise click.ClickException(str(exc).replace("terminal", "client")) from None
    click.echo(key)
    click.echo(f"stored in {path} (configure it on client {client}; it is not shown again)", err=True)
