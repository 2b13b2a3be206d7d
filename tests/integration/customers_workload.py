"""A day of customer changes from every source, interleaved, and what the rules say must come of it.

Customer n (C00000001 ..) is known to the CRM (its users created the profile), is in the
CRM's nightly file (older than anything the CRM's users did since, every consent granted),
and depending on n:
- n % 3 == 0: a CRM user renames them; n % 15 == 0: and withdraws the e-mail consent;
- n % 2 == 0: enrolled at a till (card LC<n>, the till's spelling of the name, a household
  and a reward preference, the e-mail in capitals);
- n % 4 == 0: a legacy ERP program sets a tax id and a billing address, and a phone number
  the ERP does not own.
`expected` states, per attribute, the value the rules must choose (and every system must hold).
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

from tests.integration.customers_estate import CustomersEstate

FILE_STAMP = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat(timespec="seconds")


def cid(n: int) -> str:
    return f"C{n:08d}"


def card(n: int) -> str:
    return f"LC{n:010d}"


def base(n: int) -> dict:
    return {"customer_id": cid(n), "name": f"Customer {n}", "email": f"c{n}@example.com",
            "phone": f"+49 30 {n:07d}", "consent": {"marketing_email": True, "sms": True, "data_sharing": True}}


def file_row(n: int) -> list:
    return [cid(n), f"Customer {n}", f"c{n}@example.com", f"+49 30 {n:07d}", card(n), FILE_STAMP, "Y", "Y", "Y"]


def expected(n: int) -> dict:
    renamed, withdrawn = n % 3 == 0, n % 15 == 0
    member, erp_edit = n % 2 == 0, n % 4 == 0
    return {
        "name": f"CRM Name {n}" if renamed else f"Customer {n}",              # CRM owns contact details
        "email": f"c{n}@example.com",
        "phone": f"+49 30 {n:07d}",                                             # the ERP's phone is overruled
        "loyalty_card": card(n),
        "consent_marketing_email": not withdrawn,                               # the older file cannot re-grant
        "consent_sms": True, "consent_data_sharing": True,
        "tax_id": f"DE{n:09d}" if erp_edit else None,                          # the ERP owns billing and tax
        "billing_address": f"{n} Main Street" if erp_edit else None,
        "household_id": f"H{n // 10}" if member else None,                     # loyalty owns households
        "reward_preference": "vouchers" if member else None,
    }


def run(estate: CustomersEstate, count: int, during=None) -> None:
    """Seed the CRM, then run the four sources side by side; `during()` runs meanwhile (a kill)."""
    estate.crm_users_write([base(n) for n in range(1, count + 1)])
    sources = [
        lambda: estate.nightly_file("customers_20261207.csv", [file_row(n) for n in range(1, count + 1)]),
        lambda: _crm_edits(estate, count),
        lambda: _enrolments(estate, count),
        lambda: _erp_edits(estate, count),
    ]
    threads = [threading.Thread(target=source) for source in sources]
    for thread in threads:
        thread.start()
    if during is not None:
        during()
    for thread in threads:
        thread.join(300)


def _crm_edits(estate: CustomersEstate, count: int) -> None:
    edits = [{**base(n), "name": f"CRM Name {n}",
              "consent": {**base(n)["consent"], "marketing_email": n % 15 != 0}} for n in range(3, count + 1, 3)]
    for start in range(0, len(edits), 50):
        estate.crm_users_write(edits[start:start + 50])
        time.sleep(0.05)


def _enrolments(estate: CustomersEstate, count: int) -> None:
    for n in range(2, count + 1, 2):
        estate.enrol(card(n), name=f"CUSTOMER {n} (till)", email=f"C{n}@EXAMPLE.COM", household_id=f"H{n // 10}",
                     reward_preference="vouchers")


def _erp_edits(estate: CustomersEstate, count: int) -> None:
    """A legacy program edits the accounts as they appear (the hub creates them)."""
    todo = set(range(4, count + 1, 4))
    deadline = time.monotonic() + 240
    while todo and time.monotonic() < deadline:
        for n in sorted(todo):
            if estate.legacy_update("UPDATE CUST_MST SET TAX_ID = ?, BILL_ADDR = ?, PHONE = ?, UPD_TS = ? "
                                    "WHERE CUST_NO = ?", f"DE{n:09d}", f"{n} Main Street", f"+1 555 {n}",
                                    datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f"), cid(n)):
                todo.discard(n)
        time.sleep(0.2)
    assert not todo, f"{len(todo)} ERP accounts never appeared"


def differences(estate: CustomersEstate, count: int, changed: dict[int, dict] | None = None) -> list[str]:
    """Every place a system does not hold what the rules decided (empty: converged); `changed`:
    customer n's expected values a test changed since."""
    crm, members, accounts = estate.crm_profiles(), estate.members(), estate.accounts()
    found = []
    for n in range(1, count + 1):
        want, golden = {**expected(n), **(changed or {}).get(n, {})}, estate.golden_of("crm", cid(n))
        consents = (want["consent_marketing_email"], want["consent_sms"], want["consent_data_sharing"])
        held = crm.get(cid(n))
        if held != (want["name"], want["email"], want["phone"], *map(int, consents), golden):
            found.append(f"crm {cid(n)}: {held}")
        yn = tuple("Y" if c else "N" for c in consents)
        held = accounts.get(cid(n))
        if held != (want["name"], want["email"], want["phone"], want["loyalty_card"], want["tax_id"],
                    want["billing_address"], *yn, golden):
            found.append(f"erp {cid(n)}: {held}")
        if n % 2 == 0:
            held = members.get(card(n))
            if held != (want["name"], want["email"], want["phone"], want["household_id"], want["reward_preference"],
                        *map(int, consents), golden):
                found.append(f"loyalty {card(n)}: {held}")
    return found
