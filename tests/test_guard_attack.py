"""The capture guard (columns checked at their install-time attribute numbers with pg_identify_object_as_address, a
typed key's type with pg_attribute; the registry's attnums and atttypes), attacked as an adversarial DBA would: DDL
between and inside the writers' transactions, odd names, partitions, a registry of the previous release."""

from __future__ import annotations

import asyncpg
import pytest
from test_keys_attack import BLOBS, BLOBS_MAPPING, ITEMS, ITEMS_MAPPING, _logged, _status
from test_sync import deep
from test_sync_attack import PARTITIONED, PARTITIONED_MAPPING, _night

from conftest import run, scalar, sql
from migrate_data import api


async def _rr_writer_after_ddl(url: str, ddl: str, writes: list[str], **server_settings: str) -> None:
    """A REPEATABLE READ writer whose snapshot is taken before ``ddl`` (another session) commits, then writes."""
    writer = await asyncpg.connect(url, server_settings=server_settings)
    dba = await asyncpg.connect(url, server_settings={"lock_timeout": "5s"})
    try:
        tr = writer.transaction(isolation="repeatable_read")
        await tr.start()
        await writer.fetchval("SELECT 1")  # its snapshot: before the DDL (no lock on the table)
        await dba.execute(ddl)
        try:
            for w in writes:
                await writer.execute(w)
            await tr.commit()
        except BaseException:
            await tr.rollback()
            raise
    finally:
        await writer.close()
        await dba.close()


# -- 1. the type check reads pg_attribute with the writer's snapshot ---------------------------------------------------
def test_a_repeatable_read_writer_is_not_failed_by_capture_when_a_bytea_key_changed_type_after_its_snapshot(
    db_url, tmp_path
):
    """The type check was a query on pg_attribute: in REPEATABLE READ it saw the column as bytea still, passed, and
    encode() was called on a text column.  It reads the type of the transition table's column now."""
    _night(db_url, tmp_path, BLOBS, BLOBS_MAPPING)
    run(
        _rr_writer_after_ddl(
            db_url,
            "ALTER TABLE blobs ALTER COLUMN b TYPE text USING encode(b, 'hex')",
            ["UPDATE blobs SET v = 'changed' WHERE b = '03'", "INSERT INTO blobs VALUES ('ff', 'new')"],
        )
    )  # committed: capture did not fail it (its old snapshot does not see the rewritten rows: it updated none)
    assert scalar(db_url, "SELECT v FROM blobs WHERE b = 'ff'") == "new"
    assert _logged(db_url) == [[]]  # the insert, as "the table changed": its key is text now


STAMPS = """
CREATE TABLE stamps (t timestamptz PRIMARY KEY, v text);
CREATE TABLE sellos (t timestamptz PRIMARY KEY, v text);
INSERT INTO stamps SELECT timestamptz '2024-01-01 00:00:00+00' + i * interval '1 hour', 'v' || i
FROM generate_series(1, 20) i;
"""
STAMPS_MAPPING = """
tables:
  - source: stamps
    target: sellos
    columns: {t: t, v: v}
"""


def test_a_repeatable_read_writers_change_is_not_logged_under_another_key_when_a_timestamptz_key_became_timestamp(
    db_url, tmp_path
):
    """timestamptz -> timestamp after the writer's snapshot: the stale type check passes, and the timestamptz form
    (timezone('UTC', t) rendered by to_jsonb in the writer's TimeZone) of a timestamp is another instant: the key
    logged is not the row's.  In READ COMMITTED the same write is logged as "the table changed"."""
    s = _night(db_url, tmp_path, STAMPS, STAMPS_MAPPING)
    run(
        _rr_writer_after_ddl(
            db_url,
            "SET TimeZone = 'UTC'; ALTER TABLE stamps ALTER COLUMN t TYPE timestamp",
            ["UPDATE stamps SET v = 'changed' WHERE t = timestamp '2024-01-01 03:00:00'"],
            TimeZone="Asia/Kolkata",
        )
    )
    assert scalar(db_url, "SELECT v FROM stamps WHERE t = timestamp '2024-01-01 03:00:00'") == "changed"
    logged = _logged(db_url)
    sql(db_url, "SET TimeZone = 'UTC'; ALTER TABLE stamps ALTER COLUMN t TYPE timestamptz")  # the DBA undoes it
    run(api.sync(s, ["night"]))
    assert scalar(db_url, "SELECT v FROM sellos WHERE t = timestamptz '2024-01-01 03:00:00+00'") == "changed", logged


