"""The ledger's own schema, ``migrate_data`` in the target (and, for change capture, in the source): its DDL in
numbered versions, applied in order and recorded in ``migrate_data.ledger_version``, so a later release can change its
shape on a database that is in the middle of a migration."""

from __future__ import annotations

import logging

import asyncpg

from ..db import Executor, fetch_val
from ..errors import BadInput
from ..sql import LEDGER_SCHEMA as SCHEMA

__all__ = ["LOCK_KEY", "DDL", "CAPTURE_DDL", "VERSIONS", "VERSION_DDL", "ensure", "exists", "ensure_capture", "SCHEMA"]

log = logging.getLogger(__name__)

LOCK_KEY = 0x6D69677261746564  # "migrated"
DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.runs (
    id                bigserial PRIMARY KEY,
    kind              text NOT NULL,
    phase             text,
    status            text NOT NULL DEFAULT 'running',
    started_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at       timestamptz,
    operator          text NOT NULL DEFAULT current_user,
    host              text,
    pid               integer NOT NULL DEFAULT pg_backend_pid(),
    rows              jsonb NOT NULL DEFAULT '{{}}',
    rejects           bigint NOT NULL DEFAULT 0,
    validation_ok     boolean,
    report_path       text,
    backup_path       text,
    error             text,
    predicted_seconds double precision
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.phases (
    phase        text PRIMARY KEY,
    state        text NOT NULL,
    revision     text,
    run_id       bigint,
    validated    boolean,
    backup_path  text,
    pre_state    jsonb,
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.checkpoints (
    phase         text NOT NULL,
    target        text NOT NULL,
    part          integer NOT NULL,
    lo            text[],
    hi            text[],
    last_key      text[],
    rows_read     bigint NOT NULL DEFAULT 0,
    rows_written  bigint NOT NULL DEFAULT 0,
    rejected      bigint NOT NULL DEFAULT 0,
    done          boolean NOT NULL DEFAULT false,
    seconds       double precision NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (phase, target, part)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.rejects (
    id          bigserial PRIMARY KEY,
    phase       text NOT NULL,
    target      text NOT NULL,
    source      text NOT NULL,
    source_key  text[] NOT NULL,
    sqlstate    text NOT NULL,
    message     text NOT NULL,
    detail      text,
    row         jsonb,
    run_id      bigint,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (phase, target, source_key)
);
-- What a phase wrote: one row per (sub)transaction that wrote target rows, inserted in that same
-- (sub)transaction, so the row's own xmin is the xid those target rows carry.  A target row whose xmin is
-- one of these was written by the phase and has not been changed since (an UPDATE gives it a new xmin).
CREATE TABLE IF NOT EXISTS {SCHEMA}.writes (
    phase   text NOT NULL,
    target  text NOT NULL,
    run_id  bigint,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS writes_phase_target ON {SCHEMA}.writes (phase, target);
-- A table is finished only once its sequences are set and it is analyzed, after its last batch.
CREATE TABLE IF NOT EXISTS {SCHEMA}.finished (
    phase        text NOT NULL,
    target       text NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (phase, target)
);
ALTER TABLE {SCHEMA}.phases ADD COLUMN IF NOT EXISTS started_snapshot text;
ALTER TABLE {SCHEMA}.phases ADD COLUMN IF NOT EXISTS rollback_dumps text[] NOT NULL DEFAULT '{{}}';
-- The leaf partition a checkpoint's key range is in (NULL: the source table itself is not partitioned).
ALTER TABLE {SCHEMA}.checkpoints ADD COLUMN IF NOT EXISTS source text;
-- Live sync between nights (sync.py): when the phase's captured changes were last applied, and when the phase was
-- cut over (its source tables' writes blocked, the last changes applied, validated, capture removed).
ALTER TABLE {SCHEMA}.phases ADD COLUMN IF NOT EXISTS last_sync_at timestamptz;
ALTER TABLE {SCHEMA}.phases ADD COLUMN IF NOT EXISTS cut_over_at timestamptz;
-- The 64-bit id of a row's 32-bit xmin (valid for transactions less than 2^32 xids old); the frozen and
-- bootstrap xids (< 3) are older than anything.
CREATE OR REPLACE FUNCTION {SCHEMA}.full_xid(x xid) RETURNS xid8 LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN x::text::bigint < 3 THEN '3'::xid8 ELSE
        ((((c >> 32) - CASE WHEN x::text::bigint > (c & 4294967295) THEN 1 ELSE 0 END) << 32)
         | x::text::bigint)::text::xid8 END
    FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS c) s
$$;
"""


# Change capture (capture.py) lives in the SOURCE database, beside the tables it watches: the registry of what each
# phase captures, and the change log its triggers write.  The log has no constraint an insert could violate (no
# unique key: ids come from a sequence; no foreign key, no CHECK), so logging can never be what fails a write.
CAPTURE_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.changes (
    id      bigserial NOT NULL,
    phase   text NOT NULL,
    source  text NOT NULL,
    key     text[] NOT NULL,
    op      "char" NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);
-- Only when missing: CREATE INDEX takes a SHARE lock on the log even when the index is there, and every captured
-- write (a ROW EXCLUSIVE insert into the log) would wait for the transaction that ran it: a phase's start, a sync.
DO $$ BEGIN
    IF to_regclass('{SCHEMA}.changes_phase_id') IS NULL THEN
        CREATE INDEX changes_phase_id ON {SCHEMA}.changes (phase, id);
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS {SCHEMA}.capture (
    phase         text NOT NULL,
    source        text NOT NULL,
    relation      text NOT NULL,
    columns       text[] NOT NULL,
    watched       text[],
    function      text NOT NULL,
    installed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (phase, source)
);
-- Where the columns were at install, and their types (in the order of columns || watched): a column that took
-- another's name is not the one captured; one moved (dropped and added again) or retyped is captured again by sync.
-- ``shape``: a digest of the table's columns and of its partitions' files at install (capture_sql.SHAPE_SQL): DDL
-- that rewrites values fires no trigger, so sync re-derives a table whose shape changed.  NULL in a row a release
-- before this one wrote.  (Added only when missing: an ALTER TABLE locks the registry that status and sync read
-- even when it adds nothing.)
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{SCHEMA}.capture'::regclass AND attname = 'attnums')
    THEN ALTER TABLE {SCHEMA}.capture ADD COLUMN IF NOT EXISTS attnums int2[], ADD COLUMN IF NOT EXISTS atttypes oid[],
        ADD COLUMN IF NOT EXISTS shape text;
    END IF;
END $$;
"""


# The ledger's versions, in order: each is applied once, in the transaction that records it.  Version 1 is the shape
# every release before the version table had (all ``IF NOT EXISTS``: applying it to such a ledger changes nothing).
# A change of shape is a new entry at the end; an entry is never edited once released.
VERSIONS: tuple[str, ...] = (DDL,)
VERSION_DDL = f"""CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.ledger_version (
    version     integer PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);"""


async def ensure(db: Executor) -> None:
    """Bring the ledger schema to the newest version (serialised, so concurrent first runs do not collide); refuse a
    ledger written by a newer migrate-data."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            await ensure(conn)
        return
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY - 1)
        await db.execute(VERSION_DDL)
        have = await db.fetchval(f"SELECT COALESCE(max(version), 0) FROM {SCHEMA}.ledger_version")
        if have > len(VERSIONS):
            raise BadInput(
                f"the ledger ({SCHEMA}) of this database is version {have}, written by a newer migrate-data; this one "
                f"knows versions up to {len(VERSIONS)}",
                hint="run the migrate-data release that wrote it (see `migrate-data --version` on that machine)",
            )
        for version in range(have + 1, len(VERSIONS) + 1):
            await db.execute(VERSIONS[version - 1])
            await db.execute(f"INSERT INTO {SCHEMA}.ledger_version (version) VALUES ($1)", version)
            log.info("ledger %s: version %d applied", SCHEMA, version)


async def exists(db: Executor) -> bool:
    return bool(await fetch_val(db, "SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.runs"))


async def ensure_capture(conn: asyncpg.Connection) -> None:
    """Create the change log and the capture registry if missing (in the source database; inside a transaction)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY - 1)
    await conn.execute(CAPTURE_DDL)
