"""phase5: drop the legacy English tables.

The downgrade recreates their structure from alembic/sql/legacy_schema.sql; `migrate-data rollback
phase5` then restores their rows from the backup taken before the phase ran.

Revision ID: phase5
Revises: phase4
"""

from __future__ import annotations

import re
from pathlib import Path

from alembic import op

revision = "phase5"
down_revision = "phase4"
branch_labels = None
depends_on = None

LEGACY_DDL = Path(__file__).resolve().parents[1] / "sql" / "legacy_schema.sql"


def upgrade() -> None:
    for table in reversed(re.findall(r"CREATE TABLE (\w+)", LEGACY_DDL.read_text())):  # children first
        op.execute(f'DROP TABLE IF EXISTS "{table}"')


def downgrade() -> None:
    for statement in LEGACY_DDL.read_text().split(";\n"):  # one statement at a time: the asyncpg driver prepares each
        if statement.strip():
            op.execute(statement)
