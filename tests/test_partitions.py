"""Partitioned tables: a range-partitioned source (by month, a DEFAULT partition, a month sub-partitioned by list)
copied leaf by leaf into a list-partitioned target; checkpoints per leaf, kill -9 and resume, rejects, --deep,
rollback, backups that hold every leaf, and partitions attached or detached between runs."""

from __future__ import annotations

import asyncio
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import run, run_cli, scalar, sql
from killer import kill_at
from migrate_data import api, backup
from migrate_data.mapping import QualifiedName
from migrate_data.settings import Settings

# 6,000 events from 2023-12-20 to 2024-04-17: December and April fall in the DEFAULT partition, March is split by
# kind.  Each leaf has its own primary key; the parent has none (a unique key on it must contain created_at).
# Planted dirt: 6 payloads that are not JSON (22P02), 4 kinds the target has no partition for (23514).
SOURCE = """
CREATE TABLE events (id bigint NOT NULL, created_at date NOT NULL, kind text NOT NULL, payload text)
    PARTITION BY RANGE (created_at);
CREATE TABLE events_2024_01 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
CREATE TABLE events_2024_02 PARTITION OF events FOR VALUES FROM ('2024-02-01') TO ('2024-03-01');
CREATE TABLE events_2024_03 PARTITION OF events FOR VALUES FROM ('2024-03-01') TO ('2024-04-01') PARTITION BY LIST (kind);
CREATE TABLE events_2024_03_click PARTITION OF events_2024_03 FOR VALUES IN ('click');
CREATE TABLE events_2024_03_other PARTITION OF events_2024_03 DEFAULT;
CREATE TABLE events_default PARTITION OF events DEFAULT;
ALTER TABLE events_2024_01 ADD PRIMARY KEY (id);
ALTER TABLE events_2024_02 ADD PRIMARY KEY (id);
ALTER TABLE events_2024_03_click ADD PRIMARY KEY (id);
ALTER TABLE events_2024_03_other ADD CONSTRAINT events_2024_03_other_id UNIQUE (id);
ALTER TABLE events_default ADD PRIMARY KEY (id);
INSERT INTO events SELECT i, date '2023-12-20' + (i % 120),
    CASE WHEN i % 1499 = 0 THEN 'share' ELSE (ARRAY['click', 'view', 'buy'])[1 + i % 3] END,
    CASE WHEN i % 997 = 0 THEN '{broken' ELSE json_build_object('n', i)::text END
FROM generate_series(1, 6000) i;
"""
TARGET = """
CREATE TABLE eventos (id bigint NOT NULL, tipo text NOT NULL, creado date NOT NULL, datos jsonb,
    PRIMARY KEY (id, tipo)) PARTITION BY LIST (tipo);
CREATE TABLE eventos_clic PARTITION OF eventos FOR VALUES IN ('clic');
CREATE TABLE eventos_vista PARTITION OF eventos FOR VALUES IN ('vista');
CREATE TABLE eventos_compra PARTITION OF eventos FOR VALUES IN ('compra');
"""
MAPPING = """
tables:
  - source: events
    target: eventos
    key: [id, tipo]
    columns:
      id: id
      tipo: {column: kind, map: {click: clic, view: vista, buy: compra}}
      creado: created_at
      datos: payload
"""
LEAVES = [
    "public.events_2024_01",
    "public.events_2024_02",
    "public.events_2024_03_click",
    "public.events_2024_03_other",
    "public.events_default",
]
ARGS = ["night", "--yes", "--no-backup", "--batch-size", "200", "--jobs", "1"]


def project(tmp_path: Path, mapping: str = MAPPING) -> Path:
    (tmp_path / "mappings").mkdir(exist_ok=True)
    (tmp_path / "mappings" / "night.yaml").write_text(textwrap.dedent(mapping))
    return tmp_path


@pytest.fixture
def events(db_url: str) -> str:
    sql(db_url, SOURCE + TARGET)
    return db_url


def settings(url: str, proj: Path) -> Settings:
    return Settings(database_url=url, project_dir=proj, output_dir=proj / "out")


