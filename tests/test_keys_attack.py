"""Keys held as text (sql.key_text), the capture trigger's column guard and our sessions' settings, attacked as an
adversarial DBA would: each test names what should hold.  One-table projects (phase ``night``) of their own."""

from __future__ import annotations

import asyncpg
import pytest
from test_partitions import project, settings
from test_sync import apply, deep
from test_sync_attack import _night

from conftest import run, scalar, sql
from migrate_data import api
from migrate_data.errors import MigrationError
from migrate_data.settings import Settings


def _status(s: Settings) -> str:
    (st,) = [p for p in run(api.status(s)) if p.phase == "night"]
    return st.capture


async def _as_writer(url: str, statements: list[str], **server_settings: str) -> None:
    """The application: a session of its own with its own settings (a client library's DateStyle, IntervalStyle …)."""
    conn = await asyncpg.connect(url, server_settings=server_settings)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _logged(url: str) -> list:
    return [list(r[0]) for r in sql(url, "SELECT key FROM migrate_data.changes ORDER BY id")]


# -- the guard: a column renamed, dropped or retyped between nights must not make a write fail ------------------------
ITEMS = """
CREATE TABLE items (id int PRIMARY KEY, v text);
CREATE TABLE articulos (id int PRIMARY KEY, v text);
INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 20) i;
"""
ITEMS_MAPPING = """
tables:
  - source: items
    target: articulos
    columns: {id: id, v: v}
"""


def test_a_repeatable_read_writer_whose_snapshot_is_older_than_a_rename_is_not_failed_by_capture(db_url, tmp_path):
    """The guard read pg_attribute with the writer's snapshot: in REPEATABLE READ that is the transaction's first
    query's, older than the rename the writer's UPDATE already sees; the guard passed and the key's column was gone."""
    s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)

    async def scenario() -> None:
        writer = await asyncpg.connect(db_url)
        dba = await asyncpg.connect(db_url, server_settings={"lock_timeout": "5s"})
        try:
            tr = writer.transaction(isolation="repeatable_read")
            await tr.start()
            await writer.fetchval("SELECT 1")  # its snapshot: taken before the rename (no lock on items)
            await dba.execute("ALTER TABLE items RENAME COLUMN id TO item_id")
            await writer.execute("UPDATE items SET v = 'changed' WHERE item_id = 3")
            await tr.commit()
        finally:
            await writer.close()
            await dba.close()

    run(scenario())
    assert _status(s) == "COLUMN GONE"
    sql(db_url, "ALTER TABLE items RENAME COLUMN item_id TO id")
    (p,) = run(api.sync(s, ["night"])).phases
    assert p.waiting == 0 and scalar(db_url, "SELECT v FROM articulos WHERE id = 3") == "changed"
    assert deep(s, "night") == (True, [])


BLOBS = """
CREATE TABLE blobs (b bytea PRIMARY KEY, v text);
CREATE TABLE datos (b bytea PRIMARY KEY, v text);
INSERT INTO blobs SELECT decode(lpad(to_hex(i), 2, '0'), 'hex'), 'v' || i FROM generate_series(1, 20) i;
"""
BLOBS_MAPPING = """
tables:
  - source: blobs
    target: datos
    columns: {b: b, v: v}
"""


def test_changing_the_type_of_a_bytea_key_column_does_not_make_application_writes_fail(db_url, tmp_path):
    """The key's hex form calls encode(), which takes a bytea: once the column is text, every write of the table named
    it in a call that does not exist, and failed."""
    _night(db_url, tmp_path, BLOBS, BLOBS_MAPPING)
    sql(db_url, "ALTER TABLE blobs ALTER COLUMN b TYPE text USING encode(b, 'hex')")
    sql(db_url, "UPDATE blobs SET v = 'changed' WHERE b = '03'")
    assert scalar(db_url, "SELECT v FROM blobs WHERE b = '03'") == "changed"
    assert _logged(db_url) == [[]]  # "some row of blobs changed": sync re-derives the table


def test_a_key_of_a_domain_over_bytea_is_logged_by_its_value_not_as_the_whole_table(db_url, tmp_path):
    """The guard compared the column's type with the domain's base type, never equal: every write was logged as
    "some row changed" and each sync re-derived the whole table.  It compares with the type the column had at
    install."""
    domain = BLOBS.replace("CREATE TABLE blobs (b bytea", "CREATE DOMAIN blob AS bytea;\nCREATE TABLE blobs (b blob")
    s = _night(db_url, tmp_path, domain, BLOBS_MAPPING)
    sql(db_url, "UPDATE blobs SET v = 'changed' WHERE b = '\\x03'")
    assert _logged(db_url) == [["\\x03"]]
    (p,) = run(api.sync(s, ["night"])).phases
    assert p.waiting == 0 and scalar(db_url, "SELECT v FROM datos WHERE b = '\\x03'") == "changed"


