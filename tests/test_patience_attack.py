"""sync --lock-wait/--retries, the cutover's patience for its repair and capture's removal, the refusal of a wait
without limit, and the fork-server killer, attacked as an adversarial DBA would (helper's attack on this change; each
test failed before its fix): a repair or a block that runs out of tries leaves nothing half-done; a --lock-wait that
PostgreSQL reads as "no limit" (or refuses) is refused before connecting; a killed forked command behaves as a killed
process of its own."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from test_guard_attack import LOOKUP, LOOKUP_MAPPING
from test_keys_attack import ITEMS, ITEMS_MAPPING, _status
from test_partitions import project, settings
from test_sync_attack import _night

from conftest import ROOT, cli_env, run_cli, scalar, sql
from killer import kill_at

MOVED = "ALTER TABLE countries ALTER COLUMN name TYPE varchar(40) USING upper(name)"
NOWHERE = "postgresql://nobody@127.0.0.1:1/nowhere"


def _proj(s) -> list[str]:
    return ["--project", str(s.project_dir)]


@contextmanager
def _holding(url: str, table: str):
    """An application transaction that wrote ``table`` (ROW EXCLUSIVE) and stays open for the block."""
    loop = asyncio.new_event_loop()
    holder = loop.run_until_complete(asyncpg.connect(url))
    try:
        loop.run_until_complete(holder.execute(f"BEGIN; LOCK TABLE {table} IN ROW EXCLUSIVE MODE"))
        yield holder
        loop.run_until_complete(holder.execute("ROLLBACK"))
    finally:
        loop.run_until_complete(holder.close())
        loop.close()


def _state(url: str) -> dict:
    """What a failed command must leave as it was: registry, triggers, log, write marks, runs, phases."""
    return {
        "registry": [
            tuple(r)
            for r in sql(
                url,
                "SELECT source, function, attnums, atttypes, shape, installed_at FROM migrate_data.capture ORDER BY 1",
            )
        ],
        "triggers": [
            tuple(r)
            for r in sql(
                url,
                "SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger WHERE tgname LIKE 'md_capture_%' "
                "ORDER BY 1, 2",
            )
        ],
        "functions": [
            tuple(r)
            for r in sql(
                url,
                "SELECT p.proname, md5(p.prosrc) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = 'migrate_data' AND p.proname LIKE 'capture\\_%' ORDER BY 1",
            )
        ],
        "log": [tuple(r) for r in sql(url, "SELECT id, source, key, op FROM migrate_data.changes ORDER BY id")],
        "writes": scalar(url, "SELECT count(*) FROM migrate_data.writes"),
        "cut_over": scalar(url, "SELECT cut_over_at IS NOT NULL FROM migrate_data.phases WHERE phase = 'night'"),
    }


def _leftovers(url: str) -> dict:
    """After the command: runs still 'running', our sessions (idle in transaction or not), the advisory lock."""
    db = url.rsplit("/", 1)[1]
    return {
        "running": scalar(url, "SELECT count(*) FROM migrate_data.runs WHERE status = 'running'"),
        "sessions": [
            tuple(r)
            for r in sql(
                url,
                "SELECT state, left(query, 60) FROM pg_stat_activity WHERE application_name = 'migrate-data' "
                "AND datname = $1 AND pid <> pg_backend_pid()",
                db,
            )
        ],
        "advisory": scalar(
            url,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        ),
    }


async def _attempt(url: str, statement: str, wait: str) -> str:
    """An application statement with a ``wait`` lock_timeout: 'ok', or why not."""
    conn = await asyncpg.connect(url, server_settings={"lock_timeout": wait})
    try:
        await conn.execute(statement)
        return "ok"
    except asyncpg.LockNotAvailableError as e:
        return f"blocked > {wait}: {e}"
    finally:
        await conn.close()


def start_while_busy(url: str, s, busy: str, probes: dict[str, str], locks: tuple[str, ...] = ()) -> dict:
    """Run the phase ``night`` of ``s`` while an application transaction that ran ``busy`` stays open; 3 s in (the
    start retrying), each probe statement under a 2 s lock_timeout (more than one try), and which of ``locks`` our
    sessions hold then; the application's transaction ends, the run finishes.  Returns what was seen."""
    from migrate_data import api

    seen: dict = {}

    async def scenario() -> None:
        holder = await asyncpg.connect(url)
        await holder.execute(f"BEGIN; {busy}")
        task = asyncio.ensure_future(api.run_phase(s, "night", api.RunOptions(backup=False)))
        try:
            await asyncio.sleep(3.0)
            seen["running"] = not task.done()
            probe = await asyncpg.connect(url)
            try:
                seen["locks"] = [tuple(r) for r in await probe.fetch(LOCKS_SQL, list(locks)) if r["granted"]]
            finally:
                await probe.close()
            for name, statement in probes.items():
                seen[name] = await _attempt(url, statement, "2s")
        finally:
            await holder.execute("ROLLBACK")
            await holder.close()
        seen["ok"] = (await task).validation.ok

    asyncio.run(scenario())
    return seen