def cli(url: str, proj: Path, *args: str):
    return run_cli(*args, url=url, cwd=proj, env={"MIGRATE_DATA_OUTPUT_DIR": str(proj / "out")})


def rows(url: str) -> list:
    return [tuple(r) for r in sql(url, "SELECT id, tipo, creado, datos::text FROM eventos ORDER BY id, tipo")]


def test_plan_names_each_leaf_and_the_key_that_pages_it(events, tmp_path):
    result = run(api.plan(settings(events, project(tmp_path)), "night"))
    assert not result.plan.errors
    info = next(f.message for f in result.plan.findings if "leaf partitions" in f.message)
    assert "events is partitioned (RANGE (created_at)): 5 leaf partitions copied one by one on (id)" in info
    assert "public.events_2024_03_click (FOR VALUES IN ('click'))" in info and "public.events_default (DEFAULT)" in info


def test_copy_leaf_by_leaf_into_a_list_partitioned_target_validates_deep_backs_up_and_rolls_back(events, tmp_path):
    proj = project(tmp_path)
    result = run(api.run_phase(settings(events, proj), "night", api.RunOptions(batch_size=500, jobs=2)))
    assert result.validation.ok and result.validation.deep
    [table] = result.tables
    assert (table.rows_read, table.rows_written, table.rejected) == (6000, 5990, 10)
    # one checkpoint per leaf, naming it; each leaf's rows add up to the table's
    parts = sql(events, "SELECT source, rows_read, done FROM migrate_data.checkpoints ORDER BY part")
    assert [p["source"] for p in parts] == LEAVES and all(p["done"] for p in parts)
    per_leaf = {r[0]: r[1] for r in sql(events, "SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1")}
    assert {p["source"].split(".")[1]: p["rows_read"] for p in parts} == per_leaf
    # the rows are in the target's list partitions; the dirt is quarantined with its reason
    assert scalar(events, "SELECT count(*) FROM ONLY eventos_clic") == scalar(
        events, "SELECT count(*) FROM events WHERE kind = 'click' AND payload <> '{broken'"
    )
    causes = {r[0]: r[1] for r in sql(events, "SELECT sqlstate, count(*) FROM migrate_data.rejects GROUP BY 1")}
    assert causes == {"22P02": 6, "23514": 4}
    # the backup holds every leaf's rows, of the source and of the target
    listing = subprocess.run(["pg_restore", "--list", result.backup_path], capture_output=True, text=True).stdout
    data = sorted(
        line.split(" TABLE DATA public ")[1].split()[0] for line in listing.splitlines() if "TABLE DATA" in line
    )
    assert data == sorted([leaf.split(".")[1] for leaf in LEAVES] + ["eventos_clic", "eventos_compra", "eventos_vista"])
    # a changed row is found by --deep, with its key and column
    sql(events, "UPDATE eventos SET creado = creado + 1 WHERE id = 10")
    deep = run(api.validate(settings(events, proj), "night", deep=True))
    assert not deep.ok and deep.tables[0].differs == 1
    assert deep.tables[0].samples[0]["key"] == ["10", "vista"]
    # the rollback deletes what the phase wrote; the row changed since is someone else's: --force saves it first
    undone = run(api.rollback(settings(events, proj), "night", force=True))
    assert undone.deleted == {"public.eventos": 5990}
    assert scalar(events, "SELECT count(*) FROM eventos") == 0
    assert scalar(events, "SELECT count(*) FROM events") == 6000  # the source is untouched


