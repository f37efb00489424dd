"""capture's removal (capture._remove), attacked as an adversarial DBA would, first when it removed one table per
transaction (these tests found the window that opened: a transaction half logged, a late write lost, `status` saying
`on`), then as it is, one transaction with every table's DDL in each short-lock try: kill -9 inside the removal and
after it, on one database and across two; the application writing while the removal retries; a table two phases
capture; a busy table.

Small projects of their own: ``night`` (shops, looking up countries: two captured tables, removed countries first)
on one database or across two, and ``alpha`` / ``beta`` (both capture countries)."""

from __future__ import annotations

import asyncio
import re
import textwrap
import time

import asyncpg
import pytest
from test_guard_attack import LOOKUP, LOOKUP_MAPPING
from test_partitions import project, settings
from test_sync import apply

from conftest import ROOT, run, run_cli, scalar, sql
from killer import kill_at
from migrate_data import api
from test_orchestration import snapshot

TIENDAS = "CREATE TABLE tiendas (id int PRIMARY KEY, pais text, v text);"
BETWEEN = ("migrate_data.capture:_removal:return", 1)  # inside the removal: every table's DDL worked out, none run
BOTH = ["countries", "shops"]


def _proj(s) -> list[str]:
    return ["--project", str(s.project_dir)]


# -- the state of capture, as a DBA would look at it -------------------------------------------------------------------
def _captured(url: str, phase: str | None = None) -> dict:
    """Capture of ``phase`` (or of every phase) in the source: triggers, trigger functions, registry rows, log keys."""
    like = f"md\\_capture\\_{phase}\\_%" if phase else "md\\_capture\\_%"
    has_registry = scalar(url, "SELECT to_regclass('migrate_data.capture') IS NOT NULL")
    return {
        "triggers": [
            tuple(r)
            for r in sql(
                url,
                "SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger WHERE tgname LIKE $1 ORDER BY 1, 2",
                like,
            )
        ],
        "functions": sorted(
            r[0]
            for r in sql(
                url,
                "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = 'migrate_data' AND p.proname LIKE 'capture\\_%'",
            )
        )
        if phase is None
        else _functions_of(url, phase),
        "registry": [
            tuple(r)
            for r in sql(
                url,
                "SELECT phase, source, function FROM migrate_data.capture WHERE $1::text IS NULL OR phase = $1 "
                "ORDER BY 1, 2",
                phase,
            )
        ]
        if has_registry
        else [],
        "log": [
            tuple(r)
            for r in sql(
                url,
                "SELECT phase, source, key, op FROM migrate_data.changes WHERE $1::text IS NULL OR phase = $1 "
                "ORDER BY id",
                phase,
            )
        ]
        if has_registry
        else [],
    }


def _functions_of(url: str, phase: str) -> list[str]:
    """The trigger functions of ``phase`` still there (named by capture_sql.function_name for each table)."""
    from migrate_data.capture_sql import function_name

    out = []
    for table in ("public.countries", "public.shops"):
        fn = function_name(phase, table)
        if scalar(url, "SELECT to_regprocedure($1 || '()') IS NOT NULL", fn):
            out.append(table)
    return out


def _tables_captured(url: str, phase: str) -> list[str]:
    return sorted({r[0] for r in _captured(url, phase)["triggers"]})


def _phase(url: str, phase: str) -> tuple | None:
    rows = sql(url, "SELECT state, cut_over_at IS NOT NULL FROM migrate_data.phases WHERE phase = $1", phase)
    return tuple(rows[0]) if rows else None


def _capture_status(s, phase: str = "night") -> str:
    (st,) = [p for p in run(api.status(s)) if p.phase == phase]
    return st.capture


def _late(stdout: str) -> int:
    m = re.search(r"WARNING: ([\d,]+) changes were written to the English tables after the last sync", stdout)
    return int(m.group(1).replace(",", "")) if m else 0


# -- a `night` project on one database or across two -------------------------------------------------------------------
def _night_on(make_db, tmp_path, where: str, name: str = "p"):
    """(settings, source url, target url, env of a CLI run): ``night`` run once, capture on in the source."""
    (tmp_path / name).mkdir()
    proj = project(tmp_path / name, LOOKUP_MAPPING)
    if where == "one database":
        source = target = make_db()
        sql(source, LOOKUP)
        s, env = settings(target, proj), {}
    else:
        source, target = make_db(), make_db()
        sql(source, LOOKUP.replace(TIENDAS, ""))
        sql(target, TIENDAS)
        s, env = settings(target, proj).with_(source_url=source), {"SOURCE_DATABASE_URL": source}
    (result,) = apply(s, "night")
    assert result.validation.ok
    assert _tables_captured(source, "night") == ["countries", "shops"]
    return s, source, target, env