LOCKS_SQL = (
    "SELECT l.relation::regclass::text, l.mode, l.granted FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
    "WHERE a.application_name = 'migrate-data' AND a.datname = current_database() AND l.locktype = 'relation' "
    "AND l.relation::regclass::text = ANY ($1::text[]) ORDER BY 1, 2, 3"
)


def _writable(url: str, statement: str) -> str:
    """An application write with a 1 s lock_timeout: 'ok', or why not."""
    return asyncio.run(_attempt(url, statement, "1s"))


# -- 1. a repair that runs out of tries leaves nothing half-done --------------------------------------------------
@pytest.mark.parametrize("command", ["sync", "cutover"])
def test_a_repair_out_of_tries_leaves_nothing_half_done_and_nothing_held(db_url, tmp_path, command):
    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    sql(db_url, MOVED)
    sql(db_url, "UPDATE shops SET v = 'pending' WHERE id = 3")
    before = _state(db_url)
    assert before["functions"] and before["triggers"] and before["registry"]  # what must stay is there to compare
    extra = ["--yes"] if command == "cutover" else []
    with _holding(db_url, "countries"):
        t0 = time.monotonic()
        res = run_cli(command, "night", *extra, "--lock-wait", "100ms", "--retries", "1", *_proj(s), url=db_url)
        waited = time.monotonic() - t0
        left = _leftovers(db_url)  # still inside the application's transaction: nothing of ours may hold anything
        probe = _writable(db_url, "UPDATE shops SET v = v WHERE false; UPDATE countries SET name = name WHERE false")
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "could not turn on change capture on public.countries" in res.stderr, res.stderr
    assert "through 2 attempts of 100ms each" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert waited < 8.0
    assert left == {"running": 0, "sessions": [], "advisory": 0}, left
    assert probe == "ok", probe  # writes are not blocked after the failed command
    assert _state(db_url) == before
    assert _status(s) == "COLUMN MOVED"
    # once the table is free, the same command finishes
    again = run_cli(command, "night", *extra, *_proj(s), url=db_url)
    assert again.returncode == 0, again.stderr
    assert scalar(db_url, "SELECT v FROM tiendas WHERE id = 3") == "pending"


