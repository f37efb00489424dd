"""Capture installed again by sync (a column dropped and added again or retyped, a partition attached again), MERGE,
upserts, COPY and rules on a typed key, attacked as an adversarial DBA would: what the DDL rewrote without firing a
trigger is re-derived, the log's keys are read as the mapping that wrote them, and a changed mapping is refused."""

from __future__ import annotations

import asyncio
import textwrap

import asyncpg
import pytest
from test_guard_attack import LOOKUP, LOOKUP_MAPPING
from test_keys_attack import BLOBS, BLOBS_MAPPING, ITEMS, ITEMS_MAPPING, _logged, _status
from test_sync import deep
from test_sync_attack import PARTITIONED, PARTITIONED_MAPPING, _night

from conftest import run, scalar, sql
from migrate_data import api
from migrate_data.errors import MigrationError


def _remap(tmp_path, mapping: str) -> None:
    (tmp_path / "mappings" / "night.yaml").write_text(textwrap.dedent(mapping))


# -- 1. what the ALTER itself rewrote, without firing a trigger, is re-derived by the sync that installs capture again
def test_sync_rederives_a_lookup_column_whose_values_an_alter_type_rewrote(db_url, tmp_path):
    """ALTER ... TYPE ... USING rewrites every value without firing a trigger; status says COLUMN MOVED ("logged
    without their keys until the next sync captures the table again (and re-derives it)").  With no write between
    the ALTER and the sync, nothing was in the log and nothing was re-derived: installing capture again logs one
    "the table changed" row with it."""
    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    sql(db_url, "ALTER TABLE countries ALTER COLUMN name TYPE varchar(40) USING upper(name)")
    assert _status(s) == "COLUMN MOVED"
    run(api.sync(s, ["night"]))
    assert scalar(db_url, "SELECT pais FROM tiendas WHERE id = 2") == "SPAIN"


def test_sync_rederives_a_lookup_column_dropped_and_added_again_with_a_default(db_url, tmp_path):
    """The ORM's DROP + ADD ... DEFAULT: every row's value changes, no trigger fires, no write follows.  Status says
    COLUMN MOVED; the sync that installs capture again re-derives the table."""
    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    sql(db_url, "ALTER TABLE countries DROP COLUMN name, ADD COLUMN name text NOT NULL DEFAULT 'n/a'")
    assert _status(s) == "COLUMN MOVED"
    run(api.sync(s, ["night"]))
    assert _status(s) == "on"
    assert scalar(db_url, "SELECT pais FROM tiendas WHERE id = 2") == "n/a"


# -- 2. capture is installed again only as the mapping was: the log's keys are its columns ------------------------
GROUPS = """
CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL UNIQUE, v text);
CREATE TABLE articulos (id int PRIMARY KEY, grp int, v text);
INSERT INTO items SELECT i, 1000 + i, 'v' || i FROM generate_series(1, 20) i;
"""
GROUPS_MAPPING = """
tables:
  - source: items
    target: articulos
    columns: {id: id, grp: grp, v: v}
"""


def test_sync_refuses_a_mapping_changed_since_capture_started_even_when_a_column_moved(db_url, tmp_path):
    """Without a moved column, sync refuses: "the mapping changed since capture started".  With one, the repair
    installed capture with the NEW mapping, which rewrote the registry's columns; the check after it passed and the
    log rows written with the old columns were read with the new ones (an IndexError, every time)."""
    s = _night(db_url, tmp_path, GROUPS, GROUPS_MAPPING)
    sql(db_url, "UPDATE items SET v = 'changed' WHERE id = 7")
    assert _logged(db_url) == [["7"]]
    _remap(tmp_path, GROUPS_MAPPING.replace("target: articulos", "target: articulos\n    batch_by: [grp]"))
    with pytest.raises(MigrationError, match="mapping changed"):
        run(api.sync(s, ["night"]))
    sql(db_url, "ALTER TABLE items ALTER COLUMN id TYPE bigint")  # an unrelated retype: COLUMN MOVED
    assert _status(s) == "COLUMN MOVED"
    for _ in range(2):  # the refusal is the same each time, and says why
        try:
            run(api.sync(s, ["night"]))
        except MigrationError as e:
            assert "mapping changed" in str(e)
        except IndexError as e:
            pytest.fail(f"sync crashed: IndexError {e} (status: {_status(s)})")