WHERE = ["one database", "two databases"]


def _cli(s, env, *args: str):
    return run_cli(*args, *_proj(s), url=s.database_url, env=env)


def _kill(s, env, target: str, nth: int, *args: str):
    return kill_at(target, *_proj(s), *args, url=s.database_url, cwd=ROOT, env=env, nth=nth)


# == 1. kill -9 inside the removal, and after it =====================================================================
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("kill", [BETWEEN, ("migrate_data.capture:_remove:return", 1)], ids=["between", "after-last"])
def test_a_cutover_killed_during_the_removal_finishes_exactly_when_run_again(make_db, tmp_path, where, kill):
    s, source, target, env = _night_on(make_db, tmp_path, where, "killed")
    c, csource, ctarget, cenv = _night_on(make_db, tmp_path, where, "clean")
    for url in {source, csource}:
        sql(url, "UPDATE shops SET v = 'before the cutover' WHERE id = 3")
    clean = _cli(c, cenv, "cutover", "night", "--yes")
    assert clean.returncode == 0, clean.stderr

    killed = _kill(s, env, *kill, "cutover", "night", "--yes")
    assert killed.returncode == -9, killed.stderr[-1500:]
    assert _phase(target, "night") == ("applied", True)
    if kill == BETWEEN:
        assert _tables_captured(source, "night") == BOTH  # one transaction: a kill inside it leaves capture all on
    # a sync in between refuses (the phase is cut over) and changes nothing
    before = _captured(source)
    synced = _cli(s, env, "sync", "night")
    assert synced.returncode != 0 and "cut over" in synced.stderr, (synced.returncode, synced.stderr[-800:])
    assert _captured(source) == before

    again = _cli(s, env, "cutover", "night", "--yes")
    assert again.returncode == 0, again.stderr
    assert _captured(source) == _captured(csource) == {"triggers": [], "functions": [], "registry": [], "log": []}
    assert _phase(target, "night") == _phase(ctarget, "night") == ("applied", True)
    assert snapshot(target) == snapshot(ctarget)


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("kill", ["between", "after-last"])
def test_a_rollback_killed_during_the_removal_finishes_exactly_when_run_again(make_db, tmp_path, where, kill):
    s, source, target, env = _night_on(make_db, tmp_path, where, "killed")
    c, csource, ctarget, cenv = _night_on(make_db, tmp_path, where, "clean")
    for url in {source, csource}:  # logged, not synced: the rollback drops it
        sql(url, "UPDATE shops SET v = 'not synced' WHERE id = 3; "
            "UPDATE countries SET name = 'Espana' WHERE code = 'es'")  # fmt: skip
    assert _captured(source, "night")["log"]
    clean = _cli(c, cenv, "rollback", "night", "--yes")
    assert clean.returncode == 0, clean.stderr

    if kill == "between":
        killed = _kill(s, env, *BETWEEN, "rollback", "night", "--yes")
    else:
        # the rollback of `night` deletes tiendas' 20 rows with one rowcount; capture._remove's DELETE is the 2nd
        killed = _kill(s, env, "migrate_data.capture:rowcount:enter", 2, "rollback", "night", "--yes")
    assert killed.returncode == -9, killed.stderr[-1500:]
    assert _phase(target, "night") == ("rolling_back", False)
    left = _captured(source, "night")
    assert left["log"], "the log was dropped before the kill: the kill point is not where this test means it"
    assert _tables_captured(source, "night") == BOTH, left  # one transaction: a kill inside it leaves capture all on
    # a sync in between refuses (the phase is rolling back) and changes nothing
    before = _captured(source)
    synced = _cli(s, env, "sync", "night")
    assert synced.returncode != 0, synced.stdout
    assert _captured(source) == before

    again = _cli(s, env, "rollback", "night", "--yes")
    assert again.returncode == 0, again.stderr
    assert _captured(source) == _captured(csource) == {"triggers": [], "functions": [], "registry": [], "log": []}
    assert _phase(target, "night") == _phase(ctarget, "night") == ("rolled_back", False)
    assert snapshot(target) == snapshot(ctarget)
    assert snapshot(source) == snapshot(csource)


