"""`on_legacy_failure: queue` (routing/modes.py) against a real HTTP server: a sale
goes into the outbox only when the legacy call surely booked nothing; a call
that may have booked it is answered as an error and never queued."""
from __future__ import annotations

import json

import pytest
from werkzeug.wrappers import Response

from legacy_wrappers.legacy_http import LegacyHttpClient
from routing import modes
from routing.route_state import RouteStats
from routing.route_table import parse_route_table
from tests.unit.test_legacy_http import RawErp

pytestmark = pytest.mark.unit

TABLE = """version: 1
legacy: {{base_url: "{url}"}}
routes:
  - {{name: sales, message: pos.sale.v1, legacy: POST /erp/sales, mode: legacy, on_legacy_failure: queue}}
"""


def post_sale(url: str) -> tuple[Response, list[bytes]]:
    """One sale through the legacy path; (the till's answer, what went into the outbox)."""
    table = parse_route_table(TABLE.format(url=url))
    call = modes.Call.decide(table, "pos.sale.v1", "S001", "sales", "POST", "/erp/sales", b'{"TXN_ID": "T1"}')
    queued: list[bytes] = []

    def to_outbox() -> Response:
        queued.append(call.body)
        return Response(json.dumps({"STATUS": "OK", "DOC_NO": "PENDING"}), status=200)
    client = LegacyHttpClient(url, timeout=5)
    return modes.post(client, None, call, RouteStats(), "pos.sale.v1", None, to_outbox), queued


@pytest.mark.parametrize("status", ["500", "502", "504"])
def test_a_sale_the_erp_may_have_booked_is_answered_504_and_not_queued(status):
    erp = RawErp([status])
    try:
        answer, queued = post_sale(erp.url)
    finally:
        erp.close()
    assert queued == [] and len(erp.requests) == 1
    assert answer.status_code == 504
    assert "may have been posted: retry with the same TXN_ID" in json.loads(answer.get_data())["MESSAGE"]


def test_a_sale_the_erp_refused_with_503_is_queued():
    erp = RawErp(["503"])
    try:
        answer, queued = post_sale(erp.url)
    finally:
        erp.close()
    assert queued == [b'{"TXN_ID": "T1"}'] and answer.status_code == 200


def test_a_sale_whose_connection_was_refused_is_queued():
    erp = RawErp([])
    url = erp.url
    erp.close()  # nothing listens: the connect is refused, nothing was sent
    answer, queued = post_sale(url)
    assert queued == [b'{"TXN_ID": "T1"}'] and answer.status_code == 200