# -- 3. MERGE, ON CONFLICT, COPY, views, zero-row updates with typed keys ---------------------------
MERGE = (
    "MERGE INTO {t} t USING (VALUES ({a}, 'm3'), ({b}, NULL), ({c}, 'new')) AS s(k, v) ON t.{k} = s.k "
    "WHEN MATCHED AND s.v IS NULL THEN DELETE WHEN MATCHED THEN UPDATE SET v = s.v "
    "WHEN NOT MATCHED THEN INSERT VALUES (s.k, s.v)"
)


@pytest.mark.parametrize(
    "setup, mapping, table, key, keys, target",
    [
        (ITEMS, ITEMS_MAPPING, "items", "id", ("3", "4", "99"), "articulos"),
        (BLOBS, BLOBS_MAPPING, "blobs", "b", ("\\x03", "\\x04", "\\xff"), "datos"),
    ],
    ids=["items", "blobs"],
)
def test_merge_is_captured_by_key(db_url, tmp_path, setup, mapping, table, key, keys, target):
    s = _night(db_url, tmp_path, setup, mapping)
    values = [f"'{k}'::bytea" if key == "b" else k for k in keys]
    merge = MERGE.format(t=table, k=key, a=values[0], b=values[1], c=values[2])
    sql(db_url, merge)
    logged = _logged(db_url)
    assert [] not in logged, logged
    run(api.sync(s, ["night"]))
    for k, v in zip(keys, ("m3", None, "new"), strict=True):
        assert scalar(db_url, f"SELECT v FROM {target} WHERE {key}::text = $1", k) == v, (k, logged)


def test_upsert_copy_and_view_writes_on_a_typed_key_are_captured_by_key(db_url, tmp_path):
    s = _night(db_url, tmp_path, BLOBS, BLOBS_MAPPING)
    sql(
        db_url,
        "INSERT INTO blobs VALUES ('\\x03', 'up'), ('\\xfe', 'ins') ON CONFLICT (b) DO UPDATE SET v = EXCLUDED.v",
    )
    sql(db_url, "UPDATE blobs SET v = v WHERE false")
    sql(
        db_url,
        "CREATE VIEW bv AS SELECT b, v FROM blobs; "
        "CREATE RULE bv_upd AS ON UPDATE TO bv DO INSTEAD UPDATE blobs SET v = NEW.v WHERE b = OLD.b; "
        "UPDATE bv SET v = 'rule' WHERE b = '\\x05'",
    )

    async def copy() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.copy_records_to_table("blobs", records=[(b"\xfd", "copied")])
        finally:
            await conn.close()

    run(copy())
    logged = _logged(db_url)
    assert [] not in logged, logged
    run(api.sync(s, ["night"]))
    for k, v in [("\\x03", "up"), ("\\xfe", "ins"), ("\\x05", "rule"), ("\\xfd", "copied")]:
        assert scalar(db_url, "SELECT v FROM datos WHERE b::text = $1", k) == v, (k, logged)
    assert deep(s, "night")[0]


@pytest.mark.parametrize("moved", [False, True])
def test_a_change_logged_before_a_batch_by_was_removed_from_the_mapping_is_not_lost_when_a_column_moved(
    db_url, tmp_path, moved
):
    """Capture logs [grp, id]; the mapping drops its batch_by (sync accepts that: the registry's columns still hold id,
    and it reads the log by the registry's positions).  A column moves before the next sync: the repair installed
    capture with the new mapping and rewrote the registry to (id), and the row logged as ["1007", "7"] was read as
    id 1007: row 7's change was lost.  Now sync refuses (the mapping changed), or applies it."""
    s = _night(
        db_url, tmp_path, GROUPS, GROUPS_MAPPING.replace("target: articulos", "target: articulos\n    batch_by: [grp]")
    )
    sql(db_url, "UPDATE items SET v = 'changed' WHERE id = 7")
    assert _logged(db_url) == [["1007", "7"]]
    _remap(tmp_path, GROUPS_MAPPING)
    if moved:
        sql(db_url, "ALTER TABLE items ALTER COLUMN id TYPE bigint")  # COLUMN MOVED
        assert _status(s) == "COLUMN MOVED"
    try:
        (p,) = run(api.sync(s, ["night"])).phases
    except MigrationError:
        return  # refusing is fine
    assert scalar(db_url, "SELECT v FROM articulos WHERE id = 7") == "changed", "row 7's change was lost"


