"""A phase that drops a partitioned legacy table backs up every leaf, and its rollback restores the table with all its
partitions attached and every row back."""

from __future__ import annotations

import textwrap
from pathlib import Path

from conftest import run, scalar, sql
from migrate_data import api
from migrate_data.project import init_project

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
RECREATE = (
    "CREATE TABLE events (id bigint NOT NULL, at date NOT NULL, what text) PARTITION BY RANGE (at); "
    "CREATE TABLE events_h1 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2024-07-01')"
)
REVISIONS = {
    "eventos": (
        "None",
        "CREATE TABLE eventos (id bigint PRIMARY KEY, fecha date NOT NULL, que text)",
        "DROP TABLE eventos",
    ),
    "drop_events": ("'eventos'", "DROP TABLE events", RECREATE),
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


def make_project(root: Path) -> Path:
    init_project(root)
    for rev, (down, up, downgrade) in REVISIONS.items():
        (root / "alembic" / "versions" / f"{rev}.py").write_text(
            f"from alembic import op\n\nrevision = {rev!r}\ndown_revision = {down}\nbranch_labels = None\n"
            f"depends_on = None\n\n\ndef upgrade():\n    op.execute({up!r})\n\n\ndef downgrade():\n"
            + "".join(f"    op.execute({part!r})\n" for part in downgrade.split("; "))
        )
    for f in (root / "mappings").glob("*"):
        f.unlink()
    (root / "mappings" / "copy.yaml").write_text(textwrap.dedent(COPY))
    (root / "mappings" / "drop.yaml").write_text(textwrap.dedent(DROP))
    return root


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
    settings = settings_for(db_url, make_project(tmp_path / "project"))
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