# -- 2. a registry written by the previous release ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "previous",
    [
        "ALTER TABLE migrate_data.capture DROP COLUMN attnums, DROP COLUMN atttypes, DROP COLUMN shape",  # its shape
        "UPDATE migrate_data.capture SET attnums = NULL, atttypes = NULL, shape = NULL",  # its rows, columns added
    ],
    ids=["registry without the columns", "rows without them"],
)
def test_status_and_sync_of_a_phase_captured_by_the_previous_release_do_not_fail_on_the_registry(
    db_url, tmp_path, previous
):
    """The previous release's registry has no attnums column, and only an install (ensure_capture) adds it: status
    and sync after the upgrade, before any install, must not name it; its rows have none either."""
    s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)
    sql(db_url, previous)
    sql(db_url, "UPDATE items SET v = 'changed' WHERE id = 3")
    assert _status(s) == "on"
    (p,) = run(api.sync(s, ["night"])).phases
    assert p.waiting == 0 and scalar(db_url, "SELECT v FROM articulos WHERE id = 3") == "changed"


# -- 3. a column dropped and added again under its name ----------------------------------------------------------------
LOOKUP = """
CREATE TABLE countries (code text PRIMARY KEY, name text);
CREATE TABLE shops (id int PRIMARY KEY, country text, v text);
CREATE TABLE tiendas (id int PRIMARY KEY, pais text, v text);
INSERT INTO countries VALUES ('es', 'Spain'), ('fr', 'France');
INSERT INTO shops SELECT i, CASE WHEN i % 2 = 0 THEN 'es' ELSE 'fr' END, 'v' || i FROM generate_series(1, 20) i;
"""
LOOKUP_MAPPING = """
tables:
  - source: shops
    target: tiendas
    columns:
      id: id
      v: v
      pais: {lookup: {table: countries, on: country, key: code, column: name}}
"""


def test_sync_goes_on_after_a_lookups_column_is_dropped_and_added_again_under_its_name(db_url, tmp_path):
    """An ORM changes a column's type by DROP + ADD: the name is back, at another number.  The guard logs every write
    as "the table changed"; status says COLUMN MOVED (not GONE: no other column is where it was), and sync captures
    the table again with the new numbers, then re-derives it."""
    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    sql(
        db_url,
        "BEGIN; ALTER TABLE countries DROP COLUMN name; ALTER TABLE countries ADD COLUMN name text; "
        "UPDATE countries SET name = CASE code WHEN 'es' THEN 'España' ELSE 'Francia' END; COMMIT",
    )
    assert _status(s) == "COLUMN MOVED"
    (p,) = run(api.sync(s, ["night"])).phases
    assert p.waiting == 0 and scalar(db_url, "SELECT pais FROM tiendas WHERE id::text = '2'") == "España"
    assert _status(s) == "on"
    sql(db_url, "UPDATE countries SET name = 'Francia!' WHERE code = 'fr'")
    assert _logged(db_url) == [["fr"]]  # by key again


# -- 4. a key column of another type, in a session whose trigger function has cached its plans -----------------------
@pytest.mark.parametrize(
    "ddl", ["ALTER TABLE items ALTER COLUMN id TYPE bigint", "ALTER TABLE items ALTER COLUMN id TYPE text"]
)
def test_a_session_that_wrote_before_a_key_changed_type_is_not_failed_by_its_cached_capture_plans(
    db_url, tmp_path, ddl
):
    s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)

    async def scenario() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute("UPDATE items SET v = 'one' WHERE id = 1")  # the function's plans are cached
            await conn.execute(ddl)
            await conn.execute("UPDATE items SET v = 'two' WHERE id::text = '2'")
            other = await asyncpg.connect(db_url)
            try:
                await other.execute(
                    ddl.replace("TYPE bigint", "TYPE int").replace("TYPE text", "TYPE int USING id::int")
                )
            finally:
                await other.close()
            await conn.execute("UPDATE items SET v = 'three' WHERE id::text = '3'")
        finally:
            await conn.close()

    run(scenario())
    (p,) = run(api.sync(s, ["night"])).phases
    assert [r[0] for r in sql(db_url, "SELECT v FROM articulos WHERE id <= 3 ORDER BY id")] == ["one", "two", "three"]