# -- 2. a cutover with --retries 0 on a busy table ------------------------------------------------------------------
def test_a_cutover_with_no_retries_on_a_busy_table_fails_cleanly_and_releases_everything(db_url, tmp_path):
    s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)
    sql(db_url, "UPDATE items SET v = 'pending' WHERE id = 3")
    with _holding(db_url, "items"):
        t0 = time.monotonic()
        res = run_cli("cutover", "night", "--yes", "--lock-wait", "200ms", "--retries", "0", *_proj(s), url=db_url)
        waited = time.monotonic() - t0
        left = _leftovers(db_url)
        probe = _writable(db_url, "UPDATE items SET v = 'app' WHERE id = 4")
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "could not block writes to public.items" in res.stderr, res.stderr
    assert "through 1 attempts of 200ms each" in res.stderr, res.stderr
    assert waited < 8.0
    assert left == {"running": 0, "sessions": [], "advisory": 0}, left
    assert probe == "ok", probe
    assert not scalar(db_url, "SELECT cut_over_at IS NOT NULL FROM migrate_data.phases WHERE phase = 'night'")
    assert scalar(db_url, "SELECT status FROM migrate_data.runs WHERE kind = 'cutover' ORDER BY id DESC LIMIT 1") == (
        "failed"
    )
    assert _status(s) == "on"
    sql(db_url, "UPDATE items SET v = 'after' WHERE id = 5")
    assert _writable(db_url, "UPDATE items SET v = 'after2' WHERE id = 6") == "ok"
    again = run_cli("cutover", "night", "--yes", *_proj(s), url=db_url)
    assert again.returncode == 0, again.stderr
    assert [scalar(db_url, f"SELECT v FROM articulos WHERE id = {i}") for i in (3, 4, 5, 6)] == [
        "pending",
        "app",
        "after",
        "after2",
    ]


# -- 3. --lock-wait values that slip through -------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["sync", "cutover"])
@pytest.mark.parametrize("wait", ["0", "0ms", "0.4ms", "0.0001ms", "0.5ms", "400us", "1us", "0.4"])
def test_a_lock_wait_postgres_rounds_to_zero_is_refused_like_zero(server_url, command, wait):
    """PostgreSQL rounds a lock_timeout below 1 ms to the nearest whole ms: 0.4ms, 0.5ms (rint), 400us, 1us and a
    bare 0.4 (ms) all become 0, which is no limit at all: exactly what the refusal of '0' is for."""
    assert scalar(server_url, "SELECT set_config('lock_timeout', $1, true)", wait) == "0"
    result = run_cli(command, "phase2a", "--yes" if command == "cutover" else "--follow", "--lock-wait", wait,
                     url=NOWHERE)  # fmt: skip
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "would wait without limit" in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["sync", "cutover"])
@pytest.mark.parametrize("wait", ["25d", "999999999h", "9" * 40, "\uff15s", "5\u00a0s", "soon"])
def test_a_lock_wait_postgres_refuses_is_refused_before_connecting(command, wait):
    """Beyond 2147483647 ms (24.8 days), fullwidth digits, a no-break space: PostgreSQL refuses them as lock_timeout,
    and it did so only once the command had connected, taken the lock and (a cutover) applied the catch-up.  A flag
    PostgreSQL cannot take is bad input: exit 2 before anything, as '0' and 'soon' are."""
    result = run_cli(command, "phase2a", "--yes" if command == "cutover" else "--follow", "--lock-wait", wait,
                     url=NOWHERE)  # fmt: skip
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Invalid value for '--lock-wait'" in result.stderr, result.stderr


def test_a_lock_wait_with_spaces_that_postgres_reads_is_accepted(db_url, tmp_path):
    """What held: ' 5 s' is stripped to '5 s', which PostgreSQL reads as 5 s."""
    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    sql(db_url, MOVED)
    res = run_cli("sync", "night", "--lock-wait", " 5 s", "--retries", "0", *_proj(s), url=db_url)
    assert res.returncode == 0, res.stderr
    assert _status(s) == "on"


