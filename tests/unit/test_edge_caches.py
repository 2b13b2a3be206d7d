"""The agent's per-request memory (routing/expiring.py, the nonce cache in
routing/edge_auth.py, routing/answers.py): kept for the window, never shorter,
bounded, and small per entry, so a store selling all day holds a flat amount."""
from __future__ import annotations

import secrets
import time
import tracemalloc

import pytest
from werkzeug.wrappers import Response

from routing.answers import AnswerCache
from routing.edge_auth import NonceCache, signed_headers
from routing.expiring import ExpiringMap

pytestmark = pytest.mark.unit

KEY = bytes(32)
BODY = b'{"STORE": "S001", "TERMINAL": "07", "TXN_ID": "T1", "TOTAL": 4497}'


def answer() -> Response:
    """An accepted sale's answer, as the agent gives it (a REF of its own)."""
    body = f'{{"STATUS": "OK", "DOC_NO": "PENDING", "REF": "{secrets.token_hex(13)}", "DUPLICATE": false}}'
    return Response(body.encode(), status=200, content_type="application/json")


def bytes_per_entry(fill, n: int = 5000) -> float:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill(n)
        return (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()


def test_an_entry_is_kept_until_its_expiry_and_its_slice_goes_after():
    kept = ExpiringMap(slice_seconds=10, max_entries=100)
    kept.put("a", 1, expires=1005, now=1000)
    kept.put("b", 2, expires=1025, now=1000)
    kept.expire(1004.9)
    assert kept.get("a") == 1 and "b" in kept
    kept.expire(1010)  # a's slice ends at 1010
    assert "a" not in kept and kept.get("b") == 2 and len(kept) == 1
    kept.expire(1030)
    assert len(kept) == 0 and kept.get("b") is None


def test_a_key_put_again_moves_to_its_new_expiry_and_is_counted_once():
    kept = ExpiringMap(slice_seconds=10, max_entries=100)
    kept.put("a", 1, expires=1005, now=1000)
    kept.put("a", 2, expires=1045, now=1000)
    assert len(kept) == 1
    kept.expire(1020)
    assert kept.get("a") == 2


def test_over_max_entries_the_slice_expiring_first_goes():
    kept = ExpiringMap(slice_seconds=1, max_entries=1000)
    for n in range(5000):
        kept.put(n, None, expires=10_000 + n / 100, now=0)  # 100 a slice
    assert len(kept) <= 1000
    assert 4999 in kept and 0 not in kept


def test_a_nonce_is_refused_for_twice_the_window_then_forgotten():
    nonces = NonceCache(window=300)
    assert nonces.claim("07", "nonce-0001", now=1000)
    assert not nonces.claim("07", "nonce-0001", now=1599)
    assert nonces.claim("08", "nonce-0001", now=1599)  # another terminal's nonce is its own
    assert nonces.claim("07", "nonce-0001", now=1000 + 600 + 30)  # past 2 windows and the slice


def test_the_nonce_cache_is_bounded():
    nonces = NonceCache(window=300, max_entries=2000)
    for n in range(10_000):
        assert nonces.claim("07", f"nonce-{n:06d}", now=1000 + n / 100)
    assert len(nonces) <= 2000


def test_a_nonce_costs_under_120_bytes():
    nonces = NonceCache(window=300)
    now = time.time()
    per = bytes_per_entry(lambda n: [nonces.claim("07", secrets.token_urlsafe(16), now) for _ in range(n)])
    assert per < 120, f"{per:.0f} bytes a nonce"


def signed(nonce: str | None = None, body: bytes = BODY) -> dict:
    return signed_headers("07", KEY, "POST", "/erp/sales", body, nonce=nonce)


def test_a_final_answer_is_kept_as_bytes_and_given_to_a_byte_identical_retry():
    answers = AnswerCache(window=300)
    headers = signed()
    first = answers.begin(headers, "POST", "/erp/sales", BODY)
    response = answer()
    answers.finish(first, response)
    assert isinstance(answers._kept.get(first.digest), bytes)
    again = answers.lookup(headers, "POST", "/erp/sales", BODY)
    assert again is not None and again.final
    assert (again.status, again.body, again.content_type) == (200, response.get_data(), "application/json")
    assert answers.lookup(headers, "POST", "/erp/sales", BODY + b" ") is None
    assert answers.lookup(headers, "POST", "/erp/returns", BODY) is None
    assert answers.lookup({**headers, "X-Retailbus-Signature": "0" * 64}, "POST", "/erp/sales", BODY) is None


def test_a_5xx_is_not_final_and_its_retry_is_handled_again():
    answers = AnswerCache(window=300)
    headers = signed()
    first = answers.begin(headers, "POST", "/erp/sales", BODY)
    answers.finish(first, Response(b"{}", status=503))
    again = answers.lookup(headers, "POST", "/erp/sales", BODY)
    assert again is first and not again.final
    answers.finish(answers.again(again), answer())
    assert answers.lookup(headers, "POST", "/erp/sales", BODY).status == 200


def test_an_answer_is_forgotten_once_its_signature_window_has_passed():
    answers = AnswerCache(window=300)
    headers = signed()
    answers.finish(answers.begin(headers, "POST", "/erp/sales", BODY), answer())
    ts = int(headers["X-Retailbus-Timestamp"])
    assert answers.lookup(headers, "POST", "/erp/sales", BODY, now=ts + 299) is not None
    assert answers.lookup(headers, "POST", "/erp/sales", BODY, now=ts + 301) is None
    answers.begin(signed(), "POST", "/erp/sales", BODY, now=ts + 300 + 31)  # expires the first's slice
    assert len(answers) == 1


def test_the_answer_cache_is_bounded():
    answers = AnswerCache(window=300, max_entries=500)
    for n in range(3000):
        answers.finish(answers.begin(signed(f"nonce-{n:06d}"), "POST", "/erp/sales", BODY), answer())
    assert len(answers) <= 500


def test_a_kept_answer_costs_under_320_bytes():
    answers = AnswerCache(window=300)
    requests = [(signed(f"nonce-{n:06d}"), answer()) for n in range(5000)]

    def fill(n):
        for headers, response in requests[:n]:
            answers.finish(answers.begin(headers, "POST", "/erp/sales", BODY), response)
    per = bytes_per_entry(fill)
    assert per < 320, f"{per:.0f} bytes an answer"
