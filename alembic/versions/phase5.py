"""phase5: drop the legacy English tables.

The downgrade recreates their structure from alembic/sql/legacy_schema.sql; `migrate-data rollback
phase5` then restores their rows from the backup taken before the phase ran.

Revision ID: phase5
Revises: phase1
"""
from __future__ import annotations

from pathlib import Path

from alembic import op

revision = "phase5"
down_revision = "phase1"
branch_labels = None
depends_on = None

LEGACY_DROP_ORDER = ("task_queue", "messages", "sessions", "service_requests", "provider_services",
                     "provider_professions", "users", "customers", "professions")


def upgrade() -> None:
    for table in LEGACY_DROP_ORDER:
        op.execute(f'DROP TABLE IF EXISTS "{table}"')


def downgrade() -> None:
    ddl = (Path(__file__).resolve().parents[1] / "sql" / "legacy_schema.sql").read_text()
    for statement in ddl.split(";\n"):  # one statement at a time: the asyncpg driver prepares each
        if statement.strip():
            op.execute(statement)