def test_killed_in_the_middle_of_a_partition_resumes_exactly(events, tmp_path, make_db):
    proj = project(tmp_path)
    # 200-row batches, one leaf at a time: events_2024_01 (1,550 rows) takes 8 batches, so the 10th is inside
    # events_2024_02
    killed = kill_at("migrate_data.copier:Copier._batch:return", *ARGS, url=events, cwd=proj, nth=10)
    assert killed.returncode == -9, killed.stderr
    parts = {
        r["source"]: (r["rows_read"], r["done"])
        for r in sql(events, "SELECT source, rows_read, done FROM migrate_data.checkpoints")
    }
    assert parts["public.events_2024_01"] == (1550, True)
    assert parts["public.events_2024_02"] == (400, False)
    assert scalar(events, "SELECT count(*) FROM eventos") == scalar(
        events, "SELECT sum(rows_written) FROM migrate_data.checkpoints"
    )
    again = cli(events, proj, *ARGS)
    assert again.returncode == 0, again.stderr
    # the same rows as an uninterrupted run on a copy of the same database
    clean = make_db()
    sql(clean, SOURCE + TARGET)
    assert cli(clean, proj, *ARGS).returncode == 0
    assert rows(events) == rows(clean) and len(rows(events)) == 5990
    deep = cli(events, proj, "validate", "night", "--deep")
    assert deep.returncode == 0, deep.stdout + deep.stderr


def test_a_partition_attached_between_runs_is_refused_by_name_then_copied_with_recheck(events, tmp_path):
    proj = project(tmp_path)
    killed = kill_at("migrate_data.copier:Copier._batch:return", *ARGS, url=events, cwd=proj, nth=3)
    assert killed.returncode == -9, killed.stderr
    sql(
        events,
        "CREATE TABLE events_2025_01 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2025-02-01'); "
        "ALTER TABLE events_2025_01 ADD PRIMARY KEY (id); "
        "INSERT INTO events SELECT i, date '2025-01-01' + i % 28, 'view', '{}' FROM generate_series(7001, 7100) i",
    )
    out = cli(events, proj, *ARGS)
    assert out.returncode == 2, out.stderr
    assert "the partitions of public.events changed since this phase started copying it" in out.stderr
    assert "attached to public.events since: public.events_2025_01 (its rows were never copied)" in out.stderr
    assert "--recheck" in out.stderr
    again = cli(events, proj, *ARGS, "--recheck")
    assert again.returncode == 0, again.stderr
    assert scalar(events, "SELECT count(*) FROM eventos WHERE id > 7000") == 100
    assert scalar(events, "SELECT count(*) FROM migrate_data.checkpoints WHERE source = 'public.events_2025_01'") == 1


def test_a_partition_detached_after_the_phase_is_refused_by_name(events, tmp_path):
    proj = project(tmp_path)
    assert cli(events, proj, *ARGS).returncode == 0
    sql(events, "ALTER TABLE events DETACH PARTITION events_2024_02")
    out = cli(events, proj, *ARGS)
    assert out.returncode == 2
    assert "detached from public.events since: public.events_2024_02" in out.stderr
    # the counts see it too: the target holds rows the source no longer has
    assert cli(events, proj, "validate", "night").returncode == 3


def test_a_leaf_without_a_key_is_named_with_the_way_out(events, tmp_path):
    sql(events, "ALTER TABLE events_2024_02 DROP CONSTRAINT events_2024_02_pkey")
    result = run(api.plan(settings(events, project(tmp_path)), "night"))
    [error] = result.plan.errors
    assert (
        "events is partitioned, and no column set is a unique NOT NULL key of every partition: (id) is not one of "
        "partition public.events_2024_02 (no primary key or unique NOT NULL index)" in error.message
    )
    assert "give each partition a primary key" in error.message
    # with batch_by named, the pre-flight names the leaf the same way
    mapping = MAPPING.replace("key: [id, tipo]", "key: [id, tipo]\n    batch_by: id")
    result = run(api.plan(settings(events, project(tmp_path, mapping)), "night"))
    [error] = result.plan.errors
    assert "batch_by (id) is not unique (no unique index on them) in partition public.events_2024_02" in error.message


def test_a_target_key_without_the_partition_key_is_explained(events, tmp_path):
    mapping = MAPPING.replace("key: [id, tipo]", "key: [id]")
    result = run(api.plan(settings(events, project(tmp_path, mapping)), "night"))
    [error] = result.plan.errors
    assert "eventos is partitioned (LIST (tipo))" in error.message
    assert "a unique key of a partitioned table must include its partition key columns (tipo missing)" in error.message
    assert "[id, tipo]" in error.message


