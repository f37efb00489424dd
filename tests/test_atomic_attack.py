"""capture's install and removal with every table's DDL in each short-lock try (blocking.ddl_with_short_locks),
attacked as an adversarial DBA would: partitioned sources with a busy partition, an application transaction that
writes a partition and then its parent while the start retries, the locks the start holds while it waits, kill -9
during the start's install across two databases, and a table dropped from a phase between two runs."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from test_guard_attack import LOOKUP, LOOKUP_MAPPING
from test_partitions import project, settings
from test_patience_attack import LOCKS_SQL, start_while_busy
from test_removal_attack import _captured, _kill, _phase, _tables_captured
from test_sync_attack import PARTITIONED, PARTITIONED_MAPPING

from conftest import run_cli, scalar, sql
from migrate_data import api
from test_orchestration import snapshot


async def _wait_for(cond, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await cond():
            return True
        await asyncio.sleep(0.02)
    return False


def _cycle(url: str, first: str, ours, holding: tuple[str, str], waiting: str, then: str, delay: float = 0.0) -> dict:
    """An application transaction runs ``first``; ``ours()`` (a coroutine: the start, the cutover) then holds
    ``holding`` (relation, lock mode) and waits for ``waiting``, which the application holds; after ``delay`` the
    application runs ``then``, which wants ``holding``: a lock cycle.  Returns whether the cycle was seen, how the
    application's transaction ended and what ours returned (or raised)."""
    seen: dict = {}

    async def scenario() -> None:
        app = await asyncpg.connect(url, server_settings={"lock_timeout": "10s"})
        await app.execute(first)
        task = asyncio.ensure_future(ours())
        probe = await asyncpg.connect(url)
        try:

            async def in_cycle() -> bool:
                rows = {tuple(r) for r in await probe.fetch(LOCKS_SQL, [holding[0], waiting])}
                return (*holding, True) in rows and any(r[0] == waiting and not r[2] for r in rows)

            seen["cycle"] = await _wait_for(in_cycle, 15)
            await asyncio.sleep(delay)
            try:
                await app.execute(then)
                await app.execute("COMMIT")
                seen["app"] = "committed"
            except asyncpg.PostgresError as e:
                seen["app"] = f"{type(e).__name__}: {e}"
                await app.execute("ROLLBACK")
        finally:
            await probe.close()
            await app.close()
        try:
            seen["ours"] = await task
        except Exception as e:  # noqa: BLE001 - what a deadlock did to us is what the test reports
            seen["ours"] = f"{type(e).__name__}: {e} {getattr(e, 'detail', '')}"

    asyncio.run(scenario())
    return seen


# == 1. a partitioned source with a busy partition ====================================================================
def test_a_start_waiting_for_a_busy_partition_holds_nothing_writers_of_the_other_partitions_wait_for(db_url, tmp_path):
    """An application transaction keeps ev_feb (a write straight into the leaf).  While the start retries, writes to
    ev_jan and through the parent must go through under a 2 s lock_timeout (one try is 1 s), and after the start every
    leaf is captured."""
    sql(db_url, PARTITIONED)
    s = settings(db_url, project(tmp_path, PARTITIONED_MAPPING))
    probes = {
        "leaf": "UPDATE ev_jan SET v = v WHERE id = 1",
        "parent": "UPDATE ev SET v = v WHERE id = 1 AND d < '2024-02-01'",
    }
    seen = start_while_busy(db_url, s, "UPDATE ev_feb SET v = v WHERE false", probes)
    assert seen["running"], seen
    assert (seen["leaf"], seen["parent"]) == ("ok", "ok"), seen
    assert seen["ok"], seen
    triggered = {
        r[0] for r in sql(db_url, "SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname LIKE 'md_capture_%'")
    }
    assert triggered == {"ev", "ev_jan", "ev_feb"}, triggered


