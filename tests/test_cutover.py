"""Cutover: writes to the phase's English tables blocked (reads go on), the last changes applied, validated with
checksums, capture removed; on a failed validation the writes are released and capture stays."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from test_sync import capture_triggers, waiting

from conftest import run, run_cli, scalar, sql
from migrate_data import api
from migrate_data.errors import MigrationError, RefusedError


async def _probe(url: str) -> dict[str, object]:
    """From another session: can the application write customers now?  Can it read them?"""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET lock_timeout = '200ms'")
        out: dict[str, object] = {"read": await conn.fetchval("SELECT count(*) FROM customers")}
        try:
            await conn.execute("UPDATE customers SET city = 'Blocked?' WHERE phone_number = '+593900000011'")
            out["write"] = "ok"
        except asyncpg.LockNotAvailableError:
            out["write"] = "blocked"
        return out
    finally:
        await conn.close()


@pytest.fixture
def applied(applied_db, settings_for):
    url = applied_db("phase2a")
    sql(url, "UPDATE customers SET city = 'Antes del corte' WHERE phone_number LIKE '+59390000002_'")
    return settings_for(url), url


def test_cutover_blocks_writes_applies_the_last_changes_validates_and_removes_capture(applied):
    settings, url = applied
    seen: dict[str, object] = {}

    async def while_blocked() -> None:
        seen.update(await _probe(url))

    result = run(api.cutover(settings, ["phase2a"], on_blocked=while_blocked))
    assert seen == {"read": 1000, "write": "blocked"}
    assert result.ok and result.capture_removed
    assert result.synced[0].changes == 10 and result.validations[0].ok and result.validations[0].deep
    assert result.blocked_tables == ("public.customers", "public.professions") and 0 < result.blocked_seconds < 10
    assert run(_probe(url))["write"] == "ok"  # released
    assert capture_triggers(url) == [] and waiting(url, "phase2a") == 0
    assert scalar(url, "SELECT cut_over_at IS NOT NULL FROM migrate_data.phases WHERE phase = 'phase2a'")
    status = {s.phase: s for s in run(api.status(settings))}["phase2a"]
    assert status.capture == "cut over" and status.cut_over_at is not None
    with pytest.raises(RefusedError, match="phase2a was cut over at"):
        run(api.sync(settings, ["phase2a"]))
    again = run_cli("cutover", "phase2a", "--yes", url=url)
    assert again.returncode == 0 and "phase2a was cut over before" in again.stdout


def test_a_cutover_that_does_not_validate_releases_the_writes_and_keeps_capture(applied, tmp_path):
    settings, url = applied
    sql(url, "UPDATE clientes SET ciudad = 'Escrita en español' WHERE telefono = '+593900000033'")  # not the mapping's
    out = run_cli("cutover", "phase2a", "--yes", url=url, env={"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)})
    assert out.returncode == 3, out.stderr
    assert "validation FAILED: writes released, change capture kept on" in out.stdout
    assert "1 rows of public.clientes differ" in out.stdout
    assert "writes to public.customers, public.professions were blocked for" in out.stdout
    assert run(_probe(url))["write"] == "ok"
    assert len(capture_triggers(url)) == 8
    assert scalar(url, "SELECT cut_over_at FROM migrate_data.phases WHERE phase = 'phase2a'") is None
    assert waiting(url, "phase2a") == 1  # the probe's write, captured: the changes before it were applied
    # sync never overwrites a row somebody else changed in the target: the DBA decides (here the row goes), and the
    # next change of its source row derives it again
    sql(url, "DELETE FROM clientes WHERE telefono = '+593900000033'")
    sql(url, "UPDATE customers SET city = city WHERE phone_number = '+593900000033'")
    assert run(api.cutover(settings, ["phase2a"])).ok


def test_a_long_transaction_makes_the_cutover_give_up_quickly_without_queueing_writers(applied):
    settings, url = applied

    async def go():
        holder = await asyncpg.connect(url)
        try:
            tr = holder.transaction()
            await tr.start()
            await holder.execute("UPDATE customers SET city = 'Larga' WHERE phone_number = '+593900000044'")
            started = asyncio.get_running_loop().time()
            with pytest.raises(MigrationError) as e:
                await api.cutover(settings, ["phase2a"], lock_wait="100ms", retries=2)
            took = asyncio.get_running_loop().time() - started
            probe = await _probe(url)  # another writer, on another row, while the long transaction goes on
            await tr.rollback()
            return e.value, took, probe, holder.get_server_pid()
        finally:
            await holder.close()

    error, took, probe, pid = run(go())
    assert "could not block writes to public.customers, public.professions" in error.message
    assert f"backend pid {pid}" in error.detail
    assert took < 5 and probe["write"] == "ok"
    assert scalar(url, "SELECT cut_over_at FROM migrate_data.phases WHERE phase = 'phase2a'") is None
    assert len(capture_triggers(url)) == 8


def test_a_cutover_applies_the_changes_pending_before_it_blocks_writes(applied):
    """The changes logged since the last sync (hours of them, on the night of the cutover) are applied with the
    application still writing; writes are blocked only for what came meanwhile."""
    settings, url = applied
    sql(url, "UPDATE customers SET city = 'Pendiente' WHERE phone_number LIKE '+5939000001__'")  # 100 more
    assert waiting(url, "phase2a") == 110
    pending: list[int] = []

    async def while_blocked() -> None:
        conn = await asyncpg.connect(url)
        try:
            pending.append(await conn.fetchval("SELECT count(*) FROM migrate_data.changes WHERE phase = 'phase2a'"))
        finally:
            await conn.close()

    result = run(api.cutover(settings, ["phase2a"], on_blocked=while_blocked))
    assert pending == [0], "the changes were applied while writes were blocked"
    assert result.ok and result.synced[0].changes == 110 and result.validations[0].deep
    assert scalar(url, "SELECT count(*) FROM clientes WHERE ciudad = 'Pendiente'") == 100


def test_a_cutover_whose_last_sync_takes_a_row_out_of_the_target_exits_3_naming_it(applied, tmp_path):
    settings, url = applied
    key = scalar(url, "SELECT id::text FROM customers WHERE phone_number = '+593900000021'")
    sql(url, "UPDATE customers SET notes = '{not json' WHERE id = $1::uuid", key)  # notas is jsonb
    out = run_cli("cutover", "phase2a", "--yes", url=url, env={"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)})
    assert out.returncode == 3, out.stderr
    assert f"phase2a: the last sync took row ({key}) out of public.clientes" in out.stdout
    assert "validation FAILED: writes released, change capture kept on" in out.stdout
    assert run(_probe(url))["write"] == "ok" and len(capture_triggers(url)) == 8
    assert scalar(url, "SELECT cut_over_at FROM migrate_data.phases WHERE phase = 'phase2a'") is None


def test_cutover_refuses_a_phase_before_the_phase_it_requires_and_passes_with_both(applied_db, settings_for):
    url = applied_db("phase2b")
    settings = settings_for(url)
    with pytest.raises(RefusedError, match="phase2b cannot be cut over before phase2a, which it requires"):
        run(api.cutover(settings, ["phase2b"]))
    assert len(capture_triggers(url)) == 8 + 12  # nothing was changed
    result = run(api.cutover(settings, ["phase2b", "phase2a"]))
    assert result.ok and result.capture_removed and capture_triggers(url) == []
