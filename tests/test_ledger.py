"""The ledger owns its schema: versioned DDL applied in order, an older ledger upgraded in place, a newer refused."""

from __future__ import annotations

import asyncpg
import pytest

from conftest import run, scalar, sql
from migrate_data import ledger
from migrate_data.errors import BadInput


async def _ensure(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await ledger.ensure(conn)
    finally:
        await conn.close()


def test_a_ledger_from_before_versions_is_upgraded_in_place_and_keeps_its_records(db_url):
    sql(db_url, ledger.DDL)  # what every release before the version table created
    sql(db_url, "INSERT INTO migrate_data.runs (kind, phase, status) VALUES ('run', 'phase2a', 'done')")
    run(_ensure(db_url))
    assert scalar(db_url, "SELECT array_agg(version ORDER BY version) FROM migrate_data.ledger_version") == list(
        range(1, len(ledger.VERSIONS) + 1)
    )
    assert scalar(db_url, "SELECT count(*) FROM migrate_data.runs WHERE phase = 'phase2a' AND status = 'done'") == 1
    run(_ensure(db_url))  # a second time changes nothing
    assert scalar(db_url, "SELECT count(*) FROM migrate_data.ledger_version") == len(ledger.VERSIONS)


def test_a_ledger_written_by_a_newer_release_is_refused_and_left_as_it_is(db_url):
    run(_ensure(db_url))
    newer = len(ledger.VERSIONS) + 1
    sql(db_url, f"INSERT INTO migrate_data.ledger_version (version) VALUES ({newer})")
    with pytest.raises(BadInput, match=f"is version {newer}, written by a newer migrate-data"):
        run(_ensure(db_url))
    assert scalar(db_url, "SELECT max(version) FROM migrate_data.ledger_version") == newer