@pytest.mark.parametrize("command", ["sync", "cutover"])
def test_a_sub_millisecond_lock_wait_never_queues_the_applications_writes_without_limit(db_url, tmp_path, command):
    """--lock-wait 0.4ms --retries 0 on a busy table: refused, or one short try, then an exit.  PostgreSQL reads 0.4ms
    as 0 (no limit): the repair's CREATE TRIGGER (sync) or the cutover's LOCK … IN SHARE MODE waited as long as the
    application's transaction lasted, and every new write of the application queued behind it."""
    if command == "sync":
        s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
        sql(db_url, MOVED)
        table, write = "countries", "UPDATE countries SET name = name WHERE code = 'es'"
        args = ["sync", "night"]
    else:
        s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)
        table, write = "items", "UPDATE items SET v = v WHERE id = 1"
        args = ["cutover", "night", "--yes"]
    proc = None
    with _holding(db_url, table):
        proc = subprocess.Popen(
            [sys.executable, "-m", "migrate_data", *_proj(s), *args, "--lock-wait", "0.4ms", "--retries", "0"],
            env=cli_env(db_url),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            try:
                proc.wait(timeout=6)  # imports, connect, one try of "0.4 ms": well under 6 s
            except subprocess.TimeoutExpired:
                pass
            probe = _writable(db_url, write)  # the application's next write, while its long transaction is open
            finished = proc.poll()
        finally:
            if proc.poll() is None:
                proc.kill()  # our own process, by its id
            out, err = proc.communicate(timeout=30)
    assert (finished is not None, probe) == (True, "ok"), (
        "after 6 s: "
        + ("still waiting for the lock (0.4ms meant no limit)" if finished is None else f"exit {finished}"),
        probe,
    )
    assert finished in (1, 2), (finished, err[-1500:])


# -- 4. the forkserver killer: a killed command is a process of its own ---------------------------------------------
def test_a_kill_at_a_function_imported_by_name_kills_the_forked_command(db_url, tmp_path):
    """live.py has ``from .status import validate``: the cutover validates, with writes blocked, through its own name.
    A fresh ``python tests/killer.py`` patches migrate_data.status.validate before the CLI is imported; the fork server
    imported the CLI first, so the killer must also patch the name where it was imported, or the kill never fires and
    the cutover the test meant to kill with writes blocked runs to the end."""
    s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)
    sql(db_url, "UPDATE items SET v = 'pending' WHERE id = 3")
    target = "migrate_data.status:validate:enter"
    fresh = subprocess.run(  # the old killer: a fresh interpreter, the target patched before the CLI is imported
        [sys.executable, str(ROOT / "tests" / "killer.py"), target, "--", *_proj(s), "cutover", "night", "--yes"],
        env=cli_env(db_url), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert fresh.returncode == -9, fresh.stderr[-1500:]  # a real process dies there, with writes blocked
    killed = kill_at(target, *_proj(s), "cutover", "night", "--yes", url=db_url, cwd=ROOT)
    cut = scalar(db_url, "SELECT cut_over_at IS NOT NULL FROM migrate_data.phases WHERE phase = 'night'")
    assert (killed.returncode, cut) == (-9, False), (killed.returncode, cut, killed.stdout[-500:])


def test_a_forked_command_reads_tz_from_its_own_environment(db_url, tmp_path):
    """A real process started with TZ=Asia/Kathmandu (UTC+05:45) stamps its log lines in that zone (Python's time
    module runs tzset at startup); a forked one must read TZ again (kill_at(env={"TZ": …}) sets os.environ)."""
    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    sql(db_url, MOVED)  # the sync logs a WARNING (capturing public.countries again), stamped with the local time
    zone = "Asia/Kathmandu"
    done = kill_at(
        "migrate_data.capture:remove:enter", *_proj(s), "sync", "night", url=db_url, cwd=ROOT, env={"TZ": zone}
    )  # fmt: skip  (never reached: the sync runs to the end)
    now = dt.datetime.now(ZoneInfo(zone))
    assert done.returncode == 0, done.stderr[-1500:]
    stamps = re.findall(r"^(\d\d):(\d\d):\d\d WARNING", done.stderr, re.M)
    assert stamps, done.stderr[-1500:]
    hh, mm = map(int, stamps[-1])
    off = abs((hh * 60 + mm) - (now.hour * 60 + now.minute)) % (24 * 60)
    assert min(off, 24 * 60 - off) <= 2, (f"logged at {hh:02d}:{mm:02d}", f"now {now:%H:%M} in {zone}")


def test_a_killed_forked_command_leaves_no_session_nor_lock_and_the_next_command_runs(db_url, tmp_path):
    """What a real kill -9 leaves: no session of the dead process, no advisory lock, no run 'running' after the next
    command; the next command runs at once."""
    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    sql(db_url, MOVED)
    # no --project: the forked command finds the project in its own working directory
    killed = kill_at("migrate_data.capture:_record:return", "sync", "night", url=db_url, cwd=s.project_dir)
    assert killed.returncode == -9, killed.stderr[-1500:]
    assert "capturing public.countries again" in killed.stderr  # what it said before the kill is not lost
    deadline = time.monotonic() + 3
    while (left := _leftovers(db_url))["sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left["sessions"] == [] and left["advisory"] == 0, left
    again = run_cli("sync", "night", *_proj(s), url=db_url)
    assert again.returncode == 0, again.stderr
    assert _leftovers(db_url) == {"running": 0, "sessions": [], "advisory": 0}
    assert _status(s) == "on"


def test_a_lock_wait_postgres_refuses_fails_the_cutover_before_anything_is_done(db_url, tmp_path):
    """--lock-wait 25d: the cutover connected, took the lock, recorded a run and applied the catch-up before PostgreSQL
    refused the value at the block (exit 1, a 'failed' run, and asyncio's 'Resetting connection with an active
    transaction': writes_blocked left its transaction open on an error other than a lock timeout).  A flag PostgreSQL
    cannot take is bad input: exit 2, nothing done."""
    s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)
    sql(db_url, "UPDATE items SET v = 'pending' WHERE id = 3")
    res = run_cli("cutover", "night", "--yes", "--lock-wait", "25d", *_proj(s), url=db_url)
    runs = [tuple(r) for r in sql(db_url, "SELECT kind, status FROM migrate_data.runs WHERE kind = 'cutover'")]
    assert "active transaction" not in res.stderr, res.stderr
    assert (res.returncode, runs) == (2, []), (res.returncode, runs, res.stderr[-800:])


# -- 5. the library's own door: api.sync / api.cutover take any lock_wait ---------------------------------------------
def test_the_api_refuses_a_lock_wait_without_limit_too(db_url, tmp_path):
    """The library refuses it too: SyncOptions(lock_wait="0") reached set_config('lock_timeout', '0'), and the repair's
    CREATE TRIGGER waited as long as the application's transaction, whatever `retries` said."""
    from migrate_data import api
    from migrate_data.errors import MigrationError
    from migrate_data.sync import SyncOptions

    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    sql(db_url, MOVED)

    async def scenario() -> str:
        holder = await asyncpg.connect(db_url)
        await holder.execute("BEGIN; LOCK TABLE countries IN ROW EXCLUSIVE MODE")
        try:
            await asyncio.wait_for(api.sync(s, ["night"], SyncOptions(lock_wait="0", retries=0)), 5)
            return "synced"
        except asyncio.TimeoutError:
            return "still waiting after 5 s"
        except MigrationError as e:
            return f"refused: {e}"
        finally:
            await holder.execute("ROLLBACK")
            await holder.close()

    outcome = asyncio.run(scenario())
    assert outcome.startswith("refused"), outcome


# -- 6. the cutover's patience and the capture removal at its end -----------------------------------------------------
def test_the_cutover_lock_wait_and_retries_bound_the_capture_removal_too(db_url, tmp_path):
    """A report's long read-only transaction on items (ACCESS SHARE): the block (SHARE) goes through, the cutover
    validates and cuts over; removing the triggers (ACCESS EXCLUSIVE) then waits for the report with the cutover's
    --lock-wait 200ms --retries 0, not capture's own 1 s × 6 (about 14 s, every reader and writer of items queued behind
    each try)."""
    from migrate_data import api

    s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)

    async def scenario() -> tuple[float, bool, bool]:
        report = await asyncpg.connect(db_url)
        await report.execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM items")
        try:
            task = asyncio.ensure_future(api.cutover(s, ["night"], lock_wait="200ms", retries=0))
            t0 = time.monotonic()
            done, _ = await asyncio.wait({task}, timeout=5)
            took = time.monotonic() - t0
        finally:
            await report.execute("ROLLBACK")
            await report.close()
        result = await task
        return took, bool(done), result.ok

    took, done_in_time, ok = asyncio.run(scenario())
    assert ok
    assert done_in_time, f"the cutover was still removing capture after {took:.1f} s with --lock-wait 200ms --retries 0"