# -- 5. a level of partitions between the root and the leaves ---------------------------------------------------------
SUBPART = """
CREATE TABLE ev (id int NOT NULL, d date NOT NULL, k text NOT NULL, v text, PRIMARY KEY (id, d, k)) PARTITION BY RANGE (d);
CREATE TABLE ev_jan PARTITION OF ev FOR VALUES FROM ('2024-01-01') TO ('2024-02-01') PARTITION BY LIST (k);
CREATE TABLE ev_jan_a PARTITION OF ev_jan FOR VALUES IN ('a');
CREATE TABLE ev_jan_b PARTITION OF ev_jan DEFAULT;
CREATE TABLE ev_t (id int NOT NULL, d date NOT NULL, k text NOT NULL, v text, PRIMARY KEY (id, d, k));
INSERT INTO ev SELECT i, date '2024-01-01' + i, CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END, 'v' || i
FROM generate_series(1, 20) i;
"""
SUBPART_MAPPING = """
tables:
  - source: ev
    target: ev_t
    columns: {id: id, d: d, k: k, v: v}
"""


def test_sync_applies_writes_made_into_a_partition_that_is_itself_partitioned(db_url, tmp_path):
    """Statement-level triggers fire on the relation the statement names only; the triggers are on the root and the
    leaves (LEAVES_SQL: isleaf), not on ev_jan."""
    s = _night(db_url, tmp_path, SUBPART, SUBPART_MAPPING)
    sql(db_url, "UPDATE ev_jan SET v = 'mid' WHERE id = 4")
    sql(db_url, "INSERT INTO ev_jan VALUES (99, '2024-01-30', 'a', 'new')")
    assert _logged(db_url) != [], "nothing logged"
    run(api.sync(s, ["night"]))
    assert scalar(db_url, "SELECT v FROM ev_t WHERE id = 4") == "mid"
    assert scalar(db_url, "SELECT v FROM ev_t WHERE id = 99") == "new"


# -- 6. odd names --------------------------------------------------------------------------------------------------
ODD = r"""
CREATE SCHEMA "Sch.""e\ma";
CREATE TABLE "Sch.""e\ma"."Tab.""le\" ("I'd.""\" int PRIMARY KEY, "ñandú ☃ x" text UNIQUE NOT NULL, v text);
CREATE TABLE odd_t (id int PRIMARY KEY, n text, v text);
INSERT INTO "Sch.""e\ma"."Tab.""le\" SELECT i, 'n' || i, 'v' || i FROM generate_series(1, 10) i;
"""
ODD_MAPPING = r"""
tables:
  - source: '"Sch.""e\ma"."Tab.""le\"'
    target: odd_t
    batch_by: ["ñandú ☃ x"]
    columns: {id: "I'd.\"\\", n: "ñandú ☃ x", v: v}
"""


@pytest.mark.parametrize("scs", ["on", "off"])
def test_writes_to_a_table_whose_names_need_quoting_are_logged_by_key(db_url, tmp_path, scs):
    s = _night(db_url, tmp_path, ODD, ODD_MAPPING)

    async def scenario() -> None:
        conn = await asyncpg.connect(db_url, server_settings={"standard_conforming_strings": scs})
        try:
            await conn.execute('UPDATE "Sch.""e\\ma"."Tab.""le\\" SET v = \'changed\' WHERE "I\'d.""\\" = 3')
        finally:
            await conn.close()

    run(scenario())
    assert _logged(db_url) == [["n3", "3"]] or _logged(db_url) == [["3", "n3"]], _logged(db_url)
    run(api.sync(s, ["night"]))
    assert scalar(db_url, "SELECT v FROM odd_t WHERE id = 3") == "changed"


# -- 7. a key of another type whose text form does not fail but says another value (READ COMMITTED) -----------------
DAYS = """
CREATE TABLE days (d date PRIMARY KEY, v text);
CREATE TABLE dias (d date PRIMARY KEY, v text);
INSERT INTO days SELECT date '2024-02-01' + i, 'v' || i FROM generate_series(0, 27) i;
"""
DAYS_MAPPING = """
tables:
  - source: days
    target: dias
    columns: {d: d, v: v}
"""


def test_a_write_while_a_date_key_is_briefly_a_timestamptz_is_not_logged_under_another_day(db_url, tmp_path):
    """Only bytea, timestamptz, float and interval keys were checked against their install-time type; a date key that
    a DBA turns into timestamptz (and back) passed the guard, and to_jsonb wrote the instant in the writer's TimeZone:
    another day, which sync re-derived instead.  A date key's type is checked too now."""
    s = _night(db_url, tmp_path, DAYS, DAYS_MAPPING)
    sql(db_url, "SET TimeZone = 'UTC'; ALTER TABLE days ALTER COLUMN d TYPE timestamptz")
    run(_rr_free_writer(db_url, "UPDATE days SET v = 'changed' WHERE d = '2024-02-13 00:00+00'", "America/New_York"))
    sql(db_url, "SET TimeZone = 'UTC'; ALTER TABLE days ALTER COLUMN d TYPE date")
    logged = _logged(db_url)
    run(api.sync(s, ["night"]))
    assert scalar(db_url, "SELECT v FROM dias WHERE d = '2024-02-13'") == "changed", f"logged {logged}"
    assert deep(s, "night") == (True, [])