@pytest.mark.parametrize("deadlock_timeout, delay", [("1s", 0.0), ("200ms", 0.0), ("200ms", 0.4)])
def test_an_application_writing_a_partition_then_its_parent_is_not_failed_by_the_start(
    make_db, tmp_path, deadlock_timeout, delay
):
    """The application writes ev_feb (leaf) and then, in the same transaction, ev (the parent): an ordinary
    application pattern.  The start's try has taken ev's trigger lock and waits for ev_feb: a lock cycle.  A DBA
    expects the migration to give way (a lock timeout, retried) and the application's transaction to commit; neither
    the application nor the start should end with "deadlock detected".  (A try that locks one table and then WAITS
    for another holds the first while it waits: NOWAIT tries would never be part of a cycle.)"""
    db_url = make_db()
    sql(db_url, f"ALTER DATABASE {db_url.rsplit('/', 1)[1]} SET deadlock_timeout = '{deadlock_timeout}'")
    sql(db_url, PARTITIONED)
    s = settings(db_url, project(tmp_path, PARTITIONED_MAPPING))
    seen = _cycle(
        db_url,
        "BEGIN; UPDATE ev_feb SET v = 'app leaf' WHERE id = 40",
        lambda: api.run_phase(s, "night", api.RunOptions(backup=False)),
        ("ev", "ShareRowExclusiveLock"),
        "ev_feb",
        "UPDATE ev SET v = 'app parent' WHERE id = 1",
        delay,  # 0.4: after the start's own deadlock check, the application's finds the cycle
    )
    assert seen["cycle"], seen
    assert seen["app"] == "committed", seen
    assert not isinstance(seen["ours"], str) and seen["ours"].validation.ok, seen
    assert scalar(db_url, "SELECT v FROM ev_t WHERE id = 40") == "app leaf"


# == 2. what the start holds, from before its savepoint, while it retries ===============================================
def test_a_start_retrying_on_one_table_holds_no_lock_a_writer_of_another_waits_for(db_url, tmp_path):
    """One database: the start's own statements (preflight, EXPLAIN, pre_state, ledger, ensure_capture) run before the
    savepoint.  While it retries on countries, what it holds on shops between tries is ACCESS SHARE (no writer waits
    for it), and a write to shops goes through under a 2 s lock_timeout, longer than one try."""
    sql(db_url, LOOKUP)
    s = settings(db_url, project(tmp_path, LOOKUP_MAPPING))
    probes = {"write": "UPDATE shops SET v = v WHERE id = 1", "insert": "INSERT INTO shops VALUES (999, 'es', 'new')"}
    seen = start_while_busy(db_url, s, "LOCK TABLE countries IN ROW EXCLUSIVE MODE", probes, ("shops", "tiendas"))
    assert seen["running"], seen
    # between tries only ACCESS SHARE (the start's reads); within one, shops' trigger lock for at most that try
    assert all(m in ("AccessShareLock", "ShareRowExclusiveLock") for t, m, _ in seen["locks"] if t == "shops"), seen
    assert (seen["write"], seen["insert"]) == ("ok", "ok"), seen
    assert seen["ok"], seen