LEAVES = """
CREATE TABLE ev (id int NOT NULL, d date NOT NULL, v text, PRIMARY KEY (id, d)) PARTITION BY RANGE (d);
CREATE TABLE ev_jan PARTITION OF ev FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
CREATE TABLE ev_feb (junk int, id int NOT NULL, d date NOT NULL, v text, PRIMARY KEY (id, d));
ALTER TABLE ev_feb DROP COLUMN junk;  -- its columns have other numbers than the parent's
ALTER TABLE ev ATTACH PARTITION ev_feb FOR VALUES FROM ('2024-02-01') TO ('2024-03-01');
CREATE TABLE ev_t (id int NOT NULL, d date NOT NULL, v text, PRIMARY KEY (id, d));
INSERT INTO ev SELECT i, date '2024-01-01' + i, 'v' || i FROM generate_series(1, 50) i;
"""
LEAVES_MAPPING = """
tables:
  - source: ev
    target: ev_t
    columns: {id: id, d: d, v: v}
"""


def test_a_repeatable_read_writer_into_a_leaf_whose_columns_have_other_numbers_is_captured_by_key(db_url, tmp_path):
    """The guard looks each column up by the number it has in the relation the trigger fired on (TG_RELID): a leaf
    attached with other attribute numbers than its parent's is checked against its own."""
    s = _night(db_url, tmp_path, LEAVES, LEAVES_MAPPING)

    async def scenario() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            async with conn.transaction(isolation="repeatable_read"):
                await conn.execute("UPDATE ev_feb SET v = 'leaf' WHERE id = 40")
                await conn.execute("UPDATE ev SET v = 'parent' WHERE id = 41")
        finally:
            await conn.close()

    run(scenario())
    assert sorted(_logged(db_url)) == [["40", "2024-02-10"], ["41", "2024-02-11"]]
    run(api.sync(s, ["night"]))
    assert [tuple(r) for r in sql(db_url, "SELECT id, v FROM ev_t WHERE id IN (40, 41) ORDER BY id")] == [
        (40, "leaf"),
        (41, "parent"),
    ]


SWAPPED = """
CREATE TABLE people (id int PRIMARY KEY, legacy_id int UNIQUE NOT NULL, name text);
CREATE TABLE personas (id int PRIMARY KEY, nombre text);
INSERT INTO people SELECT i, 21 - i, 'p' || i FROM generate_series(1, 20) i;  -- the same numbers, another order
"""
SWAPPED_MAPPING = """
tables:
  - source: people
    target: personas
    batch_by: [id]
    columns: {id: id, nombre: name}
"""


def test_a_key_column_replaced_by_another_of_the_same_name_is_not_synced_as_if_it_were_the_same(db_url, tmp_path):
    """Renames in one transaction give the key's name to another column: every name is still there.  The guard and
    status look each column up at the attribute number it had at install, so the write is logged as "the table
    changed", sync refuses naming the column, and once the names are given back it re-derives the table exactly."""
    s = _night(db_url, tmp_path, SWAPPED, SWAPPED_MAPPING)
    swap = """BEGIN;
           ALTER TABLE people RENAME COLUMN id TO old_id;
           ALTER TABLE people RENAME COLUMN legacy_id TO id;
           ALTER TABLE people RENAME COLUMN old_id TO legacy_id;
           COMMIT"""
    sql(db_url, swap)
    sql(db_url, "UPDATE people SET name = 'changed' WHERE legacy_id = 3")  # its id is 18 now: person 18's row
    assert _logged(db_url) == [[]], "logged under the other column's value"
    with pytest.raises(MigrationError, match=r"COLUMN GONE.*\bid\b of public\.people"):
        run(api.sync(s, ["night"]))
    assert scalar(db_url, "SELECT nombre FROM personas WHERE id = 18") == "p18"  # nothing applied
    sql(db_url, swap)  # the names given back
    (p,) = run(api.sync(s, ["night"])).phases
    assert p.waiting == 0
    assert scalar(db_url, "SELECT nombre FROM personas WHERE id = 3") == "changed"
    assert deep(s, "night") == (True, [])


# -- keys a writer's own settings write in another form ---------------------------------------------------------------
DOMAIN = """
CREATE DOMAIN day AS date;
CREATE TABLE days (d day PRIMARY KEY, v text);
CREATE TABLE dias (d date PRIMARY KEY, v text);
INSERT INTO days SELECT date '2024-01-01' + i, 'v' || i FROM generate_series(0, 89) i;
"""
DOMAIN_MAPPING = """
tables:
  - source: days
    target: dias
    columns: {d: d, v: v}
"""


