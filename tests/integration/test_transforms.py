"""The sql_row transform through the SQL adapter into a real PostgreSQL table (the rest of the
transforms' tests need no server: tests/unit/test_transforms.py)."""
from __future__ import annotations

import json
import secrets
from decimal import Decimal

import pytest
import sqlalchemy as sa

from courier import adapters
from courier.app.domain import governance, transforms
from tests.support.services import ADMIN_URL
from tests.unit.test_transforms import KEY, example, json_envelope

pytestmark = pytest.mark.postgres


@pytest.fixture(autouse=True)
def pseudonym_key(monkeypatch):
    monkeypatch.setenv(governance.KEY_VARIABLE, KEY)


def test_sql_row_goes_into_a_table_through_the_sql_adapter():
    """Through courier.adapters.sql into a real PostgreSQL table, amounts into NUMERIC columns."""
    table = f"ledger_{secrets.token_hex(4)}"
    columns = {"event_id": "TEXT", "service_date": "TEXT", "cost_centre": "TEXT", "gl_account": "TEXT",
               "code": "TEXT", "quantity": "NUMERIC", "amount": "NUMERIC(12,2)", "currency": "TEXT",
               "patient_ref": "TEXT"}
    engine = sa.create_engine(ADMIN_URL)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table} (delivery_id TEXT PRIMARY KEY, "
                             + ", ".join(f"{c} {t}" for c, t in columns.items()) + ")")
    try:
        url = f"sql+{ADMIN_URL}?table={table}&" + "&".join(f"column.{c}=json:{c}" for c in columns)
        adapter = adapters.open_adapter(url, timeout=5)
        for number, name in enumerate(["supply.consumed-implant", "charge.posted-ct-scan"]):
            stored = json_envelope(example(name), "deidentified")
            body, content_type = transforms.sql_row(stored)
            assert list(json.loads(body)) == list(transforms.LEDGER_COLUMNS)
            adapter.send(adapters.Outgoing(f"d-{number}", stored.message_id, "c", body, content_type,
                                           stored.message_type))
        with engine.connect() as conn:
            got = [tuple(r) for r in conn.exec_driver_sql(f"SELECT {', '.join(columns)} FROM {table} "
                                                           "ORDER BY delivery_id")]
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table}")
        engine.dispose()
    assert got == [
        ("sup-OR-20240611-3", None, "CC-6120", "6120-400", "MDT-PM-ADAPTA-01", Decimal("1"), None, None,
         governance.pseudonym("MRN-0010452", "patient", KEY.encode())),
        ("chg-TXN-884120", None, "CC-4100", "4100-310", "74177", Decimal("1"), Decimal("1250.00"), "USD",
         governance.pseudonym("MRN-0048213", "patient", KEY.encode()))]
