"""What a process is: a name, the message that starts it and a sequence of steps.

A process definition is plain data and plain functions, no broker and no database,
so a process's rules are unit-tested alone (tests/unit/test_process_engine.py).
Each `Step` is one command sent over the bus to the service that does it
(`<target>.commands`, routing key = the command's type) and the reply that service
sends back when it is done (on `<target>.events`, the envelope's `correlationid`
naming the process instance). A step may have a compensation: the command that
undoes it, run when a later step fails for good. A step without one is a pivot:
once done it stands, and a failure after it opens a case for a person.

The functions a definition names get a `Context`: the instance's `data` (a JSON
object the process keeps between messages: change it in place), `open_case(...)`
for a business exception, and `conn`, the database connection of the transaction
the state change commits in (the process service's own tables, e.g. a policy's
history, are written in it, so they commit with the state or not at all).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel

OnFailure = Literal["compensate", "case"]


class Context:
    """What a step's functions see of one instance while a message is handled."""

    def __init__(self, process: str, process_id: str, key: str, data: dict, conn: Any, round_: int,
                 open_case: Callable[..., str], extras: dict | None = None):
        self.process, self.process_id, self.key, self.data, self.conn, self.round = (
            process, process_id, key, data, conn, round_)
        self.extras = extras or {}  # what the service passed with the start (`start_many(items, extras)`)
        self._open_case = open_case

    def open_case(self, case_type: str, summary: str, *, store_id: str | None = None,
                  transaction_id: str | None = None) -> str:
        """Open a business exception case (`case.opened.v1`, sent with the state change);
        returns its id, `<case_type>:<process key>` (and `:r<round>` after an ops retry),
        so handling the same message again opens the same case, not a second one."""
        return self._open_case(case_type, summary, store_id=store_id, transaction_id=transaction_id)


@dataclass(frozen=True)
class Step:
    """One command to `target` and the reply it waits for.

    `command(ctx)` builds the command (a registered contract model) from the instance's
    data, or returns None when the step has nothing to do for this instance (skipped).
    `on_reply(ctx, reply)` records what the reply says in `ctx.data`. `compensation(ctx)`
    builds the command that undoes the step (None: nothing to undo this time), answered
    by `compensation_reply`; a step without `compensation` cannot be undone.

    `timeout` seconds after a command is sent with no reply, it is sent again (same
    idempotency key: the target applies it once) up to `resends` times; then the step
    has failed. `on_failure`: `compensate` undoes the steps done before it, latest first,
    then opens a case `case_type`; `case` opens the case and leaves the steps done as they
    are (a step whose failure must not undo the others, e.g. a CRM entry). A refusal
    (the target's `process.step_failed.v1`) fails the step at once.

    `route(command)` gives the routing key of the step's commands on `<target>.commands`
    (default: the command's type): e.g. `<type>.<store>` for a target whose instances each
    bind their own commands only (each store's agent binds `fulfilment.*.v1.<store>`)."""

    name: str
    target: str
    command: Callable[[Context], BaseModel | None]
    reply: type[BaseModel]
    on_reply: Callable[[Context, BaseModel], None] | None = None
    compensation: Callable[[Context], BaseModel | None] | None = None
    compensation_reply: type[BaseModel] | None = None
    timeout: float = 60.0
    resends: int = 2
    on_failure: OnFailure = "compensate"
    case_type: str | None = None
    route: Callable[[BaseModel], str] | None = None

    def __post_init__(self):
        if self.compensation is not None and self.compensation_reply is None:
            raise ValueError(f"step {self.name}: a compensation needs its compensation_reply")
        if self.timeout <= 0 or self.resends < 0:
            raise ValueError(f"step {self.name}: timeout must be > 0 and resends >= 0")


@dataclass(frozen=True)
class ProcessDefinition:
    """A process: `start` (a contract model) starts one instance per `correlate(start)`
    (the unique correlation key: a second start with the same key is the same instance);
    `begin(ctx, start)` fills `ctx.data` from it and `ctx.extras` (default: the start
    message's fields under "start");
    then the steps run in order. `case_type` is the case opened when a step without a
    `case_type` of its own fails; `case_context(ctx)` gives the `store_id` and
    `transaction_id` of the cases the engine opens (a failed step's)."""

    name: str
    start: type[BaseModel]
    correlate: Callable[[BaseModel], str]
    steps: tuple[Step, ...]
    begin: Callable[[Context, BaseModel], None] | None = None
    case_type: str | None = None
    case_context: Callable[[Context], dict] | None = None
    _by_name: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        names = [s.name for s in self.steps]
        if not self.steps or len(set(names)) != len(names):
            raise ValueError(f"process {self.name}: steps must be a non-empty sequence of unique names")
        self._by_name.update({s.name: n for n, s in enumerate(self.steps)})

    def index(self, step: str) -> int:
        return self._by_name[step]

    def failure_case(self, step: Step) -> str:
        return step.case_type or self.case_type or f"{self.name}_{step.name}_failed"

    def replies(self) -> set[tuple[str, str]]:
        """(target service, reply type) of every reply the process waits for."""
        found = {(s.target, s.reply.TYPE) for s in self.steps}
        found |= {(s.target, s.compensation_reply.TYPE) for s in self.steps if s.compensation_reply is not None}
        return found

    def targets(self) -> set[str]:
        return {s.target for s in self.steps}