# == 2. what `status` says in between ==================================================================================
@pytest.mark.parametrize("command", ["cutover", "rollback"])
def test_status_between_two_tables_removals_does_not_say_capture_is_on(make_db, tmp_path, command):
    """Killed inside the removal: `status` must say something true.  (Removed one table per transaction, a kill left
    countries' capture gone and shops' there, and status said `on`: writes to countries were no longer logged at all.)"""
    s, source, target, env = _night_on(make_db, tmp_path, "one database")
    killed = _kill(s, env, *BETWEEN, command, "night", "--yes")
    assert killed.returncode == -9, killed.stderr[-1500:]
    sql(source, "UPDATE countries SET name = 'Francia' WHERE code = 'fr'")
    captured = _tables_captured(source, "night")  # a kill inside the removal leaves both
    logged = {r[1] for r in _captured(source, "night")["log"]}
    shown = _capture_status(s)
    assert shown != "on" or (captured == ["countries", "shops"] and "public.countries" in logged), (
        f"status says capture {shown!r}; captured: {captured}; the write to countries logged: "
        f"{'public.countries' in logged}"
    )


# == 3. the application writing while the removal retries, or after a killed one ====================================
APP_TX = (  # one application transaction that writes both tables
    "BEGIN; UPDATE countries SET name = 'Francia!' WHERE code = 'fr'; UPDATE shops SET v = 'app' WHERE id = 5; COMMIT"
)


def test_a_write_made_after_a_cutover_was_killed_between_two_tables_is_kept_and_reported(make_db, tmp_path):
    """README: "a write … made after a cutover was killed, stays in migrate_data.changes, and the cutover prints a
    WARNING with their number".  Killed inside the removal, then one application transaction updates countries and
    shops: both writes are kept and counted.  (Removed one table per transaction, shops' write was kept and countries'
    neither applied nor kept: the late log told half of the transaction.)"""
    s, source, target, env = _night_on(make_db, tmp_path, "one database")
    killed = _kill(s, env, *BETWEEN, "cutover", "night", "--yes")
    assert killed.returncode == -9, killed.stderr[-1500:]
    sql(source, APP_TX)
    again = _cli(s, env, "cutover", "night", "--yes")
    assert again.returncode == 0, again.stderr
    kept = sorted({r[1] for r in _captured(source, "night")["log"]})
    assert _late(again.stdout) == len(_captured(source, "night")["log"]) > 0, again.stdout
    assert kept == ["public.countries", "public.shops"], f"late changes kept: {kept}"


def test_an_application_transaction_during_a_slow_removal_is_logged_whole_or_not_at_all(make_db, tmp_path):
    """A report keeps shops (ACCESS SHARE) while the cutover removes capture, which retries.  The application's
    transaction meanwhile writes both tables: it is logged whole (and kept as late) or not at all.  (Removed one table
    per transaction, countries' triggers were gone while shops' drop retried: the shops write was kept, the
    countries write neither applied nor kept.)"""
    s, source, target, env = _night_on(make_db, tmp_path, "one database")
    seen: dict = {}

    async def scenario() -> None:
        report = await asyncpg.connect(source)
        await report.execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM shops")
        try:
            task = asyncio.ensure_future(api.cutover(s, ["night"], lock_wait="300ms", retries=10))
            probe = await asyncpg.connect(source)
            try:
                deadline = time.monotonic() + 10
                cut = "SELECT cut_over_at IS NOT NULL FROM migrate_data.phases WHERE phase = 'night'"
                while time.monotonic() < deadline and not task.done() and not await probe.fetchval(cut):
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # cut over, writes released: the removal is retrying on shops
                seen["retrying"] = not task.done()
                app = await asyncpg.connect(source, server_settings={"lock_timeout": "5s"})
                try:
                    await app.execute(APP_TX)
                finally:
                    await app.close()
            finally:
                await probe.close()
        finally:
            await report.execute("ROLLBACK")
            await report.close()
        result = await task
        seen["ok"], seen["removed"], seen["late"] = result.ok, result.capture_removed, result.late

    asyncio.run(scenario())
    assert seen["retrying"], seen
    assert seen["ok"] and seen["removed"], seen
    kept = sorted({r[1] for r in _captured(source, "night")["log"]})
    assert seen["late"] == len(_captured(source, "night")["log"])
    assert kept in ([], ["public.countries", "public.shops"]), f"one transaction, half of it kept as late: {kept}"


