"""The CloudEvents 1.0 envelope (structured JSON mode) every message travels in.

The envelope carries what the bus needs to route, trace and de-duplicate a message
without knowing its business schema: `type` routes, `correlationid` ties a chain of
messages together in logs, `idempotencykey` lets every consumer apply an effect once
under at-least-once delivery. `data` stays a plain dict so the forwarder, the DLQ and
replay can move messages whose types they do not know; `payload()` types it on demand.
"""
from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
import orjson
from ulid import ULID

from contracts import registry
from contracts.errors import ContractError

# Crockford base32, 26 characters, first one <= 7 so the value fits 128 bits.
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")

NonEmpty = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]


def _new_id() -> str:
    return str(ULID())


def _now() -> datetime:
    return datetime.now(UTC)


class CloudEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(default_factory=_new_id)
    source: NonEmpty
    type: Annotated[str, StringConstraints(pattern=registry.TYPE_NAME_PATTERN)]
    time: AwareDatetime = Field(default_factory=_now)
    subject: str | None = None
    datacontenttype: str = "application/json"
    data: dict[str, Any]
    correlationid: NonEmpty = None  # type: ignore[assignment]  # filled by _correlate_to_own_id
    idempotencykey: NonEmpty

    @field_validator("id")
    @classmethod
    def _a_ulid(cls, value: str) -> str:
        """Our ids are ULIDs (time-ordered, 26 characters); the UUIDs CloudEvents SDKs make by
        default are refused by name, so the sender knows what to send instead."""
        if not _ULID.fullmatch(value):
            raise ValueError(f"must be a ULID (26 characters of Crockford base32, e.g. 01J8Z3Q5W8N4T6B2C9D0E1F2G3), "
                             f"got {value[:40]!r}{'; a UUID is not taken' if len(value) == 36 else ''}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _correlate_to_own_id(cls, values: Any) -> Any:
        """An event without a correlation id starts a new chain, named after itself."""
        if isinstance(values, dict) and values.get("correlationid") is None:
            event_id = values["id"] if "id" in values else _new_id()
            values = {**values, "id": event_id, "correlationid": event_id}
        return values

    @classmethod
    def new(
        cls,
        type: str,
        source: str,
        data: BaseModel | dict,
        *,
        subject: str | None = None,
        correlationid: str | None = None,
        idempotencykey: str,
        id: str | None = None,
    ) -> CloudEvent:
        """Build an outgoing event; registered payloads are validated before they leave."""
        if isinstance(data, BaseModel):
            expected = registry.REGISTRY.get(type)
            if expected is not None and not isinstance(data, expected):
                raise ContractError(
                    f"data is a {data.__class__.__name__}, {type} needs a {expected.__name__}",
                    [("data", f"expected {expected.__name__}")],
                )
            body = data.model_dump(mode="json")
        elif type in registry.REGISTRY:
            body = registry.parse(type, data).model_dump(mode="json")
        else:
            body = data
        fields: dict[str, Any] = {
            "type": type,
            "source": source,
            "data": body,
            "subject": subject,
            "correlationid": correlationid,
            "idempotencykey": idempotencykey,
        }
        if id is not None:
            fields["id"] = id
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise ContractError.from_validation(exc, "event") from None

    @classmethod
    def from_json(cls, raw: bytes | str) -> CloudEvent:
        """Parse the envelope only: `data` is checked by `payload()`, so unknown types pass.

        orjson reads the JSON (~3x faster than pydantic's JSON mode, which this envelope's
        before-validator makes build Python objects anyway); what orjson refuses (not
        JSON, or an integer beyond 64 bits) goes to pydantic, which names the problem."""
        try:
            try:
                fields = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return cls.model_validate_json(raw)
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise ContractError.from_validation(exc, "event") from None

    def to_json(self) -> bytes:
        # CloudEvents omits an absent optional attribute rather than sending null.
        exclude = {"subject"} if self.subject is None else None
        return self.model_dump_json(exclude=exclude).encode()

    def payload(self, context: dict | None = None) -> BaseModel:
        return registry.parse(self.type, self.data, context)


class AssembledEvent(CloudEvent):
    """An envelope we assembled ourselves (`model_construct`) around plain-dict `data`
    (a journal batch, a posted document), written by orjson: pydantic inspects the
    type of every value of such data as it serialises (~3 us a file row, more than
    reading and validating the row); orjson writes the same JSON several times faster.
    A file chunk's items arrive as JSON text already (`orjson.Fragment`, written by the
    drop's row loop), which orjson copies as it is; such data never needs the fallback
    below, whose integers beyond 64 bits are text inside the fragment."""

    def to_json(self) -> bytes:
        envelope = {"specversion": self.specversion, "id": self.id, "source": self.source, "type": self.type,
                    "time": self.time, "subject": self.subject, "datacontenttype": self.datacontenttype,
                    "data": self.data, "correlationid": self.correlationid, "idempotencykey": self.idempotencykey}
        if self.subject is None:  # as CloudEvent.to_json: an absent attribute is left out, not null
            del envelope["subject"]
        try:
            return orjson.dumps(envelope, option=orjson.OPT_UTC_Z)
        except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits, which pydantic writes
            return super().to_json()
