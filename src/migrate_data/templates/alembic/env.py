"""Alembic environment of this migration project: migrate-data's (async, connection-sharing).

migrate-data runs it through Alembic's API on its own connection; `alembic upgrade head` by hand
takes the database from DATABASE_URL.
"""

from migrate_data.alembic_env import run

run()
