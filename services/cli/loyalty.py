"""`retailbus loyalty mode|history|exceptions`: the accrual mode and what ops must see.

`mode api` switches who earns the points of posted sales (file: the legacy points
file; api: the loyalty platform; shadow: the file, with the platform's figure
compared per sale) for the sales posted from a few seconds ahead, audited in
RETAILBUS.loyalty_audit (services/loyalty/switch.py); the running services pick it
up from config/loyalty.yaml without a restart.
"""
from __future__ import annotations

import getpass
from pathlib import Path

import click
from sqlalchemy import create_engine, select

from bus.settings import DEFAULT_CONFIG, ConfigError, load_config, retailbus_settings

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                             default=DEFAULT_CONFIG, show_default=True)


def _settings(config_path: Path):
    try:
        config = load_config(config_path)
        return config, retailbus_settings(config, config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def loyalty():
    """The loyalty platform's side of the bus: accrual mode, exceptions."""


@loyalty.command()
@click.argument("mode", required=False, type=click.Choice(["file", "api", "shadow"]))
@click.option("--reason", help="why: recorded in the audit file")
@click.option("--user", default=getpass.getuser, show_default="the OS user",
              help="who does this: recorded beside the account the command runs as")
@click.option("--lead", default=5.0, show_default=True, type=click.FloatRange(min=1, max=3600),
              help="seconds ahead the new mode starts (every service must have read the file by then)")
@config_option
def mode(mode, reason, user, lead, config_path):
    """Show the accrual mode, or switch it to MODE (file, api or shadow)."""
    from services.loyalty.rules import LoyaltyConfigError, load
    from services.loyalty.switch import SwitchRefusedError, switch_mode

    _, settings = _settings(config_path)
    rules = settings.path(settings.loyalty_rules)
    if mode is None:
        try:
            accrual = load(rules).accrual
        except LoyaltyConfigError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"accrual mode {accrual.mode} since {accrual.since.isoformat() if accrual.since else 'the start'}")
        for earlier in accrual.before:
            click.echo(f"  before: {earlier.mode} since {earlier.since.isoformat() if earlier.since else 'the start'}")
        return
    if not reason:
        raise click.UsageError("--reason is required to switch the mode (it goes into the audit file)")
    try:
        done = switch_mode(rules, settings.path(settings.loyalty_audit), mode, reason, user, lead)
    except SwitchRefusedError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"accrual mode {done.before.mode} -> {done.after.mode} for sales posted from "
               f"{done.after.since.isoformat()}; audit: {settings.path(settings.loyalty_audit)}")


@loyalty.command()
@config_option
def history(config_path):
    """Every accrual mode switch: when, who, before -> after, why."""
    from services.loyalty.switch import history as switches

    _, settings = _settings(config_path)
    for r in switches(settings.path(settings.loyalty_audit)):
        click.echo(f"{r['time']}  {r['user']} ({r['os_user']})  {r['before']['mode']} -> {r['after']['mode']} "
                   f"from {r['after']['since']}  {r.get('reason') or ''}")


@loyalty.command()
@click.option("--kind", help="shadow_mismatch, over_redemption, reversal_refused (default: all)")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@config_option
def exceptions(kind, limit, config_path):
    """What the loyalty service recorded for ops, newest first (shadow mismatches with both sides);
    over-redemptions and refused reversals are also cases (`retailbus cases`)."""
    from services.loyalty.tables import EXCEPTIONS

    config, settings = _settings(config_path)
    dsn = settings.absolute_dsn(str(config.get("LOYALTY_DB_URI") or ""))
    if not dsn:
        raise click.ClickException("LOYALTY_DB_URI: not set")
    if dsn.startswith("sqlite:///") and not Path(dsn[len("sqlite:///"):]).exists():
        raise click.ClickException(f"LOYALTY_DB_URI: no loyalty database at {dsn[len('sqlite:///'):]}")
    engine = create_engine(dsn)
    c = EXCEPTIONS.c
    query = select(EXCEPTIONS).order_by(c.CREATED_AT.desc()).limit(limit)
    if kind:
        query = query.where(c.KIND == kind)
    try:
        with engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
    finally:
        engine.dispose()
    for r in rows:
        click.echo(f"{r['CREATED_AT'][:19]}  {r['KIND']:<16} {r['STORE_ID']}/{r['POS_TXN_ID']}  card {r['CARD']}  "
                   f"{r['DETAIL']}")
    click.echo(f"{len(rows)} exception(s)")
    if any(r["KIND"] in ("over_redemption", "reversal_refused") for r in rows):
        click.echo("over_redemption and reversal_refused are worked as cases: "
                   "retailbus cases list --type loyalty_over_redemption (or loyalty_reversal_refused)")