def test_a_partition_detached_and_attached_again_with_its_key_re_added_is_logged_by_key_after_a_sync(db_url, tmp_path):
    """ev_jan is detached, its d dropped and added again (another attribute number), filled, and attached again: the
    root's layout is the same and status says "on", but the function's layout for ev_jan is stale: every write naming
    ev_jan was logged as "the table changed", forever.  Sync compares the function with the one it would install and
    installs it again."""
    s = _night(db_url, tmp_path, PARTITIONED, PARTITIONED_MAPPING)
    sql(
        db_url,
        "BEGIN; ALTER TABLE ev DETACH PARTITION ev_jan; ALTER TABLE ev_jan DROP COLUMN d CASCADE; "
        "ALTER TABLE ev_jan ADD COLUMN d date NOT NULL DEFAULT '2024-01-15'; ALTER TABLE ev_jan ADD PRIMARY KEY (id, d); "
        "ALTER TABLE ev ATTACH PARTITION ev_jan FOR VALUES FROM ('2024-01-01') TO ('2024-02-01'); COMMIT",
    )
    st = _status(s)
    run(api.sync(s, ["night"]))
    sql(db_url, "DELETE FROM migrate_data.changes")
    sql(db_url, "UPDATE ev_jan SET v = 'direct' WHERE id = 3")
    assert _logged(db_url) == [["3", "2024-01-15"]], (st, _logged(db_url))


# -- 4. DDL that rewrites a column capture does not name -------------------------------------------------------------
def test_sync_re_derives_a_table_whose_other_column_an_alter_type_rewrote(db_url, tmp_path):
    """`ALTER … TYPE … USING` of a column no key or lookup names rewrites every value and fires no trigger; the
    registry's digest of the table's columns and files (capture_sql.SHAPE_SQL) tells sync, which re-derives it."""
    s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)
    sql(db_url, "ALTER TABLE items ALTER COLUMN v TYPE text USING upper(v)")
    assert _logged(db_url) == [] and _status(s) == "on"
    run(api.sync(s, ["night"]))
    assert scalar(db_url, "SELECT v FROM articulos WHERE id = 3") == "V3"
    assert deep(s, "night") == (True, [])
    run(api.sync(s, ["night"]))  # captured again: the next sync re-derives nothing more
    assert _logged(db_url) == []


def test_a_follower_re_derives_a_table_rewritten_while_it_runs(db_url, tmp_path):
    """`sync --follow` checks capture again every `recheck_every` seconds, not only when it starts: DDL made while it
    runs is re-derived by it, not left until the next command."""
    from migrate_data.errors import Stopped
    from migrate_data.sync import SyncOptions

    s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)

    async def scenario() -> str | None:
        stop = asyncio.Event()
        follower = asyncio.ensure_future(
            api.sync(s, ["night"], SyncOptions(follow=True, interval=0.1, recheck_every=0.3), stop=stop)
        )
        conn = await asyncpg.connect(db_url)
        try:
            await asyncio.sleep(0.5)
            await conn.execute("ALTER TABLE items ALTER COLUMN v TYPE text USING upper(v)")
            for _ in range(100):
                await asyncio.sleep(0.1)
                if await conn.fetchval("SELECT v FROM articulos WHERE id = 3") == "V3":
                    break
            return await conn.fetchval("SELECT v FROM articulos WHERE id = 3")
        finally:
            stop.set()
            with pytest.raises(Stopped):
                await follower
            await conn.close()

    assert run(scenario()) == "V3"
    assert deep(s, "night") == (True, [])