@pytest.mark.parametrize("where", WHERE)
def test_a_rollback_killed_between_two_tables_loses_nothing_of_the_application(make_db, tmp_path, where):
    s, source, target, env = _night_on(make_db, tmp_path, where)
    killed = _kill(s, env, *BETWEEN, "rollback", "night", "--yes")
    assert killed.returncode == -9, killed.stderr[-1500:]
    sql(source, APP_TX)
    again = _cli(s, env, "rollback", "night", "--yes")
    assert again.returncode == 0, again.stderr
    assert scalar(source, "SELECT name FROM countries WHERE code = 'fr'") == "Francia!"
    assert scalar(source, "SELECT v FROM shops WHERE id = 5") == "app"
    assert _captured(source) == {"triggers": [], "functions": [], "registry": [], "log": []}
    assert scalar(target, "SELECT count(*) FROM tiendas") == 0


# == 4. a table two phases capture =====================================================================================
ALPHA_MAPPING = """
tables:
  - source: countries
    target: paises
    columns:
      codigo: code
      nombre: name
"""


def _two_phases(make_db, tmp_path):
    """``alpha`` (countries itself) and ``beta`` (shops, looking up countries), both run: countries captured twice."""
    url = make_db()
    sql(url, LOOKUP + "CREATE TABLE paises (codigo text PRIMARY KEY, nombre text);")
    proj = project(tmp_path, LOOKUP_MAPPING)
    (proj / "mappings" / "night.yaml").rename(proj / "mappings" / "beta.yaml")
    (proj / "mappings" / "alpha.yaml").write_text(textwrap.dedent(ALPHA_MAPPING))
    s = settings(url, proj)
    for result in apply(s, "alpha", "beta"):
        assert result.validation.ok
    assert _tables_captured(url, "alpha") == ["countries"] and _tables_captured(url, "beta") == ["countries", "shops"]
    return s, url


@pytest.mark.parametrize("command", ["cutover", "rollback"])
def test_removing_one_phases_capture_table_by_table_leaves_the_other_phases_capture_of_a_shared_table(
    make_db, tmp_path, command
):
    s, url = _two_phases(make_db, tmp_path)
    sql(url, "UPDATE countries SET name = 'Francia' WHERE code = 'fr'; UPDATE shops SET v = 'x' WHERE id = 2")
    alpha = _captured(url, "alpha")
    assert alpha["log"] and alpha["functions"] == ["public.countries"] and len(alpha["triggers"]) == 4
    killed = _kill(s, {}, *BETWEEN, command, "beta", "--yes")
    assert killed.returncode == -9, killed.stderr[-1500:]
    assert _tables_captured(url, "beta") == BOTH
    assert _captured(url, "alpha") == alpha
    assert _capture_status(s, "alpha") == "on"
    again = _cli(s, {}, command, "beta", "--yes")
    assert again.returncode == 0, again.stderr
    assert _captured(url, "beta") == {"triggers": [], "functions": [], "registry": [], "log": []}
    assert _captured(url, "alpha") == alpha
    sql(url, "UPDATE countries SET name = 'Espana' WHERE code = 'es'")  # alpha still captures countries
    synced = _cli(s, {}, "sync", "alpha")
    assert synced.returncode == 0, synced.stderr
    assert [tuple(r) for r in sql(url, "SELECT codigo, nombre FROM paises ORDER BY 1")] == [
        ("es", "Espana"),
        ("fr", "Francia"),
    ]


# == 5. a removal that fails on a busy table ===========================================================================
def test_a_cutover_whose_removal_fails_on_a_busy_table_says_so_and_finishes_when_run_again(make_db, tmp_path):
    s, source, target, env = _night_on(make_db, tmp_path, "one database")

    async def hold() -> asyncpg.Connection:
        report = await asyncpg.connect(source)
        await report.execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM shops")
        return report

    loop = asyncio.new_event_loop()
    report = loop.run_until_complete(hold())
    try:
        t0 = time.monotonic()
        res = _cli(s, env, "cutover", "night", "--yes", "--lock-wait", "200ms", "--retries", "0")
        took = time.monotonic() - t0
        sessions = scalar(
            source,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'migrate-data' "
            "AND datname = current_database()",
        )
    finally:
        loop.run_until_complete(report.execute("ROLLBACK"))
        loop.run_until_complete(report.close())
        loop.close()
    assert res.returncode == 0, (res.returncode, res.stderr[-1500:])
    assert took < 10, took
    assert "change capture NOT removed yet: run the same command again" in res.stdout, res.stdout
    assert "could not turn off change capture on public.countries, public.shops" in res.stderr, res.stderr[-1500:]
    assert "at: DROP TRIGGER IF EXISTS" in res.stderr and 'ON "public"."shops"' in res.stderr, res.stderr[-1500:]
    assert sessions == 0
    assert _phase(target, "night") == ("applied", True)
    assert _tables_captured(source, "night") == BOTH  # nothing removed: capture left whole
    assert len(_captured(source, "night")["triggers"]) == 8 and _captured(source, "night")["functions"] == [
        "public.countries",
        "public.shops",
    ]
    again = _cli(s, env, "cutover", "night", "--yes", "--lock-wait", "200ms", "--retries", "0")
    assert again.returncode == 0, again.stderr
    assert "change capture removed" in again.stdout, again.stdout
    assert _captured(source) == {"triggers": [], "functions": [], "registry": [], "log": []}


