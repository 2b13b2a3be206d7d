"""The transitions of a process instance: what a start, a reply, a refusal, a timeout
or an ops retry does to it, and the messages that sends.

Each `Engine` method takes the transaction's connection and one message; it reads the
instance, applies the definition's rules, and writes the new state, its history, the
commands to send (the outbox) and the cases to open, all in that transaction. What
may be seen only once it committed (trace hops, metrics) is collected in the
`Effects` the caller flushes after the commit.

States: `running` (a step's command sent, its reply awaited), `compensating` (undoing
the steps done, latest first), `completed`, `failed` (a case is open; `cases retry`
runs the process on from the first step that is not done, in a new round whose
commands carry new idempotency keys).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import orjson
from pydantic import BaseModel

from contracts.cases import CaseOpenedV1, ProcessStepRetryV1
from contracts.envelope import AssembledEvent, CloudEvent
from contracts.process import ProcessStepFailedV1
from bus import topology
from bus.process import store
from bus.process.definition import Context, ProcessDefinition, Step

REPLY_SUFFIX = ":reply"  # a command handler's reply key: the command's key + this (bus/process/commands.py)
UNDO = ":undo"          # a compensation's key: the step's command key + this


@dataclass
class Effects:
    """What a transition leaves to write in its transaction (its history lines and outbox
    messages: `store.write`, one statement for a batch's) and to do once that committed (trace
    hops, metrics)."""

    hops: list[tuple[str, str, dict]] = field(default_factory=list)   # (hop, outcome, fields)
    counts: list[tuple[str, tuple]] = field(default_factory=list)      # (metric name, labels)
    timings: list[tuple[str, float]] = field(default_factory=list)     # (step, seconds)
    history: list[dict] = field(default_factory=list)                  # rows for store.write, in the transaction
    outbox: list[dict] = field(default_factory=list)
    at: str = field(default_factory=store.now_iso)                     # the transition's time, for its rows


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits -> 2 characters


def new_id() -> str:
    """A ULID (48 bits of milliseconds, 80 random bits, Crockford's base32: 26 characters, the
    first 2 bits zero), as str(ULID()) makes, for less (an instance's id, a command's)."""
    value = time.time_ns() // 1_000_000 << 80 | int.from_bytes(os.urandom(10), "big")
    return "".join([_PAIRS[value >> shift & 1023] for shift in range(120, -1, -10)])


def _envelope(command: BaseModel, source: str, subject: str, correlationid: str, key: str) -> tuple[str, bytes]:
    """(id, JSON) of the command's envelope around the model the definition built (validated as it
    was built), written by orjson as AssembledEvent.to_json writes it: neither validated again
    nor constructed as a model only to be written."""
    event_id, data = new_id(), command.model_dump(mode="json")
    envelope = {"specversion": "1.0", "id": event_id, "source": source, "type": command.TYPE,
                "time": datetime.now(timezone.utc), "subject": subject, "datacontenttype": "application/json",
                "data": data, "correlationid": correlationid, "idempotencykey": key}
    try:
        return event_id, orjson.dumps(envelope, option=orjson.OPT_UTC_Z)
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits, which pydantic writes
        return event_id, AssembledEvent.model_construct(**envelope).to_json()


class Engine:
    def __init__(self, definition: ProcessDefinition, service: str, timeouts: dict[str, tuple[float, int]]):
        """`timeouts`: step name -> (timeout, resends), the definition's as configured."""
        self.d, self.service, self.timeouts = definition, service, timeouts
        self.consumer = f"process:{definition.name}"
        self.source = f"retailbus/{service}"

    # ------------------------------------------------------------------ messages
    def start(self, conn, event: CloudEvent, payload: BaseModel, fx: Effects, extras: dict | None = None) -> str | None:
        """A new instance for the start message's key; None when it has one already."""
        if not store.claim(conn, self.consumer, event.idempotencykey, event.id, fx.at):
            return None
        key = self.d.correlate(payload)
        inst = store.Instance(new_id(), self.d.name, key, "running", 0, 0, 0, {},
                              [{"status": "pending", "attempts": 0} for _ in self.d.steps], None,
                              event.correlationid, fx.at)
        if not store.insert_new(conn, inst):
            return None
        ctx = self._ctx(conn, inst, fx)
        ctx.extras = extras or {}
        if self.d.begin is not None:
            self.d.begin(ctx, payload)
        else:
            inst.data["start"] = payload.model_dump(mode="json")
        inst.note(None, "started", message=event.id, key=key)
        self._hop(fx, inst, "started", "ok", message=event.id)
        self._advance(conn, inst, fx)
        fx.history += store.save(conn, inst, fx.at)
        return inst.process_id

    def handle(self, conn, event: CloudEvent, payload: BaseModel, fx: Effects) -> str:
        """A reply, a refusal or an ops retry; returns what it did (`duplicate`, `orphan`, ...)."""
        if isinstance(payload, ProcessStepRetryV1):
            if payload.process != self.d.name:
                return "not ours"
            process_id = payload.process_id
        else:
            process_id = event.correlationid
        if not store.claim(conn, self.consumer, event.idempotencykey, event.id, fx.at):
            return "duplicate"
        inst = store.load(conn, self.d.name, process_id)
        if inst is None:
            return "orphan"  # another process's reply, or a posting no process asked for
        if isinstance(payload, ProcessStepRetryV1):
            outcome = self._retry(conn, inst, payload, fx)
        else:
            outcome = self._reply(conn, inst, event, payload, fx)
        fx.history += store.save(conn, inst, fx.at)
        return outcome

    def timeout(self, conn, process_id: str, at: float, fx: Effects) -> str:
        inst = store.load(conn, self.d.name, process_id)
        if inst is None or inst.due_at is None or inst.due_at > at:
            return "not due"  # handled meanwhile (another process, a reply)
        n, st = inst.step, inst.steps[inst.step]
        step = self.d.steps[n]
        timeout, resends = self.timeouts[step.name]
        fx.counts.append(("timeouts", (self.d.name, step.name)))
        inst.note(step.name, "timeout", attempt=st["attempts"], after_seconds=timeout)
        self._hop(fx, inst, "timeout", "failed", step=step.name, attempt=st["attempts"])
        compensating = st["status"] == "compensating"
        if st["attempts"] <= resends:
            build = step.compensation if compensating else step.command
            self._send(conn, inst, n, build(self._ctx(conn, inst, fx)), fx, compensating, resend=True)
        elif compensating:
            self._not_compensated(conn, inst, n, f"no reply to its compensation after {st['attempts']} sends", fx)
        else:
            self._fail(conn, inst, n, f"no reply after {st['attempts']} sends of {timeout:g} s", fx)
        fx.history += store.save(conn, inst, fx.at)
        return "timeout"

    # ------------------------------------------------------------------ transitions
    def _answers(self, inst, event: CloudEvent) -> tuple[int, bool] | None:
        """(step, whether to its compensation) that `event` answers. A `command_handler`'s
        reply or refusal names the command (its key + REPLY_SUFFIX), so two steps may share a
        reply type; a target's own event (the erp's erp.return_posted.v1) by its type."""
        if event.idempotencykey.endswith(REPLY_SUFFIX):
            key = event.idempotencykey[:-len(REPLY_SUFFIX)]
            for n, st in enumerate(inst.steps):
                if st.get("key") == key:
                    return n, key.endswith(UNDO)
            return None
        for n, step in enumerate(self.d.steps):
            if event.type == step.reply.TYPE:
                return n, False
            if step.compensation_reply is not None and event.type == step.compensation_reply.TYPE:
                return n, True
        return None

    def _reply(self, conn, inst, event: CloudEvent, payload: BaseModel, fx: Effects) -> str:
        found = self._answers(inst, event)
        if found is None:
            inst.note(None, "ignored", type=event.type, message=event.id, state=inst.state)
            return "ignored"
        n, undo = found
        st, step = inst.steps[n], self.d.steps[n]
        if isinstance(payload, ProcessStepFailedV1):
            return self._refused(conn, inst, n, payload, fx)
        if not undo and st["status"] == "sent" and inst.state == "running":
            return self._done(conn, inst, n, payload, fx)
        if undo and st["status"] == "compensating":
            st["status"] = "compensated"
            inst.note(step.name, "compensated")
            fx.counts.append(("compensations", (self.d.name, step.name, "compensated")))
            self._hop(fx, inst, "compensated", "ok", step=step.name)
            self._compensate(conn, inst, n - 1, fx)
            return "compensated"
        if not undo and st["status"] == "failed":
            return self._late(conn, inst, n, event, payload, fx)
        inst.note(step.name, "ignored", type=event.type, message=event.id, status=st["status"])
        return "ignored"

    def _late(self, conn, inst, n: int, event: CloudEvent, reply: BaseModel, fx: Effects) -> str:
        """A reply to a step given up (timed out): a step that fails by case goes on as if in
        time; one whose failure is compensated is undone too, its effect having happened."""
        step = self.d.steps[n]
        inst.note(step.name, "late_reply", message=event.id)
        if step.on_failure == "case":
            inst.state = "running"
            return self._done(conn, inst, n, reply, fx)
        inst.steps[n]["status"] = "done"
        if inst.state == "failed":
            inst.state = "compensating"
            self._compensate(conn, inst, n, fx)
        return "late reply compensated"  # while compensating: `_park` undoes it before it parks

    def _done(self, conn, inst, n: int, reply: BaseModel, fx: Effects) -> str:
        st, step = inst.steps[n], self.d.steps[n]
        if step.on_reply is not None:
            step.on_reply(self._ctx(conn, inst, fx), reply)
        st["status"] = "done"
        if st.get("sent_at"):
            fx.timings.append((step.name, max(0.0, time.time() - st["sent_at"])))
        inst.note(step.name, "done")
        self._hop(fx, inst, "step_done", "ok", step=step.name)
        self._advance(conn, inst, fx, n + 1)
        return "done"

    def _refused(self, conn, inst, n: int, refusal: ProcessStepFailedV1, fx: Effects) -> str:
        st, step = inst.steps[n], self.d.steps[n]
        if st["status"] not in ("sent", "compensating") or inst.step != n:
            inst.note(step.name, "ignored", refusal=refusal.code, status=st["status"])
            return "ignored"
        reason = f"{refusal.code}: {refusal.reason}"
        inst.note(step.name, "refused", reason=reason)
        self._hop(fx, inst, "refused", "failed", step=step.name, reason=reason)
        if st["status"] == "compensating":
            self._not_compensated(conn, inst, n, f"its compensation was refused ({reason})", fx)
        else:
            self._fail(conn, inst, n, f"refused ({reason})", fx)
        return "refused"

    def _retry(self, conn, inst, retry: ProcessStepRetryV1, fx: Effects) -> str:
        if inst.state != "failed":
            inst.note(None, "retry_ignored", state=inst.state, case=retry.case_id, by=retry.requested_by)
            return "ignored"
        inst.round += 1
        for st in inst.steps:
            if st["status"] in ("failed", "compensated"):
                st.update(status="pending", attempts=0, reason=None)
            elif st["status"] == "not_compensated":
                st["status"] = "done"  # still in effect: not run again
        inst.state = "running"
        inst.note(None, "retry", case=retry.case_id, by=retry.requested_by, round=inst.round)
        self._hop(fx, inst, "retry", "ok", case=retry.case_id, by=retry.requested_by)
        self._advance(conn, inst, fx)
        return "retried"

    def _advance(self, conn, inst, fx: Effects, start: int = 0) -> None:
        """Send the next step's command; complete the instance when none is left."""
        ctx = self._ctx(conn, inst, fx)
        for n in range(start, len(self.d.steps)):
            st, step = inst.steps[n], self.d.steps[n]
            if st["status"] in ("done", "skipped"):
                continue
            command = step.command(ctx)
            if command is None:
                st["status"] = "skipped"
                inst.note(step.name, "skipped")
                continue
            inst.state = "running"
            self._send(conn, inst, n, command, fx)
            return
        inst.state, inst.due_at = "completed", None
        inst.note(None, "completed")
        fx.counts.append(("transitions", (self.d.name, "-", "completed")))
        self._hop(fx, inst, "completed", "ok")

    def _fail(self, conn, inst, n: int, reason: str, fx: Effects) -> None:
        step = self.d.steps[n]
        inst.steps[n].update(status="failed", reason=reason)
        inst.note(step.name, "failed", reason=reason)
        fx.counts.append(("transitions", (self.d.name, step.name, "failed")))
        if step.on_failure == "case":
            self._park(conn, inst, fx)
        else:
            inst.state = "compensating"
            self._compensate(conn, inst, n - 1, fx)

    def _compensate(self, conn, inst, start: int, fx: Effects) -> None:
        """Undo the steps done from `start` down, latest first; park when none is left."""
        ctx = self._ctx(conn, inst, fx)
        for n in range(start, -1, -1):
            st, step = inst.steps[n], self.d.steps[n]
            if st["status"] != "done":
                continue
            command = step.compensation(ctx) if step.compensation is not None else None
            if step.compensation is None:
                st["status"] = "not_compensated"
                inst.note(step.name, "not_compensated", reason="it cannot be undone")
                continue
            if command is None:
                st["status"] = "compensated"
                inst.note(step.name, "compensated", reason="nothing to undo")
                continue
            st["attempts"] = 0
            inst.note(step.name, "compensating")
            self._send(conn, inst, n, command, fx, compensation=True)
            return
        self._park(conn, inst, fx)

    def _not_compensated(self, conn, inst, n: int, reason: str, fx: Effects) -> None:
        step = self.d.steps[n]
        inst.steps[n].update(status="not_compensated", reason=reason)
        inst.note(step.name, "not_compensated", reason=reason)
        fx.counts.append(("compensations", (self.d.name, step.name, "failed")))
        self._compensate(conn, inst, n - 1, fx)

    def _park(self, conn, inst, fx: Effects) -> None:
        """Failed for good: a case names the failed step and what could not be undone. A step
        whose late reply came while the others were undone is undone first."""
        if inst.state == "compensating" and any(st["status"] == "done" for st in inst.steps):
            self._compensate(conn, inst, len(self.d.steps) - 1, fx)
            return
        inst.state, inst.due_at = "failed", None
        failed = [n for n, st in enumerate(inst.steps) if st["status"] == "failed"]
        n = failed[-1] if failed else inst.step
        step = self.d.steps[n]
        standing = [self.d.steps[k].name for k, st in enumerate(inst.steps) if st["status"] == "not_compensated"]
        undone = [self.d.steps[k].name for k, st in enumerate(inst.steps) if st["status"] == "compensated"]
        summary = (f"{self.d.name} {inst.key}: step {step.name} failed: {inst.steps[n].get('reason')}. "
                   f"Undone: {', '.join(undone) or 'nothing'}. Still in effect: {', '.join(standing) or 'nothing'}.")
        ctx = self._ctx(conn, inst, fx)
        ctx.open_case(self.d.failure_case(step), summary, **(self.d.case_context(ctx) if self.d.case_context else {}))
        self._hop(fx, inst, "failed", "failed", step=step.name)

    # ------------------------------------------------------------------ messages out
    def _send(self, conn, inst, n: int, command: BaseModel, fx: Effects, compensation: bool = False,
              resend: bool = False) -> None:
        step, st = self.d.steps[n], inst.steps[n]
        key = f"{self.d.name}:{inst.process_id}:{step.name}:{inst.round}{UNDO if compensation else ''}"
        event_id, body = _envelope(command, self.source, inst.key, inst.process_id, key)
        fx.outbox.append(store.message_row(event_id, topology.commands_exchange(step.target),
                                           step.route(command) if step.route else command.TYPE, inst.process_id,
                                           body, fx.at))
        st.update(status="compensating" if compensation else "sent", attempts=st["attempts"] + 1,
                  sent_at=time.time(), key=key)
        inst.step = n
        inst.due_at = time.time() + self.timeouts[step.name][0]
        what = "resent" if resend else ("compensation_sent" if compensation else "sent")
        inst.note(step.name, what, command=command.TYPE, message=event_id, attempt=st["attempts"])
        fx.counts.append(("transitions", (self.d.name, step.name, what)))
        self._hop(fx, inst, what, "ok", step=step.name, command=command.TYPE, message=event_id)

    def _ctx(self, conn, inst, fx: Effects) -> Context:
        def open_case(case_type: str, summary: str, *, store_id=None, transaction_id=None) -> str:
            case_id = f"{case_type}:{inst.key}" + (f":r{inst.round}" if inst.round else "")
            case = CaseOpenedV1(case_id=case_id, case_type=case_type, store_id=store_id, process=self.d.name,
                                process_id=inst.process_id, transaction_id=transaction_id, summary=summary[:2000],
                                opened_at=datetime.now(timezone.utc))
            event = CloudEvent.new(CaseOpenedV1.TYPE, self.source, case, subject=case_id,
                                   correlationid=inst.process_id, idempotencykey=f"{CaseOpenedV1.TYPE}:{case_id}")
            fx.outbox.append(store.message_row(event.id, topology.events_exchange(self.service), CaseOpenedV1.TYPE,
                                               inst.process_id, event.to_json(), fx.at))
            inst.note(None, "case", case=case_id, type=case_type)
            fx.counts.append(("cases", (self.d.name, case_type)))
            self._hop(fx, inst, "case_opened", "ok", case=case_id)
            return case_id

        return Context(self.d.name, inst.process_id, inst.key, inst.data, conn, inst.round, open_case)

    def _hop(self, fx: Effects, inst, hop: str, outcome: str, **detail) -> None:
        fx.hops.append((f"process_{hop}", outcome, dict(id=inst.process_id, correlationid=inst.trace_id,
                                                          subject=inst.key,
                                                          detail={"process": self.d.name, **detail})))