async def _rr_free_writer(url: str, statement: str, tz: str) -> None:
    conn = await asyncpg.connect(url, server_settings={"TimeZone": tz})
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def test_a_bytea_key_retyped_to_a_domain_is_captured_again_by_key_at_the_next_sync(db_url, tmp_path):
    """bytea -> a domain over bytea (no rewrite, the same values): the guard's type check fails and every write is
    "some row changed"; status must say so (COLUMN MOVED), and sync captures the table again with the new type."""
    s = _night(db_url, tmp_path, BLOBS, BLOBS_MAPPING)
    sql(db_url, "CREATE DOMAIN blob AS bytea; ALTER TABLE blobs ALTER COLUMN b TYPE blob")
    sql(db_url, "UPDATE blobs SET v = 'changed' WHERE b = '\\x03'")
    assert _logged(db_url) == [[]] and _status(s) == "COLUMN MOVED"
    (p,) = run(api.sync(s, ["night"])).phases
    assert p.waiting == 0 and scalar(db_url, "SELECT v FROM datos WHERE b = '\\x03'") == "changed"
    sql(db_url, "UPDATE blobs SET v = 'again' WHERE b = '\\x04'")
    assert _logged(db_url) == [["\\x04"]] and _status(s) == "on"


# -- 8. what held ----------------------------------------------------------------------------------------------------


def test_a_write_to_a_partition_attached_after_install_with_other_attnums_is_not_failed_by_capture(db_url, tmp_path):
    _night(db_url, tmp_path, PARTITIONED, PARTITIONED_MAPPING)
    sql(
        db_url,
        "CREATE TABLE ev_mar (junk int, junk2 int, id int NOT NULL, d date NOT NULL, v text, PRIMARY KEY (id, d)); "
        "ALTER TABLE ev_mar DROP COLUMN junk; ALTER TABLE ev_mar DROP COLUMN junk2; "
        "ALTER TABLE ev ATTACH PARTITION ev_mar FOR VALUES FROM ('2024-03-01') TO ('2024-04-01')",
    )
    sql(db_url, "INSERT INTO ev VALUES (100, '2024-03-05', 'via root')")
    sql(db_url, "INSERT INTO ev_mar VALUES (101, '2024-03-06', 'direct')")
    sql(db_url, "UPDATE ev SET v = 'x' WHERE id IN (5, 100)")
    assert ["100", "2024-03-05"] in _logged(db_url)


def test_a_writer_that_renames_a_key_and_back_in_its_own_transaction_is_captured(db_url, tmp_path):
    s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)
    sql(
        db_url,
        "BEGIN ISOLATION LEVEL REPEATABLE READ; UPDATE items SET v = 'a' WHERE id = 1; "
        "ALTER TABLE items RENAME COLUMN id TO item_id; UPDATE items SET v = 'b' WHERE item_id = 2; "
        "ALTER TABLE items DROP COLUMN v; ALTER TABLE items ADD COLUMN v text; "
        "ALTER TABLE items RENAME COLUMN item_id TO id; UPDATE items SET v = 'c' WHERE id = 3; COMMIT",
    )
    assert _logged(db_url) == [["1"], [], ["3"]]
    (p,) = run(api.sync(s, ["night"])).phases
    assert scalar(db_url, "SELECT v FROM articulos WHERE id = 3") == "c"
    assert deep(s, "night") == (True, [])


def test_a_writer_with_hostile_search_path_and_operators_is_not_failed_by_the_guard(db_url, tmp_path):
    _night(db_url, tmp_path, BLOBS, BLOBS_MAPPING)
    sql(
        db_url,
        "CREATE SCHEMA evil; CREATE FUNCTION evil.f(oid, oid) RETURNS bool LANGUAGE sql AS 'SELECT 1/0 = 1'; "
        "CREATE OPERATOR evil.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = evil.f); "
        "CREATE FUNCTION evil.g(text, text) RETURNS bool LANGUAGE sql AS 'SELECT 1/0 = 1'; "
        "CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.g); "
        "CREATE FUNCTION evil.pg_identify_object_as_address(oid, oid, int) RETURNS int LANGUAGE sql AS 'SELECT 1/0'",
    )
    run(
        _rr_free_writer(
            db_url, "SET search_path = evil, pg_catalog; UPDATE public.blobs SET v = 'x' WHERE b = '\\x03'", "UTC"
        )
    )
    assert _logged(db_url) == [["\\x03"]]