def test_late_changes_are_reported_even_when_the_removal_fails_on_a_busy_table(make_db, tmp_path):
    """A write that waited for the block goes into shops once writes are released: logged, a late change.  The removal
    then fails on shops (a report holds it): the cutover returns late=0 and prints no WARNING, though the change is
    in the log (it is counted only by the transaction after every table's removal).  (Also so before this change.)"""
    s, source, target, env = _night_on(make_db, tmp_path, "one database")
    seen: dict = {}

    async def scenario() -> None:
        report = await asyncpg.connect(source)
        await report.execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM shops")
        writer: list[asyncio.Task] = []

        async def write() -> None:
            app = await asyncpg.connect(source)
            try:
                await app.execute("UPDATE shops SET v = 'waited for the block' WHERE id = 7")
            finally:
                await app.close()

        async def on_blocked() -> None:
            writer.append(asyncio.ensure_future(write()))
            await asyncio.sleep(0.3)  # the write queues behind the block

        try:
            result = await api.cutover(s, ["night"], lock_wait="200ms", retries=0, on_blocked=on_blocked)
            await writer[0]
        finally:
            await report.execute("ROLLBACK")
            await report.close()
        seen["ok"], seen["removed"], seen["late"] = result.ok, result.capture_removed, result.late

    asyncio.run(scenario())
    logged = len(_captured(source, "night")["log"])
    assert seen["ok"] and not seen["removed"], seen
    assert logged > 0
    assert seen["late"] == logged, f"{logged} late changes in the log, the cutover reported {seen['late']}"


# == 6. a start killed across two databases; its rollback killed during the removal =================================
@pytest.mark.parametrize("kill", [BETWEEN, ("migrate_data.capture:rowcount:enter", 1)], ids=["between", "after-last"])
def test_a_stray_captures_rollback_killed_during_the_removal_drops_the_log_when_run_again(make_db, tmp_path, kill):
    """Two databases: `night` killed after the source committed capture, before the target committed the start; the
    application writes (logged).  `rollback night` (stray_capture) is killed inside the removal; run again, it removes
    triggers, registry and log.  (Removed one table per transaction, a kill after every table's removal left the log
    without a registry: the same command said "not applied; nothing to roll back" and the log rows stayed for good.)"""
    source, target = make_db(), make_db()
    sql(source, LOOKUP.replace(TIENDAS, ""))
    sql(target, TIENDAS)
    (tmp_path / "p").mkdir()
    s = settings(target, project(tmp_path / "p", LOOKUP_MAPPING)).with_(source_url=source)
    env = {"SOURCE_DATABASE_URL": source}
    started = _kill(s, env, "migrate_data.capture:install:return", 1, "night", "--yes", "--no-backup")
    assert started.returncode == -9, started.stderr[-1500:]
    assert _phase(target, "night") is None and _tables_captured(source, "night") == ["countries", "shops"]
    sql(source, "UPDATE shops SET v = 'app' WHERE id = 5")
    assert _captured(source, "night")["log"]
    killed = _kill(s, env, *kill, "rollback", "night", "--yes")
    assert killed.returncode == -9, killed.stderr[-1500:]
    left = _captured(source, "night")
    assert left["log"], "the log was dropped before the kill: the kill point is not where this test means it"
    # after-last, on this code: registry and triggers all gone, the log not (before, the kill left all of it)
    shown = _capture_status(s)
    again = _cli(s, env, "rollback", "night", "--yes")
    assert _captured(source) == {"triggers": [], "functions": [], "registry": [], "log": []}, (
        again.returncode,
        again.stderr[-600:],
        shown,
    )
