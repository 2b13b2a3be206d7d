"""The envelope (CloudEvent): defaults, ids, exact money through JSON, and every bad
attribute named."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from contracts.envelope import CloudEvent
from contracts.errors import ContractError
from contracts.pos import PosSaleV1
from tests.unit.contract_examples import BIG, valid_sale

pytestmark = pytest.mark.unit


def big_sale() -> PosSaleV1:
    line_total = 3 * BIG - 7
    return PosSaleV1.model_validate(valid_sale(
        lines=[{"line_no": 1, "sku": "GOLD", "quantity": 3, "unit_price_minor": BIG,
                "discount_minor": 7, "line_total_minor": line_total}],
        total_minor=line_total, tenders=[{"kind": "card", "amount_minor": line_total - 1},
                                         {"kind": "cash", "amount_minor": 1}]))


def new_event(**overrides) -> CloudEvent:
    args = {"type": "pos.sale.v1", "source": "store/S001/pos/07", "data": big_sale(),
            "idempotencykey": "S001:S001-07-000123"}
    args.update(overrides)
    return CloudEvent.new(**args)


def test_new_fills_defaults_and_omits_absent_subject_on_the_wire():
    event = new_event()
    assert (event.specversion, event.datacontenttype) == ("1.0", "application/json")
    assert len(event.id) == 26 and event.correlationid == event.id
    assert event.data["lines"][0]["unit_price_minor"] == BIG
    assert event.data["business_day"] == "2024-03-01"
    wire = json.loads(event.to_json())
    assert "subject" not in wire and wire["time"].endswith("Z")
    assert wire["idempotencykey"] == "S001:S001-07-000123" and wire["correlationid"] == wire["id"]


def test_new_keeps_given_ids():
    given = {"id": "01HQ0000000000000000000000", "correlationid": "chain-1", "subject": "T-1"}
    event = new_event(**given)
    assert (event.id, event.correlationid, event.subject) == tuple(given.values())


def test_envelope_round_trips_through_json_with_exact_money():
    event = new_event(subject="S001-07-000123")
    raw = event.to_json()
    assert isinstance(raw, bytes) and b"\n" not in raw and b": " not in raw
    back = CloudEvent.from_json(raw)
    assert back == event
    assert CloudEvent.from_json(raw.decode()) == event
    sale = back.payload()
    assert isinstance(sale, PosSaleV1)
    assert sale == big_sale()
    assert sale.lines[0].unit_price_minor == BIG
    assert sale.total_minor == 3 * BIG - 7 == 299_999_999_990
    assert json.loads(raw)["data"]["total_minor"] == 299_999_999_990


def test_envelope_beyond_what_the_fast_json_reader_takes_is_read_or_named():
    """orjson reads envelopes; pydantic takes what orjson refuses and names what is wrong."""
    wire = json.loads(new_event().to_json())
    wire["data"]["lines"][0]["unit_price_minor"] = 2**70  # valid JSON, beyond 64 bits
    event = CloudEvent.from_json(json.dumps(wire))
    assert event.data["lines"][0]["unit_price_minor"] == 2**70
    with pytest.raises(ContractError) as refused:
        event.payload()
    assert refused.value.paths == ["data.lines.0.unit_price_minor"]
    with pytest.raises(ContractError, match="invalid event: .*[Ii]nvalid JSON"):
        CloudEvent.from_json(b'{"specversion": "1.0", ')
    with pytest.raises(ContractError) as no_object:
        CloudEvent.from_json(b"[1, 2]")
    assert no_object.value.paths == ["<root>"]
    wire.pop("source")
    with pytest.raises(ContractError) as missing:
        CloudEvent.from_json(json.dumps(wire).encode())
    assert missing.value.paths == ["source"]


def test_new_validates_registered_dict_payload():
    event = new_event(data=valid_sale())
    assert isinstance(event.payload(), PosSaleV1)
    assert event.data["occurred_at"] == "2024-03-01T10:15:00+01:00"
    with pytest.raises(ContractError) as info:
        new_event(data=valid_sale(total_minor=1))
    assert info.value.paths == ["data.total_minor"]


def test_new_rejects_model_of_the_wrong_type():
    with pytest.raises(ContractError) as info:
        new_event(type="pos.return.v1")
    assert info.value.paths == ["data"]


def test_unregistered_type_carries_any_dict_but_has_no_payload():
    event = new_event(type="ops.routes_applied.v4", data={"version": 4})
    assert CloudEvent.from_json(event.to_json()) == event
    with pytest.raises(ContractError, match="ops.routes_applied.v4"):
        event.payload()


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"type": "pos.sale"}, "type"), ({"type": "POS.SALE.V1"}, "type"),
    ({"source": ""}, "source"), ({"idempotencykey": ""}, "idempotencykey"),
    ({"id": "not-a-ulid"}, "id"),
    ({"correlationid": ""}, "correlationid"),
])
def test_new_rejects_bad_envelope_fields(overrides, expected):
    with pytest.raises(ContractError) as info:
        new_event(**overrides)
    assert info.value.paths == [expected]


def test_new_requires_idempotencykey():
    with pytest.raises(TypeError):
        CloudEvent.new("pos.sale.v1", "store/S001/pos/07", big_sale())  # type: ignore[call-arg]


def _wire(**changes) -> str:
    """A valid event's JSON with attributes changed; None removes the attribute."""
    wire = json.loads(new_event().to_json())
    wire.update(changes)
    return json.dumps({k: v for k, v in wire.items() if v is not None})


@pytest.mark.parametrize(("changes", "expected"), [
    ({"specversion": "0.3"}, ["specversion"]),
    ({"time": "2024-03-01T10:15:00"}, ["time"]),
    ({"type": "pos.sale.v1.extra"}, ["type"]),
    ({"data": "a string"}, ["data"]),
    ({"traceparent": "00-abc"}, ["traceparent"]),
    ({"idempotencykey": None}, ["idempotencykey"]),
    ({"source": None, "data": None}, ["source", "data"]),
])
def test_from_json_names_bad_attributes(changes, expected):
    with pytest.raises(ContractError) as info:
        CloudEvent.from_json(_wire(**changes))
    assert info.value.paths == expected


def test_from_json_without_correlationid_correlates_to_own_id():
    event = CloudEvent.from_json(_wire(correlationid=None, id="01HQ0000000000000000000000"))
    assert event.correlationid == event.id == "01HQ0000000000000000000000"


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b"null"])
def test_invalid_json_is_a_contract_error(raw):
    with pytest.raises(ContractError) as info:
        CloudEvent.from_json(raw)
    assert info.value.errors


def test_payload_reports_nested_path():
    wire = json.loads(new_event().to_json())
    wire["data"]["lines"][0]["quantity"] = 0
    event = CloudEvent.from_json(json.dumps(wire))  # envelope alone is fine
    with pytest.raises(ContractError) as info:
        event.payload()
    assert info.value.paths == ["data.lines.0.quantity"]
    assert "data.lines.0.quantity" in str(info.value)


def test_naive_time_is_rejected_in_python_too():
    attrs = {"type": "pos.sale.v1", "source": "s", "data": {}, "idempotencykey": "k"}
    with pytest.raises(ValidationError):
        CloudEvent(**attrs, time=datetime(2024, 3, 1, 10, 0))
    assert CloudEvent(**attrs, time=datetime(2024, 3, 1, 10, tzinfo=timezone.utc)).time.hour == 10
