"""The original sale of each return being posted, as the ERP holds it: the `original` of
erp.return_posted.v1, what the return process judges its policy by (services/returns).

Per return: the sale's business day, card and lines (units and the amount paid after
discounts), and what the returns posted before it took back, per SKU. "Before" is by
document number, which the posting takes in order, so two returns of one sale posted
at the same moment never both count the other (or neither): the later one sees the
earlier, including one earlier in the same batch of postings, not yet written.
"""
from __future__ import annotations

from collections import defaultdict

from sqlalchemy import and_, select
from sqlalchemy.engine import Connection

from services.erp.ledger import LegacyTables


def _day(yyyymmdd: str) -> str:
    return f"{yyyymmdd[:4]}-{yyyymmdd[4:6]}-{yyyymmdd[6:]}"


def originals(conn: Connection, t: LegacyTables, returns: list[tuple[str, str | None, list]]) -> list[dict | None]:
    """`returns`: (this return's doc_no, its original's doc_no or None, its lines) in posting
    order; the `original` dict of each (None without a posted original)."""
    wanted = sorted({orig for _, orig, _ in returns if orig})
    if not wanted:
        return [None] * len(returns)
    h, ln = t.header.c, t.lines.c
    heads = {r.DOC_NO: r for r in conn.execute(select(h.DOC_NO, h.TXN_DATE, h.LOYALTY_CARD)
                                                .where(h.DOC_NO.in_(wanted)))}
    sold: dict[str, list[dict]] = defaultdict(list)
    for r in conn.execute(select(ln.DOC_NO, ln.SKU, ln.QTY, ln.LINE_CENTS).where(ln.DOC_NO.in_(wanted))
                          .order_by(ln.DOC_NO, ln.LINE_NO)):
        sold[r.DOC_NO].append({"sku": r.SKU, "quantity": r.QTY, "line_total_minor": r.LINE_CENTS})
    earlier: dict[str, list[tuple[str, str, int, int]]] = defaultdict(list)  # original -> (return doc, sku, units, amount)
    for r in conn.execute(select(h.ORIG_DOC_NO, h.DOC_NO, ln.SKU, ln.QTY, ln.LINE_CENTS)
                          .join(t.lines, ln.DOC_NO == h.DOC_NO)
                          .where(and_(h.DOC_TYPE == "R", h.ORIG_DOC_NO.in_(wanted)))):
        earlier[r.ORIG_DOC_NO].append((r.DOC_NO, r.SKU, r.QTY, r.LINE_CENTS))
    out = []
    for doc_no, orig, lines in returns:
        head = heads.get(orig) if orig else None
        if head is None or not sold.get(orig):
            out.append(None)
        else:
            before: dict[str, list[int]] = {}
            for other, sku, units, amount in earlier[orig]:
                if other < doc_no:
                    entry = before.setdefault(sku, [0, 0])
                    entry[0] += abs(units)
                    entry[1] += abs(amount)
            out.append({"doc_no": orig, "business_day": _day(head.TXN_DATE), "loyalty_card": head.LOYALTY_CARD,
                        "lines": sold[orig],
                        "returned_before": [{"sku": sku, "quantity": q, "line_total_minor": a}
                                            for sku, (q, a) in sorted(before.items())]})
        if orig:  # this one is "before" every later return of the batch
            earlier[orig] += [(doc_no, line.sku, line.quantity, line.line_total_minor) for line in lines]
    return out


def announced_again(conn: Connection, t: LegacyTables, ret, correlationid: str | None):
    """erp.return_posted.v1 once more for a return posted before (the legacy API booked it, or
    a process asked again): the document found, under the first announcement's key."""
    from services.erp import events, ledger

    doc_no = ledger.find_document(conn, t, ret.store_id, "R", ret.pos_txn_id)
    original = ledger.original_of(conn, t, ret)
    [facts] = originals(conn, t, [(doc_no, original, ret.lines)])
    return events.return_posted(ret, doc_no, original, correlationid, facts)