@pytest.mark.parametrize("held", ["shops", "countries"])
def test_removing_capture_after_a_cutover_holds_no_table_while_it_waits_for_another(db_url, tmp_path, held):
    """capture.remove drops every table's triggers in one transaction, each try under the cutover's --lock-wait: a try
    that cannot lock one table lets go of the other, so no table is held longer than one try (500 ms here).  Before,
    the first table's ACCESS EXCLUSIVE lock was kept while the second's was retried (about 14 s), and every read and
    write of the first table waited that long, right after the cutover said writes were released."""
    from migrate_data import api

    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    other = {"shops": "countries", "countries": "shops"}[held]
    seen: dict[str, object] = {}

    async def scenario() -> None:
        report = await asyncpg.connect(db_url)
        await report.execute(f"BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM {held}")
        try:
            task = asyncio.ensure_future(api.cutover(s, ["night"], lock_wait="500ms", retries=10))
            await asyncio.sleep(3.5)  # blocked, validated, cut over, released; the removal is retrying on `held`
            probe = await asyncpg.connect(db_url, server_settings={"lock_timeout": "2s"})
            try:
                seen["cut"] = await probe.fetchval(
                    "SELECT cut_over_at IS NOT NULL FROM migrate_data.phases WHERE phase = 'night'"
                )
                seen["locks"] = [
                    tuple(r)
                    for r in await probe.fetch(
                        "SELECT relation::regclass::text, mode, granted FROM pg_locks l JOIN pg_stat_activity a "
                        "USING (pid) WHERE a.application_name = 'migrate-data' AND l.locktype = 'relation' "
                        "AND relation::regclass::text IN ('shops', 'countries') ORDER BY 1, 2"
                    )
                ]
                await probe.fetchval(f"SELECT count(*) FROM {other}")
                seen["probe"] = "ok"
            except asyncpg.LockNotAvailableError:
                seen["probe"] = f"{other} blocked > 2 s after the cutover released writes"
            finally:
                await probe.close()
        finally:
            await report.execute("ROLLBACK")
            await report.close()
        seen["ok"] = (await task).ok

    asyncio.run(scenario())
    assert seen["ok"] and seen["cut"], seen
    assert seen["probe"] == "ok", seen


