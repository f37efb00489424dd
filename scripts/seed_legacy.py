#!/usr/bin/env python3
"""Create and fill the legacy (English) TinkuBot schema, deterministically, at a scale.

Scale 1.0 = 1,000,000 customers, 300,000 users, 2,000,000 messages.  The data carries the dirt
a real production database has, on purpose: NULLs where the plan uses COALESCE, JSON kept as text
(a few rows of it invalid), English status values, a few values no mapping covers, and messages and
sessions whose user_id has no user.  Everything is generated inside PostgreSQL (generate_series),
so scale 1.0 takes about a minute.

    python scripts/seed_legacy.py --database-url postgresql://postgres@127.0.0.1/legacy --scale 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from pathlib import Path

import asyncpg

HERE = Path(__file__).resolve().parent
LEGACY_DDL = HERE.parent / "alembic" / "sql" / "legacy_schema.sql"
LEGACY_TABLES = tuple(reversed(re.findall(r"CREATE TABLE (\w+)", LEGACY_DDL.read_text())))  # children first
PROFESSIONS = 40
# Fixed numbers of planted problems, whatever the scale, so tests can count them.
INVALID_JSON_ROWS = 3  # per JSON-as-text column of customers, sessions, messages
UNMAPPED_STATUS_ROWS = 12  # provider_professions.verification_status = 'on_hold'
STICKER_ROWS = 5  # messages.message_type = 'sticker' (not in the mapping)


def counts(scale: float) -> dict[str, int]:
    """Return the number of rows of each generated table at ``scale``."""
    return {
        "customers": max(int(1_000_000 * scale), 30),
        "users": max(int(300_000 * scale), 30),
        "messages": max(int(2_000_000 * scale), 60),
        "task_queue": max(int(50_000 * scale), 10),
    }


def uid(kind: str, expr: str) -> str:
    return f"md5('{kind}' || ({expr}))::uuid"


def bad(total: int) -> str:
    """The ids of the rows that get invalid JSON: INVALID_JSON_ROWS of them, spread over ``total``."""
    return ", ".join(str(max(1, total * k // (INVALID_JSON_ROWS + 1))) for k in range(1, INVALID_JSON_ROWS + 1))


def statements(scale: float) -> list[str]:
    n = counts(scale)
    nc, nu, nm, nt = n["customers"], n["users"], n["messages"], n["task_queue"]
    ts = "timestamp '2025-01-01' + make_interval(mins => i)"
    return [
        f"""INSERT INTO professions (id, name, specialty, category, is_active, created_at, updated_at)
            SELECT {uid("profession", "i")}, 'Profession ' || i,
                   CASE WHEN i % 3 = 0 THEN NULL ELSE 'Specialty ' || i END,
                   (ARRAY['home', 'health', 'tech', 'beauty'])[1 + i % 4],
                   i % 10 <> 0, {ts}, {ts}
            FROM generate_series(1, {PROFESSIONS}) AS i""",
        f"""INSERT INTO customers (id, phone_number, full_name, city, city_confirmed_at, notes, created_at, updated_at)
            SELECT {uid("customer", "i")}, '+5939' || lpad(i::text, 8, '0'),
                   CASE WHEN i % 500 = 0 THEN 'O''Brien ' || i ELSE 'Customer ' || i END,
                   CASE WHEN i % 9 = 0 THEN NULL ELSE (ARRAY['Quito', 'Guayaquil', 'Cuenca', 'Loja'])[1 + i % 4] END,
                   CASE WHEN i % 2 = 0 THEN {ts} END,
                   CASE WHEN i IN ({bad(nc)}) THEN '{{not json'
                        WHEN i % 7 = 0 THEN NULL
                        ELSE json_build_object('channel', 'whatsapp', 'n', i)::text END,
                   {ts}, {ts}
            FROM generate_series(1, {nc}) AS i""",
        f"""INSERT INTO users (id, phone_number, name, email, user_type, business_name, business_description,
                               address, city, country, latitude, longitude, status, created_at, updated_at)
            SELECT {uid("user", "i")},
                   CASE WHEN i % 50 = 0 THEN NULL ELSE '+5938' || lpad(i::text, 8, '0') END,
                   CASE WHEN i % 97 = 0 THEN NULL ELSE 'User ' || i END,
                   'user' || i || '@example.com',
                   CASE WHEN i % 10 < 4 THEN 'provider' WHEN i % 10 < 9 THEN 'customer' ELSE 'admin' END,
                   'Business ' || i, CASE WHEN i % 4 = 0 THEN NULL ELSE 'We do things, ' || i END,
                   'Street ' || i, (ARRAY['Quito', 'Guayaquil', 'Cuenca'])[1 + i % 3], 'Ecuador',
                   -0.18 + (i % 1000) / 10000.0, -78.46 - (i % 1000) / 10000.0,
                   (ARRAY['pending', 'active', 'suspended', 'verified'])[1 + i % 4],
                   {ts}, {ts}
            FROM generate_series(1, {nu}) AS i""",
        f"""INSERT INTO provider_professions (provider_id, profession_id, specialty, experience_years, certifications,
                                              is_primary, verification_status, created_at)
            SELECT {uid("user", "i")}, {uid("profession", "p")},
                   CASE WHEN i % 5 = 0 THEN NULL ELSE 'Specialty ' || p END,
                   CASE WHEN i % 6 = 0 THEN NULL ELSE i % 30 END,
                   CASE WHEN i % 4 = 0 THEN NULL ELSE '["cert-' || i || '"]' END,
                   CASE WHEN i % 8 = 0 THEN NULL ELSE p = 1 + i % {PROFESSIONS} END,
                   CASE WHEN i % 10 = 0 THEN NULL ELSE (ARRAY['pending', 'verified', 'rejected'])[1 + i % 3] END,
                   {ts}
            FROM generate_series(1, {nu}) AS i
            CROSS JOIN LATERAL (VALUES (1 + i % {PROFESSIONS}), (1 + (i + 1 + i % 13) % {PROFESSIONS})) AS v(p)
            WHERE i % 10 < 4 AND (p = 1 + i % {PROFESSIONS} OR i % 3 = 0)""",
        f"""UPDATE provider_professions SET verification_status = 'on_hold'
            WHERE (provider_id, profession_id) IN (
                SELECT provider_id, profession_id FROM provider_professions
                ORDER BY provider_id, profession_id LIMIT {UNMAPPED_STATUS_ROWS})""",
        f"""INSERT INTO provider_services (id, provider_id, profession_id, title, description, price, currency, is_active, created_at)
            SELECT i, {uid("user", "i")}, {uid("profession", f"1 + i % {PROFESSIONS}")}, 'Service ' || i,
                   CASE WHEN i % 3 = 0 THEN NULL ELSE 'Description ' || i END,
                   CASE WHEN i % 11 = 0 THEN NULL ELSE 10 + (i % 90) END,
                   CASE WHEN i % 5 = 0 THEN NULL ELSE 'USD' END, CASE WHEN i % 7 = 0 THEN NULL ELSE true END, {ts}
            FROM generate_series(1, {nu}) AS i WHERE i % 10 < 4""",
        "SELECT setval(pg_get_serial_sequence('provider_services', 'id'), (SELECT max(id) FROM provider_services))",
        f"""INSERT INTO service_requests (id, customer_id, profession_id, description, city, status, requested_at, created_at)
            SELECT {uid("request", "i")}, {uid("customer", "i * 5")}, {uid("profession", f"1 + i % {PROFESSIONS}")},
                   'Need help ' || i, CASE WHEN i % 6 = 0 THEN NULL ELSE 'Quito' END,
                   (ARRAY['pending', 'assigned', 'completed', 'cancelled'])[1 + i % 4], {ts}, {ts}
            FROM generate_series(1, {nc // 5}) AS i""",
        f"""INSERT INTO sessions (id, user_id, session_id, status, qr_code, session_data, expires_at, last_activity, created_at)
            SELECT {uid("session", "i")},
                   CASE WHEN i % 97 = 0 THEN {uid("ghost", "i")} ELSE {uid("user", f"1 + (i * 3) % {nu}")} END,
                   'sess-' || i, (ARRAY['active', 'expired', 'pending_qr'])[1 + i % 3],
                   CASE WHEN i % 3 = 2 THEN 'qr-' || i END,
                   CASE WHEN i IN ({bad(nu // 3)}) THEN 'nope{{' WHEN i % 5 = 0 THEN NULL
                        ELSE json_build_object('step', i % 7)::text END,
                   {ts} + interval '1 day', {ts}, {ts}
            FROM generate_series(1, {nu // 3}) AS i""",
        f"""INSERT INTO messages (id, conversation_id, user_id, message_type, content, media_url, media_type,
                                  ai_response, processing_status, metadata, "timestamp")
            SELECT i, {uid("conversation", "i / 20")},
                   CASE WHEN i % 10 = 0 THEN NULL WHEN i % 89 = 0 THEN {uid("ghost", "i")}
                        ELSE {uid("user", f"1 + i % {nu}")} END,
                   CASE WHEN i % 11 = 0 THEN NULL WHEN i % 5 = 1 THEN 'image' WHEN i % 7 = 2 THEN 'audio' ELSE 'text' END,
                   'Message ' || i,
                   CASE WHEN i % 5 = 1 THEN 'https://media.example.com/' || i END,
                   CASE WHEN i % 5 = 1 THEN 'image/jpeg' END,
                   CASE WHEN i % 2 = 0 THEN 'AI says ' || i END,
                   CASE WHEN i % 13 = 0 THEN NULL ELSE (ARRAY['processed', 'pending', 'failed'])[1 + i % 3] END,
                   CASE WHEN i IN ({bad(nm)}) THEN '{{"broken": ' WHEN i % 6 = 0 THEN NULL
                        ELSE json_build_object('source', 'whatsapp', 'n', i)::text END,
                   {ts}
            FROM generate_series(1, {nm}) AS i""",
        f"""UPDATE messages SET message_type = 'sticker'
            WHERE id IN (SELECT id FROM messages WHERE message_type = 'text' ORDER BY id LIMIT {STICKER_ROWS})""",
        "SELECT setval(pg_get_serial_sequence('messages', 'id'), (SELECT max(id) FROM messages))",
        f"""INSERT INTO task_queue (id, task_type, payload, status, scheduled_at, attempts, last_error, created_at)
            SELECT i, (ARRAY['send_reminder', 'expire_session', 'rate_provider'])[1 + i % 3],
                   json_build_object('target', i)::text,
                   (ARRAY['pending', 'running', 'done', 'failed'])[1 + i % 4],
                   {ts}, CASE WHEN i % 4 = 0 THEN NULL ELSE i % 5 END,
                   CASE WHEN i % 4 = 3 THEN 'timeout after ' || i || 's' END, {ts}
            FROM generate_series(1, {nt}) AS i""",
        "SELECT setval(pg_get_serial_sequence('task_queue', 'id'), (SELECT max(id) FROM task_queue))",
    ]


async def seed(conn: asyncpg.Connection, scale: float, *, drop: bool = False) -> dict[str, int]:
    """Create the legacy schema in ``conn``'s database and fill it; return rows per table."""
    async with conn.transaction():
        if drop:
            for t in LEGACY_TABLES:
                await conn.execute(f'DROP TABLE IF EXISTS "{t}" CASCADE')
        await conn.execute("SET LOCAL synchronous_commit = off")
        await conn.execute(LEGACY_DDL.read_text())
        for sql in statements(scale):
            await conn.execute(sql)
    await conn.execute("ANALYZE")
    rows = {}
    for t in reversed(LEGACY_TABLES):
        rows[t] = await conn.fetchval(f'SELECT count(*) FROM "{t}"')
    return rows


async def _main(url: str, scale: float, drop: bool) -> None:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        started = time.monotonic()
        rows = await seed(conn, scale, drop=drop)
        took = time.monotonic() - started
    finally:
        await conn.close()
    width = max(map(len, rows))
    for table, n in rows.items():
        print(f"{table:<{width}}  {n:>10,}")
    print(f"seeded scale {scale} in {took:.1f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--database-url", default=os.environ.get("DATABASE_URL"), help="target database (default: $DATABASE_URL)"
    )
    p.add_argument("--scale", type=float, default=0.001, help="1.0 = 1M customers, 300k users, 2M messages")
    p.add_argument("--drop", action="store_true", help="drop the legacy tables first")
    args = p.parse_args(argv)
    if not args.database_url:
        p.error("no database: pass --database-url or set DATABASE_URL")
    asyncio.run(_main(args.database_url, args.scale, args.drop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
