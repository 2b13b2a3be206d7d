"""`retailbus dlq list|show|replay|purge`: see and repair what the bus parked.

Thin: options become a Selection and a Workbench call (services/dlq/workbench.py);
every replay and purge is audited in RETAILBUS.dlq.audit_file.
"""
from __future__ import annotations

import getpass
import json
from pathlib import Path

import click
from amqp.exceptions import AMQPError

from services.broker.node import resolve_amqp_uri
from services.dlq.store import DeadLetterStore, handler_queues
from services.dlq.workbench import AuditError, AuditLog, Selection, Workbench, parse_since
from bus.settings import DEFAULT_CONFIG, ConfigError, load_config, retailbus_settings

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                             default=DEFAULT_CONFIG, show_default=True)
user_option = click.option("--user", default=getpass.getuser, show_default="the OS user",
                           help="who does this: recorded in the audit file, beside the account "
                                "the command runs as")


def _workbench(config_path: Path, user: str = "") -> Workbench:
    try:
        config = load_config(config_path)
        settings = retailbus_settings(config, config_path)
        store = DeadLetterStore(resolve_amqp_uri(config, settings), handler_queues(config, settings),
                                connect_timeout=settings.publisher.connect_timeout,
                                confirm_timeout=settings.publisher.confirm_timeout)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return Workbench(store, AuditLog(settings.path(settings.dlq.audit_file)), user)


def _selection(ids=(), queue=None, type_=None, since=None) -> Selection:
    try:
        return Selection(frozenset(ids), queue, type_, parse_since(since) if since else None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None


def _broker_call(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except AuditError as exc:
        raise click.ClickException(f"{exc}; stopped before the first dead letter it could not audit: "
                                   "that one and the rest are still parked (retailbus dlq list)") from None
    except (OSError, AMQPError) as exc:
        raise click.ClickException(f"broker: {exc}; nothing was changed that was not confirmed") from None


filters = [
    click.option("--queue", help="handler queue or DLQ name; shell pattern, e.g. '*erp.on_pos_sale'"),
    click.option("--type", "type_", help="message type; shell pattern, e.g. 'pos.*'"),
    click.option("--since", help="last failed since: 30m, 2h, 1d or an ISO time"),
]


def with_filters(fn):
    for option in reversed(filters):
        fn = option(fn)
    return fn


@click.group()
def dlq():
    """Dead letters: messages a handler failed on after its retries."""


@dlq.command("list")
@with_filters
@config_option
def list_(queue, type_, since, config_path):
    """Every dead letter (nothing is removed): id, type, attempts, last failure, error."""
    letters = _broker_call(_workbench(config_path).list, _selection((), queue, type_, since))
    for letter in letters:
        failed = letter.last_failure.isoformat(timespec="seconds") if letter.last_failure else "-"
        error = (letter.error.splitlines() or [""])[0][:120]  # one line per dead letter
        click.echo(f"{letter.id:<28} {letter.type or '-':<18} {letter.attempts:>3}  {failed:<25} "
                   f"{letter.queue}  {letter.error_type}: {error}")
    click.echo(f"{len(letters)} dead letters")


@dlq.command()
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per dead letter, body included")
@config_option
def show(message_id, as_json, config_path):
    """One dead letter: body, headers, error, attempts, failures, original route and user."""
    letters = _broker_call(_workbench(config_path).list, _selection([message_id]))
    if not letters:
        raise click.ClickException(f"no dead letter with id {message_id}")
    for letter in letters:
        info = letter.describe()
        try:
            body = json.loads(letter.body)
        except ValueError:
            body = letter.body.decode("utf-8", "replace")
        if as_json:
            click.echo(json.dumps({**info, "body": body}, ensure_ascii=False, default=str))
            continue
        route = info["original_route"]
        click.echo("\n".join([
            f"id:               {info['id']}",
            f"type:             {info['type']}",
            f"queue:            {info['queue']} (parked in {info['dlq']})",
            f"attempts:         {info['attempts']}",
            f"first failure:    {info['first_failure']}",
            f"last failure:     {info['last_failure']}",
            f"original route:   exchange={route['exchange']!r} routing_key={route['routing_key']!r}",
            f"original user id: {info['original_user_id']}",
            f"correlation id:   {info['correlation_id']}",
            f"error:            {info['error_type']}: " + info["error"].replace("\n", "\n                  "),
            "headers:",
            *(f"  {k}: {v}" for k, v in sorted(info["headers"].items()) if k not in ("x-retailbus-error",)),
            "body:",
            json.dumps(body, indent=2, ensure_ascii=False) if not isinstance(body, str) else body,
        ]))


def _edit(text: str) -> str | None:
    """$VISUAL / $EDITOR on the body; None when the file was not saved."""
    return click.edit(text, extension=".json")


@dlq.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every dead letter (narrowed by --queue/--type)")
@with_filters
@click.option("--edit", is_flag=True, help="edit each body in $VISUAL/$EDITOR before replaying it")
@click.option("--reason", help="why: recorded in the audit file")
@user_option
@config_option
def replay(ids, all_, queue, type_, since, edit, reason, user, config_path):
    """Republish dead letters to the queue of the handler that failed (only there),
    with the attempt count reset; each is removed once the broker confirmed it."""
    if not (ids or all_ or since):
        raise click.UsageError("name the dead letters: IDS, --all or --since")
    if ids and all_:
        raise click.UsageError("give IDS or --all, not both")
    bench = _workbench(config_path, user)
    outcome = _broker_call(bench.replay, _selection(ids, queue, type_, since), reason,
                           _edit if edit else None)
    for refused in outcome.refused:
        click.echo(f"refused {refused.message_id} (left in the dead-letter queue):", err=True)
        for path, why in refused.errors:
            click.echo(f"  {path}: {why}", err=True)
    for message_id in outcome.done:
        click.echo(f"replayed {message_id}")
    missing = set(ids) - set(outcome.done) - {r.message_id for r in outcome.refused}
    for message_id in sorted(missing):
        click.echo(f"no dead letter with id {message_id}", err=True)
    click.echo(f"{len(outcome.done)} replayed, audit: {bench.audit.path}")
    if outcome.refused or missing or not outcome.done:
        raise SystemExit(1)


@dlq.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("--reason", required=True, help="why: recorded in the audit file with the body")
@user_option
@config_option
def purge(ids, reason, user, config_path):
    """Drop dead letters for good; the audit file keeps their bodies."""
    bench = _workbench(config_path, user)
    outcome = _broker_call(bench.purge, _selection(ids), reason)
    for message_id in outcome.done:
        click.echo(f"purged {message_id}")
    missing = sorted(set(ids) - set(outcome.done))
    for message_id in missing:
        click.echo(f"no dead letter with id {message_id}", err=True)
    click.echo(f"{len(outcome.done)} purged, audit: {bench.audit.path}")
    if missing:
        raise SystemExit(1)