@pytest.mark.parametrize("held", ["shops", "countries"])
def test_a_phase_start_waiting_for_one_busy_table_holds_no_other_tables_lock(db_url, tmp_path, held):
    """The phase's start turns capture on for every table in each short-lock try: a try that cannot lock one table
    lets go of the others.  Before, the first table's trigger lock (SHARE ROW EXCLUSIVE) was kept while the second's
    was retried (1 s × 6, about 14 s), and every write of the first table waited that long."""
    sql(db_url, LOOKUP)
    s = settings(db_url, project(tmp_path, LOOKUP_MAPPING))
    other, column = {"shops": ("countries", "name"), "countries": ("shops", "v")}[held]
    write = f"UPDATE {other} SET {column} = {column} WHERE false"
    seen = start_while_busy(db_url, s, f"LOCK TABLE {held} IN ROW EXCLUSIVE MODE", {"probe": write})
    assert seen["running"], seen
    assert seen["probe"] == "ok", seen
    assert seen["ok"], seen
    assert _status(s) == "on"


# -- 6. a phase's start and a rollback: the same patience as sync and cutover ----------------------------------------
@pytest.mark.parametrize("command", [["phase2a", "--yes"], ["rollback", "phase2a", "--yes"]])
@pytest.mark.parametrize("wait", ["0", "0.4ms", "25d", "soon"])
def test_a_phase_run_or_rollback_refuses_a_lock_wait_without_limit_before_connecting(command, wait):
    result = run_cli(*command, "--lock-wait", wait, url=NOWHERE)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Invalid value for '--lock-wait'" in result.stderr, result.stderr


