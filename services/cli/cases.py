"""`retailbus cases list|show|assign|retry|resolve`: work the business exceptions.

Reading (`list`, `show`) reads the cases database directly, as `trace` and
`loyalty exceptions` read theirs: ops see the cases while the service or the bus
is down. Changing (`assign`, `resolve`, `retry`) asks the cases service over the
bus (nameko RPC), the one writer of that database: it checks the change against
the case's state, commits it with its history line (the OS user running this
command) and answers only then. A request the service did not take within
RETAILBUS.cases.rpc_timeout expires in its queue, so it is never applied after
this command said it failed.
"""
from __future__ import annotations

import getpass
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import click

from bus.settings import DEFAULT_CONFIG, ConfigError, load_config, retailbus_settings

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                             default=DEFAULT_CONFIG, show_default=True)
json_option = click.option("--json", "as_json", is_flag=True, help="JSON instead of text")
SERVICE = "cases"
REFUSALS = ("CaseNotFoundError", "CaseRefusedError")


def _settings(config_path: Path):
    try:
        config = load_config(config_path)
        return config, retailbus_settings(config, config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _read(config_path: Path, read):
    """`read(conn)` on the cases database, read only."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    _, settings = _settings(config_path)
    dsn = settings.absolute_dsn(settings.cases.dsn)
    if dsn.startswith("sqlite:///") and not Path(dsn.removeprefix("sqlite:///")).exists():
        raise click.ClickException(f"no cases database at {dsn.removeprefix('sqlite:///')} "
                                   "(the cases service creates it: is it running?)")
    engine = create_engine(dsn)
    try:
        with engine.connect() as conn:
            return read(conn)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"cannot read the cases database {engine.url!r}: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    finally:
        engine.dispose()


def _call(config_path: Path, method: str, *args) -> dict:
    """`cases.<method>(*args)` over RPC; its refusal, or the bus's failure, as a ClickException."""
    from amqp.exceptions import AMQPError
    from nameko.exceptions import RemoteError, RpcTimeout, UnknownService
    from nameko.rpc import ServiceProxy
    from nameko.standalone.rpc import ServiceRpcProxy

    from bus import nameko_rpc  # noqa: F401  (the bus declares nameko's RPC exchange)
    from bus.broker_uri import BrokerError, resolve_amqp_uri

    config, settings = _settings(config_path)
    timeout = settings.cases.rpc_timeout
    try:
        uri = resolve_amqp_uri(config, settings)
    except BrokerError as exc:
        raise click.ClickException(f"{exc}; nothing was changed") from None
    rpc_config = {"AMQP_URI": uri, **({"AMQP_SSL": config["AMQP_SSL"]} if config.get("AMQP_SSL") else {})}
    proxy = ServiceRpcProxy(SERVICE, rpc_config, timeout=timeout)
    proxy._proxy = ServiceProxy(proxy._worker_ctx, SERVICE, proxy._reply_listener, expiration=timeout)
    try:
        with proxy as service:
            return getattr(service, method)(*args)
    except RemoteError as exc:
        if exc.exc_type in REFUSALS:
            raise click.ClickException(exc.value) from None
        raise click.ClickException(f"the cases service failed: {exc.exc_type}: {exc.value}") from None
    except UnknownService:
        raise click.ClickException("the cases service is not running (`retailbus up` starts it); "
                                   "nothing was changed") from None
    except RpcTimeout:
        raise click.ClickException(f"no answer from the cases service within {timeout:g}s: the request "
                                   "expired unapplied if it was not taken; `retailbus cases show` says "
                                   "whether it was") from None
    except (OSError, AMQPError) as exc:
        raise click.ClickException(f"broker: {exc}; nothing was changed") from None


def _when(stamp: str | None) -> str:
    return stamp[:19].replace("T", " ") if stamp else "-"


def _late(case: dict, now: datetime) -> str:
    if case["state"] == "resolved":
        return ""
    left = datetime.fromisoformat(case["due_at"]) - now
    hours = abs(left.total_seconds()) / 3600
    span = f"{hours:.1f}h" if hours < 48 else f"{hours / 24:.1f}d"
    return f"OVERDUE by {span}" if left.total_seconds() < 0 else f"due in {span}"


def _store(ctx, param, value):
    if value is not None and not re.fullmatch(r"[A-Z0-9]{1,8}", value):
        raise click.BadParameter(f"{value!r} is not a store id (1-8 of A-Z, 0-9)")
    return value


@click.group()
def cases():
    """Business exceptions (over-redemptions, returns against policy, failed compensations)."""


@cases.command("list")
@click.option("--type", "case_type", help="only this case type, e.g. loyalty_over_redemption")
@click.option("--store", "store_id", callback=_store, help="only this store")
@click.option("--overdue", is_flag=True, help="only cases past their SLA deadline")
@click.option("--state", type=click.Choice(["open", "assigned", "resolved", "all"]),
              help="only this state (default: open and assigned)")
@click.option("--limit", default=500, show_default=True, type=click.IntRange(min=1))
@json_option
@config_option
def list_(case_type, store_id, overdue, state, limit, as_json, config_path):
    """Cases, the nearest deadline first."""
    from services.cases.store import STATES, UNRESOLVED, Filter, select_cases

    now = datetime.now(timezone.utc)
    states = UNRESOLVED if state is None else STATES if state == "all" else (state,)
    where = Filter(case_type, store_id, states, now if overdue else None)
    found = _read(config_path, lambda conn: select_cases(conn, where, limit))
    if as_json:
        for case in found:
            click.echo(json.dumps(case))
        return
    for c in found:
        click.echo(f"{c['case_id']:<44} {c['case_type']:<30} {c['state']:<9} {c['store_id'] or '-':<6} "
                   f"{c['owner'] or '-':<12} due {_when(c['due_at'])} {_late(c, now):<18} {c['summary'][:80]}")
    click.echo(f"{len(found)} case(s)")


@cases.command()
@click.argument("case_id")
@json_option
@config_option
def show(case_id, as_json, config_path):
    """One case and its whole history."""
    from services.cases.store import get, history

    case, lines = _read(config_path, lambda conn: (get(conn, case_id), history(conn, case_id)))
    if case is None:
        raise click.ClickException(f"no case {case_id}")
    if as_json:
        click.echo(json.dumps({**case, "history": lines}))
        return
    now = datetime.now(timezone.utc)
    process = f"{case['process']} {case['process_id']}" if case["process_id"] else "-"
    click.echo("\n".join([
        f"case:         {case['case_id']}",
        f"type:         {case['case_type']}",
        f"state:        {case['state']}" + (f" (owner {case['owner']})" if case["owner"] else ""),
        f"store:        {case['store_id'] or '-'}",
        f"transaction:  {case['transaction_id'] or '-'}",
        f"process:      {process}",
        f"opened:       {_when(case['opened_at'])} by {case['opened_by']}",
        f"due:          {_when(case['due_at'])} {_late(case, now)}",
        f"resolved:     {_when(case['resolved_at'])}" + (f": {case['resolution']}" if case["resolution"] else ""),
        f"summary:      {case['summary']}",
        "history:",
        *(f"  {_when(h['at'])}  {h['action']:<9} {h['actor']:<20} {h['detail']}" for h in lines),
    ]))


@cases.command()
@click.argument("case_id")
@click.option("--to", "owner", required=True, help="who works the case from now on")
@config_option
def assign(case_id, owner, config_path):
    """Give a case an owner (again, to hand it over); recorded with your OS user."""
    case = _call(config_path, "assign", case_id, owner, getpass.getuser())
    click.echo(f"case {case['case_id']} assigned to {case['owner']}")


@cases.command()
@click.argument("case_id")
@config_option
def retry(case_id, config_path):
    """Run the failed step of the case's process again (process.step_retry.v1)."""
    case = _call(config_path, "retry", case_id, getpass.getuser())
    click.echo(f"case {case['case_id']}: retry of {case['process']} {case['process_id']} sent; "
               "`retailbus processes show` follows it, `cases resolve` closes the case")


@cases.command()
@click.argument("case_id")
@click.option("--reason", required=True, help="how it was settled: recorded in the case's history")
@config_option
def resolve(case_id, reason, config_path):
    """Close a case; the reason and your OS user go into its history."""
    case = _call(config_path, "resolve", case_id, reason, getpass.getuser())
    click.echo(f"case {case['case_id']} resolved at {_when(case['resolved_at'])}")