def test_on_conflict_update_into_a_range_and_hash_partitioned_target(db_url, tmp_path):
    """The conflict key holds the partition keys of every level: INSERT … ON CONFLICT DO UPDATE works, twice."""
    sql(
        db_url,
        SOURCE
        + """
        CREATE TABLE eventos (id bigint NOT NULL, creado date NOT NULL, tipo text, datos jsonb,
            PRIMARY KEY (id, creado)) PARTITION BY RANGE (creado);
        CREATE TABLE eventos_2024 PARTITION OF eventos FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')
            PARTITION BY HASH (id);
        CREATE TABLE eventos_2024_h0 PARTITION OF eventos_2024 FOR VALUES WITH (modulus 2, remainder 0);
        CREATE TABLE eventos_2024_h1 PARTITION OF eventos_2024 FOR VALUES WITH (modulus 2, remainder 1);
        CREATE TABLE eventos_otros PARTITION OF eventos DEFAULT;
        """,
    )
    mapping = """
    tables:
      - source: events
        target: eventos
        on_conflict: update
        columns: {id: id, creado: created_at, tipo: kind, datos: {column: payload, default: '{}'}}
        where: "events.payload <> '{broken'"
    """
    proj = project(tmp_path, mapping)
    first = run(api.run_phase(settings(db_url, proj), "night", api.RunOptions(backup=False)))
    assert first.validation.ok and first.tables[0].rows_written == 5994
    assert scalar(db_url, "SELECT count(*) FROM ONLY eventos_2024_h0") > 0
    again = run(api.run_phase(settings(db_url, proj), "night", api.RunOptions(backup=False, recheck=True)))
    assert again.validation.ok and again.tables[0].rows_written == 5994  # every row updated in place


@pytest.mark.parametrize("server", ["test server", "embedded PostgreSQL 16"])
def test_backup_of_a_partitioned_table_holds_every_leaf_and_checks_each(server, server_url, make_db, tmp_path):
    async def dump(url: str, major: int) -> str:
        path = tmp_path / "b-20240101T000000Z.dump"
        await backup.dump(url, [QualifiedName("events", "public")], path, server_major=major)
        tool = await backup.find_tool("pg_restore", major)
        return subprocess.run([tool, "--list", str(path)], capture_output=True, text=True).stdout

    def check(url: str) -> int:
        sql(url, SOURCE)
        major = int(scalar(url, "SHOW server_version_num")) // 10000
        listing = asyncio.run(dump(url, major))
        data = sorted(
            line.split(" TABLE DATA public ")[1].split()[0] for line in listing.splitlines() if "TABLE DATA" in line
        )
        assert data == sorted(leaf.split(".")[1] for leaf in LEAVES)
        return major

    if server == "test server":
        check(make_db())
        return
    try:
        from migrate_data.embedded import embedded_server

        with embedded_server() as (url, _):
            assert check(url) == 16
    except Exception as e:  # noqa: BLE001 - no embedded server here
        if "embedded PostgreSQL is not installed" in str(e):
            pytest.skip(str(e))
        raise


def test_dump_verification_names_a_leaf_whose_data_is_missing(events, tmp_path, monkeypatch):
    """The check reads pg_restore's listing leaf by leaf: a leaf whose rows are not in the dump is named."""
    original = backup._run

    async def pg_dump_forgets_a_leaf(args, url, env, **kw):
        if "-Fc" in args:
            i = args.index('"public"."events_default"')
            args = args[: i - 1] + args[i + 1 :]
        return await original(args, url, env, **kw)

    monkeypatch.setattr(backup, "_run", pg_dump_forgets_a_leaf)
    major = int(scalar(events, "SHOW server_version_num")) // 10000
    path = tmp_path / "x-20240101T000000Z.dump"
    with pytest.raises(
        Exception, match=r"does not contain the data of public.events \(partition public.events_default\)"
    ):
        asyncio.run(backup.dump(events, [QualifiedName("events", "public")], path, server_major=major))
    assert not list(tmp_path.glob("x-*"))  # nothing unverified is left behind


