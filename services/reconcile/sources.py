"""Read the two sides reconciliation holds the agent's totals against: the
legacy ERP's sales headers (SLS_HDR, read-only, through SQLAlchemy Core) and
the loyalty points files the outbound file drop wrote (complete files only:
those with their done marker). The digests read the same rows as a stream, so
a day costs no memory however long it is."""
from __future__ import annotations

from datetime import date
from pathlib import Path

from sqlalchemy import BigInteger, Column, Engine, MetaData, String, Table, select

from legacy_wrappers.filedrop.config import DropOut
from contracts.control import TxnDigest
from services.reconcile.compare import ERP_KIND, LOYALTY_KIND, ErpDoc, PointsRow

# The columns of the legacy ERP's sales header we read (demo/legacy_erp/schema.py is the contract).
SLS_HDR = Table(
    "SLS_HDR", MetaData(),
    Column("DOC_NO", String(12), primary_key=True),
    Column("DOC_TYPE", String(1)),
    Column("STORE_NO", String(8)),
    Column("POS_TXN_ID", String(40)),
    Column("TXN_DATE", String(8)),
    Column("TOTAL_CENTS", BigInteger),
    Column("CURRENCY", String(3)),
    Column("CREATED_TS", String(26)),
)


def _yyyymmdd(day: date) -> str:
    return day.strftime("%Y%m%d")


def _docs_query(store_id: str, day: date):
    c = SLS_HDR.c
    return (select(c.DOC_TYPE, c.POS_TXN_ID, c.TOTAL_CENTS, c.CURRENCY, c.DOC_NO, c.CREATED_TS)
            .where(c.STORE_NO == store_id, c.TXN_DATE == _yyyymmdd(day), c.DOC_TYPE.in_(list(ERP_KIND))))


def erp_docs(engine: Engine, store_id: str, day: date) -> list[ErpDoc]:
    with engine.connect() as conn:
        rows = conn.execute(_docs_query(store_id, day).order_by(SLS_HDR.c.DOC_NO)).all()
    return [ErpDoc(ERP_KIND[t], txn, total, currency, doc_no, created or "")
            for t, txn, total, currency, doc_no, created in rows]


def erp_digest(engine: Engine, store_id: str, day: date) -> dict[str, TxnDigest]:
    """Per kind, the digest of the day's documents (contracts.control.TxnDigest)."""
    out = {kind: TxnDigest() for kind in ERP_KIND.values()}
    with engine.connect() as conn:
        for t, txn, total, currency, *_ in conn.execution_options(yield_per=2000).execute(_docs_query(store_id, day)):
            kind = ERP_KIND[t]
            out[kind].add_txn(kind, txn, total, currency)
    return out


def erp_stores(engine: Engine, day: date) -> set[str]:
    """Stores with any sale or return document on `day`."""
    c = SLS_HDR.c
    with engine.connect() as conn:
        return set(conn.execute(select(c.STORE_NO).where(c.TXN_DATE == _yyyymmdd(day)).distinct()).scalars())


def points_rows(drop: DropOut, store_id: str, day: date) -> list[PointsRow]:
    """Records of `store_id` and `day` in every complete points file of the drop's folder."""
    return list(_points(drop, store_id, day))


def points_digest(drop: DropOut, store_id: str, day: date) -> dict[str, TxnDigest]:
    """Per kind, the digest of the day's points records (kind, pos id)."""
    out = {kind: TxnDigest() for kind in LOYALTY_KIND.values()}
    for row in _points(drop, store_id, day):
        out[row.kind].add_points(row.kind, row.pos_txn_id)
    return out


def _points(drop: DropOut, store_id: str, day: date):
    fields = {f.name: (f.start - 1, f.end) for f in drop.fields}

    def value(line: str, name: str) -> str:
        start, end = fields[name]
        return line[start:end].strip()

    wanted_day = _yyyymmdd(day)
    folder = Path(drop.folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob(f"{drop.prefix}_*{drop.suffix}")):
        if not path.with_name(path.name + drop.marker_suffix).exists():
            continue  # not complete yet
        try:
            f = path.open(encoding="utf-8")
        except FileNotFoundError:
            continue  # taken meanwhile (the loyalty job, or retention)
        with f:
            for line in f:  # the header and the trailer have no kind
                line = line.rstrip("\r\n")
                kind = LOYALTY_KIND.get(value(line, "kind"))
                if kind and value(line, "store_id") == store_id and value(line, "business_day") == wanted_day:
                    yield PointsRow(kind, value(line, "pos_txn_id"), int(value(line, "points") or 0), path.name)
