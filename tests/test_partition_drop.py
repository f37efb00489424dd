"""A phase that drops a partitioned legacy table backs up every leaf, and its rollback restores the table with all its
partitions attached and every row back."""

from __future__ import annotations

from test_dependents import make_project

from conftest import run, scalar, sql
from migrate_data import api

LEGACY = """
CREATE TABLE events (id bigint NOT NULL, at date NOT NULL, what text) PARTITION BY RANGE (at);
CREATE TABLE events_h1 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2024-07-01');
CREATE TABLE events_h2 PARTITION OF events FOR VALUES FROM ('2024-07-01') TO ('2025-01-01');
CREATE TABLE events_other PARTITION OF events DEFAULT;
ALTER TABLE events_h1 ADD PRIMARY KEY (id);
ALTER TABLE events_h2 ADD PRIMARY KEY (id);
ALTER TABLE events_other ADD PRIMARY KEY (id);
INSERT INTO events SELECT i, date '2023-12-01' + (i % 420), 'event ' || i FROM generate_series(1, 900) AS i;
"""
RECREATE = (  # the downgrade recreates the parent and one partition, empty: the rollback restores the backup's
    'op.execute("CREATE TABLE events (id bigint NOT NULL, at date NOT NULL, what text) PARTITION BY RANGE (at)")\n'
    "    op.execute(\"CREATE TABLE events_h1 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2024-07-01')\")"
)
REVISIONS = {
    "eventos": (
        "None",
        'op.execute("CREATE TABLE eventos (id bigint PRIMARY KEY, fecha date NOT NULL, que text)")',
        'op.execute("DROP TABLE eventos")',
    ),
    "drop_events": ("'eventos'", 'op.execute("DROP TABLE events")', RECREATE),
}
COPY = """
description: Copiar events
revision: eventos
tables:
  - source: events
    target: eventos
    columns: {id: id, fecha: at, que: what}
"""
DROP = """
description: Eliminar events
requires: [copy]
revision: drop_events
backup: [events]
"""


def _leaves(url: str) -> list:
    return sql(
        url,
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass ORDER BY 1",
    )


def test_rollback_of_a_phase_that_dropped_a_partitioned_table_restores_every_partition_and_row(
    db_url, tmp_path, settings_for
):
    sql(db_url, LEGACY)
    settings = settings_for(db_url, make_project(tmp_path / "project", DROP, revisions=REVISIONS, copy=COPY))
    leaves = _leaves(db_url)
    rows = sql(db_url, "SELECT tableoid::regclass::text AS leaf, * FROM events ORDER BY id")
    run(api.run_phase(settings, "copy", api.RunOptions(backup=False)))
    assert scalar(db_url, "SELECT count(*) FROM eventos") == 900
    run(api.run_phase(settings, "drop", api.RunOptions()))
    assert scalar(db_url, "SELECT to_regclass('events') IS NULL AND to_regclass('events_h2') IS NULL") is True
    result = run(api.rollback(settings, "drop"))
    assert result.restored == ("public.events",)
    assert _leaves(db_url) == leaves  # the three partitions, attached with their bounds (the DEFAULT one too)
    assert sql(db_url, "SELECT tableoid::regclass::text AS leaf, * FROM events ORDER BY id") == rows
    assert (
        scalar(db_url, "SELECT count(*) FROM pg_constraint WHERE conrelid = 'events_h2'::regclass AND contype = 'p'")
        == 1
    )