# == 3. kill -9 during the start's install across two databases =========================================================
@pytest.mark.parametrize(
    "kill",
    [
        ("migrate_data.blocking:ddl_with_short_locks:return", 1),  # DDL done, registry not written, not committed
        ("migrate_data.capture:_record:return", 1),  # one registry row written, not committed
        ("migrate_data.capture:install:return", 1),  # the source committed, the target's start not
    ],
    ids=["ddl", "record", "committed"],
)
def test_a_start_killed_during_its_install_on_two_databases_finishes_exactly_when_run_again(make_db, tmp_path, kill):
    from test_removal_attack import TIENDAS

    def fresh(name: str):
        source, target = make_db(), make_db()
        sql(source, LOOKUP.replace(TIENDAS, ""))
        sql(target, TIENDAS)
        (tmp_path / name).mkdir()
        s = settings(target, project(tmp_path / name, LOOKUP_MAPPING)).with_(source_url=source)
        return s, source, target, {"SOURCE_DATABASE_URL": source}

    s, source, target, env = fresh("killed")
    c, csource, ctarget, cenv = fresh("clean")
    killed = _kill(s, env, *kill, "night", "--yes", "--no-backup")
    assert killed.returncode == -9, killed.stderr[-1500:]
    if kill[0].endswith("install:return"):
        assert _tables_captured(source, "night") == ["countries", "shops"]
    else:
        assert _tables_captured(source, "night") == [], _captured(source, "night")
    for url in (source, csource):
        sql(url, "UPDATE shops SET v = 'between' WHERE id = 3")
    again = run_cli("--project", str(s.project_dir), "night", "--yes", "--no-backup", url=s.database_url, env=env)
    clean = run_cli("--project", str(c.project_dir), "night", "--yes", "--no-backup", url=c.database_url, env=cenv)
    assert again.returncode == clean.returncode == 0, (again.stderr[-1500:], clean.stderr[-800:])
    for url in (source, csource):
        sql(url, "UPDATE shops SET v = 'after' WHERE id = 4")
    k, cl = _captured(source), _captured(csource)
    assert (k["triggers"], k["functions"], k["registry"]) == (cl["triggers"], cl["functions"], cl["registry"])
    assert _phase(target, "night") == _phase(ctarget, "night")
    for st in (s, c):
        done = run_cli("cutover", "night", "--yes", "--project", str(st.project_dir), url=st.database_url,
                       env={"SOURCE_DATABASE_URL": source if st is s else csource})  # fmt: skip
        assert done.returncode == 0, done.stderr[-1500:]
    assert snapshot(target) == snapshot(ctarget)
    assert _captured(source) == {"triggers": [], "functions": [], "registry": [], "log": []}


# == 4. a table dropped from a phase between two runs ================================================================
TWO = """
CREATE TABLE countries (code text PRIMARY KEY, name text);
CREATE TABLE shops (id int PRIMARY KEY, country text, v text);
CREATE TABLE tiendas (id int PRIMARY KEY, pais text, v text);
CREATE TABLE paises (codigo text PRIMARY KEY, nombre text);
INSERT INTO countries VALUES ('es', 'Spain'), ('fr', 'France');
INSERT INTO shops SELECT i, CASE WHEN i % 2 = 0 THEN 'es' ELSE 'fr' END, 'v' || i FROM generate_series(1, 20) i;
"""
TWO_MAPPING = """
tables:
  - source: shops
    target: tiendas
    columns: {id: id, pais: country, v: v}
  - source: countries
    target: paises
    columns: {codigo: code, nombre: name}
"""
ONE_MAPPING = """
tables:
  - source: shops
    target: tiendas
    columns: {id: id, pais: country, v: v}
"""