def test_the_api_refuses_a_phase_run_or_rollback_that_would_wait_without_limit(db_url, tmp_path):
    from migrate_data import api
    from migrate_data.errors import BadInput

    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    before = _state(db_url)
    with pytest.raises(BadInput, match="without limit"):
        asyncio.run(api.run_phase(s, "night", api.RunOptions(backup=False, recheck=True, lock_wait="0.4ms")))
    with pytest.raises(BadInput, match="retries"):
        asyncio.run(api.rollback(s, "night", retries=-1))
    with pytest.raises(BadInput, match="without limit"):
        asyncio.run(api.rollback(s, "night", lock_wait="0"))
    assert _state(db_url) == before and _status(s) == "on"


def test_a_phase_start_out_of_tries_on_a_busy_table_leaves_nothing_and_the_same_command_finishes(db_url, tmp_path):
    """--lock-wait 200ms --retries 0: one short try to install capture while the application keeps a source table
    busy, then a clean failure that names the try; nothing of the phase's start is left, and the same command
    finishes once the table is free."""
    sql(db_url, LOOKUP)
    s = settings(db_url, project(tmp_path, LOOKUP_MAPPING))
    args = [*_proj(s), "night", "--yes", "--no-backup"]
    with _holding(db_url, "shops"):
        failed = run_cli(*args, "--lock-wait", "200ms", "--retries", "0", url=db_url)
        assert _writable(db_url, "UPDATE countries SET name = name WHERE false") == "ok"  # nothing of ours is held
    assert failed.returncode != 0, failed.stderr
    assert "through 1 attempts of 200ms" in failed.stderr, failed.stderr
    assert scalar(db_url, "SELECT count(*) FROM migrate_data.phases WHERE phase = 'night' AND state <> 'pending'") == 0
    assert scalar(db_url, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'md_capture_%'") == 0
    registry = scalar(db_url, "SELECT to_regclass('migrate_data.capture')")
    assert registry is None or scalar(db_url, "SELECT count(*) FROM migrate_data.capture") == 0
    again = run_cli(*args, url=db_url)
    assert again.returncode == 0, again.stderr
    assert _status(s) == "on"


def test_a_rollback_out_of_tries_on_a_busy_table_is_finished_by_the_same_command(db_url, tmp_path):
    """--lock-wait 200ms --retries 0 while the application keeps a source table busy: the rollback stops at the
    removal of capture with a clean failure that names the try, and the same command finishes it once the table is
    free: no trigger, no log, no row of the phase left."""
    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    args = ["rollback", "night", "--yes", *_proj(s)]
    with _holding(db_url, "shops"):
        failed = run_cli(*args, "--lock-wait", "200ms", "--retries", "0", url=db_url)
    assert failed.returncode != 0, failed.stderr
    assert "through 1 attempts of 200ms" in failed.stderr, failed.stderr
    # the ledger says no more than the data: not rolled back while its capture is on
    assert scalar(db_url, "SELECT state FROM migrate_data.phases WHERE phase = 'night'") == "rolling_back"
    assert scalar(db_url, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'md_capture_%' AND tgenabled = 'A'") == 8
    again = run_cli(*args, url=db_url)
    assert again.returncode == 0, again.stderr
    assert scalar(db_url, "SELECT state FROM migrate_data.phases WHERE phase = 'night'") == "rolled_back"
    assert scalar(db_url, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'md_capture_%'") == 0
    assert scalar(db_url, "SELECT count(*) FROM migrate_data.changes") == 0
    assert scalar(db_url, "SELECT count(*) FROM migrate_data.capture") == 0


def test_a_resume_hint_repeats_the_patience_given_and_only_that():
    from migrate_data.cli.base import patience_flags

    assert patience_flags("1s", 5) == ""  # the defaults: nothing to repeat
    assert patience_flags("2 s", 5) == " --lock-wait '2 s'"
    assert patience_flags("1s", 20) == " --retries 20"
    assert patience_flags("300ms", 0) == " --lock-wait 300ms --retries 0"