def test_sync_re_derives_the_row_a_writer_with_another_datestyle_changed_when_the_key_is_a_domain_over_date(
    db_url, tmp_path
):
    s = _night(db_url, tmp_path, DOMAIN, DOMAIN_MAPPING)
    run(
        _as_writer(
            db_url,
            [
                "UPDATE days SET v = 'changed' WHERE d = date '2024-02-01'",
                "UPDATE days SET v = 'the 13th' WHERE d = date '2024-02-13'",
                "DELETE FROM days WHERE d = date '2024-03-05'",
            ],
            DateStyle="SQL, DMY",
        )
    )
    logged = _logged(db_url)
    (p,) = run(api.sync(s, ["night"])).phases
    assert p.waiting == 0
    assert scalar(db_url, "SELECT v FROM dias WHERE d = '2024-02-01'") == "changed", f"logged keys {logged}"
    assert scalar(db_url, "SELECT v FROM dias WHERE d = '2024-02-13'") == "the 13th", f"logged keys {logged}"
    assert scalar(db_url, "SELECT count(*) FROM dias WHERE d = '2024-03-05'") == 0, f"logged keys {logged}"
    assert deep(s, "night") == (True, [])


FLOATS = """
CREATE TABLE readings (x float8 PRIMARY KEY, v text);
CREATE TABLE lecturas (x float8 PRIMARY KEY, v varchar(8));
INSERT INTO readings SELECT i * 0.1::float8, 'v' || i FROM generate_series(1, 30) i;
UPDATE readings SET v = 'far too long for lecturas' WHERE x = 9 * 0.1::float8;  -- quarantined by the copy (22001)
"""
FLOATS_MAPPING = """
tables:
  - source: readings
    target: lecturas
    columns: {x: x, v: v}
"""


def test_sync_re_derives_the_row_of_a_float_key_a_writer_with_fewer_float_digits_changed(db_url, tmp_path):
    """3 * 0.1 is 0.30000000000000004: with extra_float_digits = 0 (older drivers, some ORMs) ::text writes 0.3, another
    number, and sync re-derived a row that is not there (and the copy's reject, written with every digit, stayed)."""
    s = _night(db_url, tmp_path, FLOATS, FLOATS_MAPPING)
    assert scalar(db_url, "SELECT count(*) FROM migrate_data.rejects") == 1
    run(
        _as_writer(
            db_url,
            [
                "UPDATE readings SET v = 'changed' WHERE x = 3 * 0.1::float8",
                "DELETE FROM readings WHERE x = 7 * 0.1::float8",
                "UPDATE readings SET v = 'fixed' WHERE x = 9 * 0.1::float8",
            ],
            extra_float_digits="0",
        )
    )
    logged = _logged(db_url)
    (p,) = run(api.sync(s, ["night"])).phases
    assert p.waiting == 0
    assert scalar(db_url, "SELECT v FROM lecturas WHERE x = 3 * 0.1::float8") == "changed", f"logged keys {logged}"
    assert scalar(db_url, "SELECT count(*) FROM lecturas WHERE x = 7 * 0.1::float8") == 0, f"logged keys {logged}"
    assert scalar(db_url, "SELECT v FROM lecturas WHERE x = 9 * 0.1::float8") == "fixed", f"logged keys {logged}"
    assert scalar(db_url, "SELECT count(*) FROM migrate_data.rejects") == 0, f"logged keys {logged}"
    assert deep(s, "night") == (True, [])


SPANS = """
CREATE TABLE plans (name text, period interval, price int, PRIMARY KEY (name, period));
CREATE TABLE planes (nombre text, periodo interval, precio int, PRIMARY KEY (nombre, periodo));
INSERT INTO plans SELECT 'p' || (i % 3), make_interval(days => -i, secs => -(7384 + i)), i FROM generate_series(1, 30) i;
"""
SPANS_MAPPING = """
tables:
  - source: plans
    target: planes
    columns: {nombre: name, periodo: period, precio: price}
"""