def test_across_two_databases_the_leaves_are_read_from_the_source(make_db, tmp_path):
    source, target = make_db(), make_db()
    sql(source, SOURCE)
    sql(target, TARGET)
    proj = project(tmp_path)
    two = Settings(database_url=target, source_url=source, project_dir=proj, output_dir=proj / "out")
    result = run(api.run_phase(two, "night", api.RunOptions(backup=False, batch_size=700)))
    assert result.validation.ok and result.validation.deep
    assert (result.tables[0].rows_written, result.tables[0].rejected) == (5990, 10)
    assert [r[0] for r in sql(target, "SELECT source FROM migrate_data.checkpoints ORDER BY part")] == LEAVES


# -- pure: the SQL and the choice of key, without a database ----------------------------------------------------------
def _catalog():
    from migrate_data.catalog import Column, Leaf, Table

    cols = tuple(Column(n, t, True, False, "", False) for n, t in (("id", "bigint"), ("at", "date"), ("v", "text")))
    leaf = lambda name, keys: Leaf(  # noqa: E731
        QualifiedName(name, "public"), QualifiedName("ev", "public"), "DEFAULT", "r", keys[0], keys, ("id", "at", "v")
    )
    source = Table(
        "public",
        "ev",
        cols,
        (),
        (),
        (),
        partitioned=True,
        partition_key="RANGE (at)",
        partition_columns=("at",),
        leaves=(leaf("ev_1", (("id",),)), leaf("ev_2", (("id",), ("v",)))),
    )
    target = Table("public", "evt", cols, ("id",), (("id",),), ())
    return source, target


def test_sql_of_a_leaf_reads_the_leaf_under_the_parents_name():
    from migrate_data.compile import compile_table
    from migrate_data.mapping import ColumnSpec, TableMapping

    source, target = _catalog()
    columns = tuple(ColumnSpec(target=c, kind="column", column=c, line=1) for c in ("id", "at", "v"))
    mapping = TableMapping(QualifiedName("ev"), QualifiedName("evt"), columns, line=1, where="ev.v <> 'x'")
    ct = compile_table(mapping, source, target)
    assert ct.batch_by == ("id",) and ct.leaves == (QualifiedName("ev_1", "public"), QualifiedName("ev_2", "public"))
    leaf = ct.for_leaf(ct.leaves[1])
    assert 'FROM "public"."ev_2" AS "ev" WHERE (ev.v <> \'x\') AND "ev"."id" > CAST($1::text AS bigint)' in (
        leaf.insert_sql(lower=True, upper=True)
    )
    assert leaf.whole.count_sql() == 'SELECT count(*) FROM "public"."ev" AS "ev" WHERE (ev.v <> \'x\')'
    # two source rows of different partitions may produce one target key: the search reads every partition, and the
    # rows of the batch are those of this one
    dup = leaf.duplicates_sql(lower=True)
    assert 'FROM "public"."ev_2" AS "ev" WHERE' in dup and 'FROM "public"."ev" AS "ev" WHERE' in dup
    assert '"ev".tableoid = \'"public"."ev_2"\'::regclass' in dup


def test_the_key_of_every_leaf_is_chosen_or_the_leaves_without_it_are_named():
    import dataclasses

    from migrate_data import partitions
    from migrate_data.errors import PreflightError

    source, _ = _catalog()
    assert partitions.batch_key(source) == ("id",)
    assert partitions.batch_key(source, wanted=("v",)) == ("v",)
    assert partitions.key_problems(source, ("v",)) == [
        "batch_by (v) is not unique (no unique index on them) in partition public.ev_1 (keys (id))"
    ]
    assert not partitions.unique_across(source, ("id",)) and partitions.unique_across(source, ("id", "at"))
    keyless = dataclasses.replace(source.leaves[0], unique_keys=(), primary_key=())
    with pytest.raises(PreflightError, match=r"\(id\) is not one of partition public.ev_1 \(no primary key"):
        partitions.batch_key(dataclasses.replace(source, leaves=(keyless, source.leaves[1])))
    changes = partitions.leaf_changes({"public.ev_1", "public.ev_0"}, ["public.ev_1", "public.ev_2"])
    assert (changes.attached, changes.detached) == (("public.ev_2",), ("public.ev_0",))
