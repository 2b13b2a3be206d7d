"""`command_handler`: how a service does a process's step and answers it.

A process sends its command to `<service>.commands` (routing key = the command type);
the service's method takes it like any reliable handler (acked after success, retried,
parked) and returns the reply, a contract model, which is published on
`<service>.events`, correlated to the process instance (the command's `correlationid`)
and keyed `<the command's key>:reply`, before the command is acked. A refusal on the
merits is `raise StepRefused(code, reason)`: `process.step_failed.v1` goes back instead,
and the process fails the step at once. The command is acked only once its answer is
confirmed by the broker, so a crash in between runs the command again: the method's
effects must be keyed by the command's idempotency key (`event.idempotencykey`), which a
process keeps when it sends a command again after a timeout.

    class LoyaltyService:
        name = "loyalty"

        @command_handler(LoyaltyReturnPointsV1.TYPE)
        def on_return_points(self, command, event) -> LoyaltyReturnPointsBookedV1:
            ...  # platform.book(..., key=event.idempotencykey)
            return LoyaltyReturnPointsBookedV1(...)
"""
from __future__ import annotations

import logging

from pydantic import BaseModel

from contracts.envelope import CloudEvent
from contracts.errors import RetailbusError
from contracts.process import ProcessStepFailedV1
from bus import topology
from bus.consumer import ReliableHandler
from bus.extensions import event_message
from bus.process.engine import REPLY_SUFFIX

log = logging.getLogger(__name__)


class StepRefused(RetailbusError):
    """Raised by a command handler that refuses the command on its merits (not retried)."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class _Answered:
    """What a refused command settles as: acked, its refusal sent."""


class CommandHandler(ReliableHandler):
    """A reliable handler on `<service>.commands` whose method's result is the reply."""

    def __init__(self, command_type: str, **kwargs):
        super().__init__("", command_type, **kwargs)

    def bind(self, container, method_name):
        """The service's own name is known only now: its commands exchange, and its name
        in the queue (`evt-<service>-<command type>--<service>.<method>`)."""
        instance = super().bind(container, method_name)
        instance.source_service = container.service_name
        instance._exchange = topology.commands_exchange(container.service_name)
        return instance

    def setup(self):
        super().setup()
        self.reply_exchange = topology.events_exchange(self.container.service_name)
        self.bus.register_exchange(self.reply_exchange)

    def _settle_all(self, outcomes: list, started):
        """Answer every command of the worker that did not fail for a reason retrying may cure,
        in one confirmed round, then ack them; one whose answer the broker did not take runs again."""
        answered = [(n, delivery.event, result, error) for n, (delivery, result, error) in enumerate(outcomes)
                    if error is None or isinstance(error, StepRefused)]
        events, failures = [], {}
        for n, command, result, refused in answered:
            try:
                events.append((n, self._answer(command, result, refused)))
            except (TypeError, ValueError) as exc:  # the method returned no reply: a bug, parked like one
                failures[n] = exc
        confirmed = self.bus.publisher.publish_many([event_message(e, self.reply_exchange) for _, e in events]) \
            if events else []
        for (n, _), failed in zip(events, confirmed):
            if failed is not None:  # not confirmed: the command runs again (its effects are keyed)
                failures[n] = failed
        settled = []
        for n, (delivery, result, error) in enumerate(outcomes):
            if n in failures:
                settled.append((delivery, None, failures[n]))
            elif isinstance(error, StepRefused):
                settled.append((delivery, _Answered(), None))
            else:
                settled.append((delivery, result, error))
        super()._settle_all(settled, started)

    def _answer(self, command: CloudEvent, reply: BaseModel | None, refused: StepRefused | None) -> CloudEvent:
        if refused is not None:
            reply = ProcessStepFailedV1(command_type=command.type, command_id=command.id, code=refused.code,
                                        reason=refused.reason[:2000])
            log.warning("refused %s: %s", command.type, refused.reason,
                        extra={"id": command.id, "correlationid": command.correlationid, "outcome": "refused"})
        if not isinstance(reply, BaseModel) or not hasattr(reply, "TYPE"):
            raise TypeError(f"{self.method_name} returned {type(reply).__name__}, not a reply contract")
        return CloudEvent.new(reply.TYPE, f"retailbus/{self.container.service_name}", reply,
                              subject=command.subject, correlationid=command.correlationid,
                              idempotencykey=command.idempotencykey + REPLY_SUFFIX)


command_handler = CommandHandler.decorator