def test_sync_re_derives_the_row_of_an_interval_key_a_writer_with_sql_standard_intervals_changed(db_url, tmp_path):
    """IntervalStyle = sql_standard writes -1 day +02:03:05 as '-1 2:03:05', which a postgres-style reader (ours)
    takes for -1 day +02:03:05 only when the signs agree: mixed signs became another span."""
    s = _night(db_url, tmp_path, SPANS, SPANS_MAPPING)
    run(
        _as_writer(
            db_url,
            [
                "UPDATE plans SET price = -1 WHERE period = make_interval(days => -1, secs => -7385)",
                "DELETE FROM plans WHERE period = make_interval(days => -2, secs => -7386)",
            ],
            IntervalStyle="sql_standard",
        )
    )
    logged = _logged(db_url)
    (p,) = run(api.sync(s, ["night"])).phases
    assert p.waiting == 0
    assert scalar(db_url, "SELECT precio FROM planes WHERE periodo = make_interval(days => -1, secs => -7385)") == -1, (
        f"logged keys {logged}"
    )
    assert scalar(db_url, "SELECT count(*) FROM planes WHERE periodo = make_interval(days => -2, secs => -7386)") == 0
    assert deep(s, "night") == (True, [])


KEY_VALUES = {
    "double precision": ["0.30000000000000004", "5e-324", "-0", "1.7976931348623157e308", "NaN", "-Infinity"],
    "real": ["0.3", "1.4e-45", "3.4028235e38", "Infinity"],
    "interval": ["-1 day -02:03:04.5", "1 year 2 months -3 days", "-13 mons +5 days -00:00:00.000001", "0"],
    "interval day to second": ["-1 day -02:03:04.5"],
    "date": ["2024-02-13", "0044-03-15 BC", "infinity"],
    "timestamp(3) without time zone": ["2024-02-13 01:02:03.456", "-infinity"],
    "timestamp with time zone": ["2024-02-13 01:02:03.5+05:30", "infinity"],
    "time with time zone": ["01:02:03.5+05:30"],
    "bytea": ["\\x00ff5c27"],
}
WRITERS = [  # what a client library may set, all at once
    "SET DateStyle = 'SQL, DMY'; SET IntervalStyle = sql_standard; SET extra_float_digits = -15; "
    "SET TimeZone = 'Pacific/Chatham'; SET bytea_output = escape; SET search_path = pg_temp",
    "SET DateStyle = 'German'; SET IntervalStyle = iso_8601; SET extra_float_digits = 0; SET TimeZone = 'UTC'",
]
READERS = ["SET IntervalStyle = postgres", "SET IntervalStyle = sql_standard; SET DateStyle = 'Postgres, MDY'"]


def test_a_key_written_as_text_under_any_session_settings_is_read_back_as_the_same_value(db_url):
    from migrate_data.sql import key_text

    async def scenario() -> list[tuple[str, str, str, str]]:
        conn = await asyncpg.connect(db_url)
        wrong = []
        try:
            for type_, values in KEY_VALUES.items():
                for value in values:
                    texts = set()
                    for writer in WRITERS:
                        await conn.execute(writer)
                        texts.add(await conn.fetchval(f"SELECT {key_text(f'$1::text::{type_}', type_)}", value))
                        await conn.execute("RESET ALL")
                    if len(texts) != 1:
                        wrong.append((type_, value, "written differently", repr(texts)))
                    for reader in READERS:
                        await conn.execute(reader)
                        same = await conn.fetchval(
                            f"SELECT CAST($1::text AS {type_}) IS NOT DISTINCT FROM CAST($2::text AS {type_}) AND "
                            f"CAST($1::text AS {type_})::text = CAST($2::text AS {type_})::text",
                            min(texts),
                            value,
                        )
                        await conn.execute("RESET ALL")
                        if not same:
                            wrong.append((type_, value, reader, min(texts)))
        finally:
            await conn.close()
        return wrong

    assert run(scenario()) == []


# -- our sessions' settings: what they change in the values a mapping computes ---------------------------------------
TEXT_SPANS = """
CREATE TABLE legacy_spans (id int PRIMARY KEY, span text);
CREATE TABLE lapsos (id int PRIMARY KEY, lapso interval);
INSERT INTO legacy_spans VALUES (1, '-1 2:03:04'), (2, '3 days'), (3, '-1 -2:03:04');
"""
TEXT_SPANS_MAPPING = """
tables:
  - source: legacy_spans
    target: lapsos
    columns: {id: id, lapso: {sql: "span::interval"}}
"""


def test_a_mapping_reads_interval_text_as_the_database_does_in_one_database(db_url, tmp_path):
    sql(
        db_url,
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET IntervalStyle = ''sql_standard''', current_database()); "
        "END $$;",
    )
    sql(db_url, TEXT_SPANS)
    meant = [tuple(r) for r in sql(db_url, "SELECT id, span::interval::text FROM legacy_spans ORDER BY id")]
    s = settings(db_url, project(tmp_path, TEXT_SPANS_MAPPING))
    (result,) = apply(s, "night")
    assert result.validation.ok
    got = [tuple(r) for r in sql(db_url, "SELECT id, lapso::text FROM lapsos ORDER BY id")]  # in the database's style
    assert got == meant
