"""routing/edge_auth.py: whatever a client puts in the four headers, the answer is an
AuthError (401), never another exception (a 500)."""
from __future__ import annotations

import time

import pytest

from routing.edge_auth import AuthError, TerminalKeys, Verifier, signed_headers

pytestmark = pytest.mark.unit


@pytest.fixture
def verifier(tmp_path):
    keys = TerminalKeys(tmp_path / "terminal_keys.json")
    return Verifier(keys), bytes.fromhex(keys.add("07"))


@pytest.mark.parametrize("header, value", [
    ("X-Retailbus-Timestamp", "\u00b2"),  # str.isdigit() says yes, int() says no
    ("X-Retailbus-Timestamp", "\u0661\u0662"),  # Arabic-Indic digits
    ("X-Retailbus-Timestamp", "+1"),
    ("X-Retailbus-Timestamp", "9" * 40),
    ("X-Retailbus-Signature", "\u00e9" * 64),  # hmac.compare_digest raises on non-ASCII text
    ("X-Retailbus-Signature", "zz"),
    ("X-Retailbus-Nonce", "abcdefgh\n"),
    ("X-Retailbus-Terminal", "\u00e9"),
])
def test_a_malformed_auth_header_is_an_auth_error(verifier, header, value):
    check, key = verifier
    body = b"{}"
    headers = {**signed_headers("07", key, "POST", "/erp/sales", body), header: value}
    with pytest.raises(AuthError, match=header):
        check.verify(headers, "POST", "/erp/sales", body)


def test_a_correct_signature_in_upper_case_hex_is_accepted(verifier):
    check, key = verifier
    headers = signed_headers("07", key, "POST", "/erp/sales", b"{}")
    headers["X-Retailbus-Signature"] = headers["X-Retailbus-Signature"].upper()
    assert check.verify(headers, "POST", "/erp/sales", b"{}", now=time.time()) == "07"
