"""The process engine: durable, compensating workflows over the bus (NServiceBus sagas,
MassTransit state machines, in nameko's shape).

A process is a sequence of steps; each step is a command sent to the service that
does it and the reply that service sends back. Its instances are rows (a version for
optimistic concurrency, a unique correlation key, so two starts of one key make one
instance); taking a message, changing the state and queueing the next command commit
in one transaction (inbox + outbox), so a redelivered message changes nothing; the
timeouts are rows too (`DUE_AT`), so they survive a restart. A step that fails for
good (refused, or no reply after its resends) undoes the steps done before it, latest
first, and what cannot be undone opens a case for a person (`case.opened.v1`);
`retailbus cases retry` sends `process.step_retry.v1` and the instance runs on from
its first step not done. Every transition is a trace hop (`retailbus trace`) and a
metric; `retailbus processes list|show` shows instances and their history.

Defining a process (services/returns is a full one):

    from bus.process import ProcessDefinition, Step

    def reserve(ctx):                         # ctx.data: the instance's JSON, kept between messages
        order = ctx.data["start"]
        return ReserveStockV1(order_id=order["order_id"], lines=order["lines"])

    def release(ctx):                         # the compensation: undo what `reserve` did
        return ReleaseStockV1(order_id=ctx.data["start"]["order_id"])

    def reserved(ctx, reply):                 # what the reply says, kept for later steps
        ctx.data["reservation"] = reply.reservation_id

    ORDER = ProcessDefinition(
        name="click_and_collect",
        start=OrderPlacedV1,                  # the message that starts an instance
        correlate=lambda order: order.order_id,   # the unique key of an instance
        steps=(
            Step("reserve", target="erp", command=reserve, reply=StockReservedV1, on_reply=reserved,
                 compensation=release, compensation_reply=StockReleasedV1, timeout=30, resends=2),
            Step("notify", target="crm", command=notify, reply=CustomerNotifiedV1,
                 on_failure="case", case_type="order_not_notified"),
        ))

Running it in a service (the commands go to `<target>.commands`, the replies come on
`<target>.events`; a step's functions may open cases, `ctx.open_case(type, summary)`,
and write the service's own tables in the same transaction, `ctx.conn`):

    class OrdersService:
        name = "orders"
        orders = ProcessManager(ORDER, config_key="ORDERS_DB_URI", tables=(my_metadata,))

        @reliable_handler("ecommerce", OrderPlacedV1.TYPE, batch=64)
        def on_order(self, items):
            return self.orders.start_many(items)

        @process_messages(ORDER)
        def on_process_message(self, items):
            return self.orders.handle_many(items)

The services doing the steps answer with `command_handler` (bus/process/commands.py):
the method returns the reply, or raises `StepRefused(code, reason)`; its effects are
keyed by the command's idempotency key (the same when a command is sent again).
Timeouts and resends per step may be set in bus.yaml:
`RETAILBUS.processes.<name>: {poll_seconds, steps: {<step>: {timeout, resends}}}`.
"""
from bus.process.commands import StepRefused, command_handler
from bus.process.definition import Context, ProcessDefinition, Step
from bus.process.manager import ProcessManager, process_messages

__all__ = ["Context", "ProcessDefinition", "ProcessManager", "Step", "StepRefused", "command_handler",
           "process_messages"]