def test_a_table_dropped_from_a_phase_between_runs_leaves_no_capture_nor_log_nobody_knows_of(db_url, tmp_path):
    """The phase is killed after its start (capture on both tables), the application writes countries (logged), the
    mapping drops countries, the same command resumes: the resumed start removes countries' capture in the same try
    as it checks shops'.  Nothing of countries' capture may be left: no trigger, no function, no registry row, and no
    log row that sync will never apply and the cutover then reports (and keeps) as a late change."""
    sql(db_url, TWO)
    s = settings(db_url, project(tmp_path, TWO_MAPPING))
    killed = _kill(s, {}, "migrate_data.steps:Copy.apply:enter", 1, "night", "--yes", "--no-backup")
    assert killed.returncode == -9, killed.stderr[-1500:]
    assert _tables_captured(db_url, "night") == ["countries", "shops"], _captured(db_url, "night")
    sql(db_url, "UPDATE countries SET name = 'Francia' WHERE code = 'fr'")
    assert any(r[1] == "public.countries" for r in _captured(db_url, "night")["log"])
    (tmp_path / "mappings" / "night.yaml").write_text(ONE_MAPPING)
    again = run_cli("--project", str(s.project_dir), "night", "--yes", "--no-backup", url=db_url)
    assert again.returncode == 0, again.stderr[-1500:]
    assert _tables_captured(db_url, "night") == ["shops"], _captured(db_url, "night")
    assert [r[1] for r in _captured(db_url, "night")["registry"]] == ["public.shops"]
    synced = run_cli("sync", "night", "--project", str(s.project_dir), url=db_url)
    assert synced.returncode == 0, synced.stderr[-1500:]
    left = [r for r in _captured(db_url, "night")["log"] if r[1] == "public.countries"]
    cut = run_cli("cutover", "night", "--yes", "--project", str(s.project_dir), url=db_url)
    assert cut.returncode == 0, cut.stderr[-1500:]
    assert "after the last sync" not in cut.stdout, cut.stdout
    assert left == [], f"log rows of a table the phase no longer reads, never applied nor dropped: {left}"
    assert _captured(db_url) == {"triggers": [], "functions": [], "registry": [], "log": []}


@pytest.mark.parametrize("delay", [0.2, 1.3])
def test_a_report_reading_a_partition_then_its_parent_is_not_failed_by_the_cutovers_removal(db_url, tmp_path, delay):
    """Default server settings (deadlock_timeout 1s), a cutover with --lock-wait 3s (a documented flag).  A report's
    REPEATABLE READ transaction reads ev_feb (ACCESS SHARE): the block (SHARE) goes through, the phase is cut over,
    writes released; the removal's try drops ev's trigger (ACCESS EXCLUSIVE on the parent, granted) and waits for
    ev_feb.  The report then reads the parent: a lock cycle, and the report's own deadlock check (1 s after it began
    to wait, within the removal's 3 s try) aborts the REPORT with "deadlock detected".  A DBA expects the migration
    to give way, never to fail a read-only report."""
    from test_sync_attack import _night

    s = _night(db_url, tmp_path, PARTITIONED, PARTITIONED_MAPPING)
    seen = _cycle(
        db_url,
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM ev_feb",
        lambda: api.cutover(s, ["night"], lock_wait="3s", retries=3),
        ("ev", "AccessExclusiveLock"),
        "ev_feb",
        "SELECT count(*) FROM ev",
        delay,  # 0.2: the removal's deadlock check finds the cycle; 1.3: the report's
    )
    assert seen["cycle"], seen
    assert seen["app"] == "committed", seen  # the report's transaction
    assert not isinstance(seen["ours"], str) and seen["ours"].ok and seen["ours"].capture_removed, seen


def test_an_application_writing_two_tables_is_not_failed_by_the_cutovers_block_of_both(db_url, tmp_path):
    """The cutover blocks writes to shops and countries with one LOCK TABLE (countries first), --lock-wait 3s.  The
    application has written shops and then writes countries in the same transaction: the block holds countries and
    waits for shops, the application waits for countries, a lock cycle.  With a 3 s try the application's deadlock
    check (1 s) aborted the APPLICATION's transaction; the block now gives way (its tries wait under deadlock_timeout)
    and the application commits."""
    from test_sync_attack import _night

    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    seen = _cycle(
        db_url,
        "BEGIN; UPDATE shops SET v = 'app' WHERE id = 2",
        lambda: api.cutover(s, ["night"], lock_wait="3s", retries=5),
        ("countries", "ShareLock"),
        "shops",
        "UPDATE countries SET name = 'Francia' WHERE code = 'fr'",
    )
    assert seen["cycle"], seen
    assert seen["app"] == "committed", seen
    assert not isinstance(seen["ours"], str) and seen["ours"].ok and seen["ours"].attempts > 1, seen
    assert scalar(db_url, "SELECT v FROM tiendas WHERE id = 2") == "app"
