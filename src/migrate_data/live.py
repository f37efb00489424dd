"""Between nights: ``sync`` applies the changes captured since a phase's copy, ``cutover`` applies the last ones
with writes blocked, validates and removes the capture (capture.py, sync.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import asyncpg

from . import blocking, capture, capture_state, ledger
from . import sync as syncing
from .capture_sql import LOCK_RETRIES, LOCK_WAIT
from .errors import BadInput, MigrationError, RefusedError, Stopped
from .preflight import PhasePlan, compile_phase
from .rollback import RollbackPlan, RollbackResult
from .runtime import check_schema_agrees, connect, database_errors, get_phase, project_phases, recorded
from .settings import Settings, check_patience
from .status import validate
from .validate import ValidationResult

log = logging.getLogger(__name__)


# -- live sync between nights (capture.py, sync.py) ---------------------------------------------------------------
@dataclass(frozen=True)
class CutoverResult:
    phases: tuple[str, ...]
    ok: bool  # validated with checksums while writes were blocked
    validations: tuple[ValidationResult, ...] = ()
    synced: tuple[syncing.PhaseSync, ...] = ()  # the last changes, applied while writes were blocked
    blocked_tables: tuple[str, ...] = ()
    blocked_seconds: float = 0.0
    attempts: int = 0  # tries it took to block writes
    capture_removed: bool = False
    already: tuple[str, ...] = ()  # phases that were cut over before
    seconds: float = 0.0
    problems: tuple[str, ...] = ()  # why it did not pass, besides the validations
    late: int = 0  # changes logged after the last sync (writes to the English tables once released): kept, unapplied


def _in_order(settings: Settings, names: list[str]) -> list[str]:
    """The named phases (each checked), in the project's order: an earlier phase's parents are synced first."""
    if not names:
        raise BadInput("name at least one phase")
    for n in names:
        get_phase(settings, n)
    order = list(project_phases(settings))
    return sorted(dict.fromkeys(names), key=order.index)


async def _syncers(
    settings: Settings,
    names: list[str],
    target: asyncpg.Pool,
    source: asyncpg.Pool,
    lock: ledger.LockSession,
    states: dict[str, asyncpg.Record],
    options: syncing.SyncOptions,
) -> list[syncing.PhaseSyncer]:
    out = []
    for name in names:
        _, phase = get_phase(settings, name)
        st = states.get(name)
        if st is None or st["state"] != "applied":
            now = st["state"] if st else "pending"
            raise RefusedError(
                f"{name} is {now}: its changes are applied once its copy is done",
                hint=f"run `migrate-data {name}` first" if now in ("pending", "partial", "rolled_back") else None,
            )
        if st["cut_over_at"] is not None:
            raise RefusedError(
                f"{name} was cut over at {st['cut_over_at']:%Y-%m-%d %H:%M}: nothing is captured any more"
            )
        tables, findings = await compile_phase(phase, source=source, target=target)
        PhasePlan(phase, tuple(tables), tuple(findings)).raise_for_errors()
        s = syncing.PhaseSyncer(
            phase=name,
            tables=tables,
            target=target,
            source=source,
            lock=lock,
            batch_size=options.batch_size,
            lock_wait=options.lock_wait,
            retries=options.retries,
            snapshot=st["started_snapshot"],
        )
        await s.prepare()
        out.append(s)
    return out


@database_errors
async def sync(
    settings: Settings,
    names: list[str],
    options: syncing.SyncOptions | None = None,
    *,
    stop: asyncio.Event | None = None,
) -> syncing.SyncResult:
    """Apply the changes captured since the phases' copies to their target tables, through their own mappings.

    An earlier phase can be synced while later ones are applied.  With ``options.follow`` it keeps going until
    ``stop`` is set (then raises Stopped: the same command goes on where it stopped)."""
    started = time.monotonic()
    names = _in_order(settings, names)
    options = options or syncing.SyncOptions()
    check_patience(options.lock_wait, options.retries)  # before anything is done
    stop = stop or asyncio.Event()
    async with _locked(settings, f"sync of {', '.join(names)}") as (target, source, lock, states):
        lock.watch(stop)
        syncers = await _syncers(settings, names, target, source, lock, states, options)
        async with AsyncExitStack() as runs:
            for s in syncers:  # a refusal above leaves no run behind
                s.run_id = await runs.enter_async_context(recorded(target, lock, kind="sync", phase=s.phase))
            try:
                totals = await syncing.sync(syncers, options, stop=stop)
            except Exception:
                lock.raise_if_lost()  # the lock's session went with the others: that is what to say
                raise
            lock.raise_if_lost()
            if stop.is_set():
                applied = sum(t.changes for t in totals.values())
                raise Stopped(f"sync stopped cleanly after {applied:,} changes; what is left is still in the log")
            for s in syncers:
                t = totals[s.phase]
                assert s.run_id is not None
                await ledger.update_run(
                    target, s.run_id, status="done", rows={"changes": t.changes}, rejects=t.rejected
                )
    return syncing.SyncResult(tuple(totals[n] for n in names), time.monotonic() - started)


@database_errors
async def cutover(
    settings: Settings,
    names: list[str],
    *,
    lock_wait: str = "2s",
    retries: int = 5,
    batch_size: int = syncing.SyncOptions.batch_size,
    on_blocked: Callable[[], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
) -> CutoverResult:
    """Cut phases over: apply what is logged (writes still go on), block writes to their source (and lookup) tables,
    apply the last captured changes, validate with checksums, then record the cutover, release the writes and remove
    the capture.  When validation fails, writes are released and capture stays on (``ok`` False).  ``on_blocked``
    runs while writes are blocked.  ``stop`` set before writes are blocked raises Stopped (nothing blocked, nothing
    cut over: the same command goes on); once they are, the cutover finishes, as briefly as it can."""
    started = time.monotonic()
    names = _in_order(settings, names)
    check_patience(lock_wait, retries)  # before anything is done
    patience = syncing.SyncOptions(batch_size=batch_size, lock_wait=lock_wait, retries=retries)
    async with _locked(settings, f"cutover of {', '.join(names)}") as (target, source, lock, states):
        already = tuple(n for n in names if (states.get(n) or {}).get("cut_over_at") is not None)
        todo = [n for n in names if n not in already]
        # a cutover killed after it recorded the phase: finish removing the capture
        late = sum([await _remove_one(settings, target, n, lock, patience) for n in already])
        if not todo:
            return CutoverResult(tuple(names), True, capture_removed=True, already=already, late=late)
        syncers = await _syncers(settings, todo, target, source, lock, states, patience)
        _refuse_before_parents(settings, todo, syncers, states)
        async with AsyncExitStack() as runs:
            for s in syncers:
                s.run_id = await runs.enter_async_context(recorded(target, lock, kind="cutover", phase=s.phase))
            tables = {n: r for s in syncers for n, r in (await capture_state.relations(source, s.phase)).items()}
            tables = dict(sorted(tables.items()))
            caught = await _catch_up(syncers, batch_size, stop or asyncio.Event())
            async with blocking.writes_blocked(source, tables, wait=lock_wait, retries=retries) as blocked:
                totals, validations, problems = await _while_blocked(settings, syncers, on_blocked, batch_size, caught)
                ok = all(v.ok for v in validations) and not problems
                blocked.release_only = not ok  # the writes are released, nothing is cut over
                if ok:
                    async with ledger.committed_under(target, lock) as conn:
                        for n in todo:
                            await ledger.mark_cut_over(conn, n)
            status = "done" if ok else "invalid"
            for s in syncers:
                assert s.run_id is not None
                changes = {"changes": totals[s.phase].changes}
                await ledger.update_run(target, s.run_id, status=status, rows=changes, validation_ok=ok)
        removed = False
        if ok:
            removed, after = await _remove_capture(settings, target, source, todo, lock, patience)
            late += after
        return CutoverResult(
            tuple(names),
            ok,
            validations,
            tuple(totals[n] for n in todo),
            blocked.tables,
            blocked.seconds or 0.0,
            blocked.attempts,
            removed,
            already,
            time.monotonic() - started,
            problems,
            late,
        )


@asynccontextmanager
async def _locked(
    settings: Settings, what: str
) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool, ledger.LockSession, dict[str, asyncpg.Record]]]:
    """Connect and hold the database's lock (``what`` says for what), after closing the runs their sessions left
    and checking Alembic's revision against the ledger: the pools, the lock's session and the phase states."""
    async with connect(settings) as (target, source):
        await ledger.ensure(target)
        async with ledger.exclusive(target, url=settings.database_url, what=what) as lock:
            await ledger.close_abandoned_runs(target)
            states = await ledger.phase_states(target)
            await check_schema_agrees(settings, target, project_phases(settings), states)
            yield target, source, lock, states


CATCH_UP_PASSES = 3  # before a cutover blocks writes: passes over the log, while each still finds more than a batch


async def _catch_up(
    syncers: list[syncing.PhaseSyncer], batch_size: int, stop: asyncio.Event
) -> dict[str, syncing.PhaseSync]:
    """Before a cutover blocks writes: apply what is logged, and again while a pass found more than a batch, so that
    writes are blocked only for what came during the last pass, not for the hours of changes since the last sync.
    ``stop`` set: raise Stopped, with nothing blocked."""
    options = syncing.SyncOptions(batch_size=batch_size)
    out = {s.phase: syncing.PhaseSync(s.phase) for s in syncers}
    for _ in range(CATCH_UP_PASSES):
        totals = await syncing.sync(syncers, options, stop=stop)
        out = {n: out[n] + t for n, t in totals.items()}
        if stop.is_set():
            applied = sum(t.changes for t in out.values())
            raise Stopped(
                f"cutover stopped before writes were blocked, after applying {applied:,} changes; nothing is cut over"
            )
        if sum(t.changes for t in totals.values()) <= batch_size:
            break
    return out


async def _while_blocked(
    settings: Settings,
    syncers: list[syncing.PhaseSyncer],
    on_blocked: Callable[[], Awaitable[None]] | None,
    batch_size: int,
    caught: dict[str, syncing.PhaseSync],
) -> tuple[dict[str, syncing.PhaseSync], tuple[ValidationResult, ...], tuple[str, ...]]:
    """What a cutover does while writes are blocked, before it decides: ``on_blocked``, the last captured changes
    applied, every phase validated with checksums; and what its syncs (this one and ``caught``: before the block)
    left undone."""
    if on_blocked is not None:
        await on_blocked()
    options = syncing.SyncOptions(batch_size=batch_size)
    last = await syncing.sync(syncers, options, stop=asyncio.Event(), bounded=False)
    totals = {n: t + caught[n] for n, t in last.items()}  # the last pass's waiting and age
    validations = tuple([await validate(settings, s.phase, deep=True) for s in syncers])
    return totals, validations, await _not_applied(syncers, totals)


async def _remove_one(
    settings: Settings, target: asyncpg.Pool, name: str, lock: ledger.LockSession, patience: syncing.SyncOptions
) -> int:
    """Remove the change capture of a phase cut over, keeping its log, with the cutover's patience for locks."""
    return await capture.remove(
        settings, target, name, lock=lock, keep_log=True, wait=patience.lock_wait, retries=patience.retries
    )


async def _remove_capture(
    settings: Settings,
    target: asyncpg.Pool,
    source: asyncpg.Pool,
    names: list[str],
    lock: ledger.LockSession,
    patience: syncing.SyncOptions,
) -> tuple[bool, int]:
    """Remove the change capture of phases just cut over, keeping the log: whether it is all gone, and the changes
    logged after the last sync (writes to the English tables once released), counted too where capture stays."""
    late, removed = 0, True
    for n in names:
        try:
            late += await _remove_one(settings, target, n, lock, patience)
        except MigrationError as e:  # the phase is cut over: the triggers only log what nobody reads
            log.warning(
                "capture of %s not removed yet: %s (%s); `migrate-data cutover` again removes it", n, e, e.detail
            )
            late += (await capture_state.state(source, n)).waiting
            removed = False
    return removed, late


def _refuse_before_parents(
    settings: Settings, todo: list[str], syncers: list[syncing.PhaseSyncer], states: dict[str, asyncpg.Record]
) -> None:
    """Refuse to cut a phase over while a phase it requires, or whose target rows it references, is still synced (not
    cut over, not in this cutover): a row that waits for such a parent (quarantined 23503) would never be tried
    again."""
    phases = project_phases(settings)
    owner: dict[str, str] = {}
    live = set()
    for name, phase in phases.items():
        st = states.get(name)
        if name in todo or not phase.tables or st is None or st["state"] != "applied" or st["cut_over_at"] is not None:
            continue
        live.add(name)
        for t in phase.tables:
            owner[t.target.name if t.target.schema in (None, "public") else str(t.target)] = name
    for name in todo:
        seen, stack = set(), list(phases[name].requires)
        while stack:
            req = stack.pop()
            if req in live:
                raise RefusedError(
                    f"{name} cannot be cut over before {req}, which it requires: {req} is still synced",
                    hint=f"cut both over together (migrate-data cutover {req} {name}) or {req} first",
                )
            seen.add(req)
            stack += [r for r in (phases[req].requires if req in phases else ()) if r not in seen]
    for s in syncers:
        for st in s.tables:
            for fk in st.target.foreign_keys:
                ref = fk.ref_table.name if fk.ref_table.schema in (None, "public") else str(fk.ref_table)
                if ref in owner:
                    raise RefusedError(
                        f"{s.phase} cannot be cut over before {owner[ref]}: {st.name} references {fk.ref_table}, "
                        f"which {owner[ref]} still syncs",
                        hint=f"cut both over together (migrate-data cutover {owner[ref]} {s.phase}) or {owner[ref]} "
                        "first",
                    )


async def _not_applied(syncers: list[syncing.PhaseSyncer], totals: dict[str, syncing.PhaseSync]) -> tuple[str, ...]:
    """What the cutover's last sync left undone: changes still in the log, rows it took out of the target (a row
    that was there and fails now), rows waiting for another row (23503, 23505) that nothing would try again."""
    out = []
    for s in syncers:
        t = totals[s.phase]
        if t.waiting:
            out.append(f"{s.phase}: {t.waiting:,} changes could not be applied (deletes that other rows still need)")
        if t.skipped:
            out.append(
                f"{s.phase}: {t.skipped:,} changed rows were not applied: someone else wrote them in the target since "
                "the phase started (or a table rewrite did), and sync never overwrites those"
            )
        for table, key in t.taken_out:
            out.append(
                f"{s.phase}: the last sync took row ({', '.join(key)}) out of {table}: it fails now and is "
                "quarantined (migrate-data quarantine); fix the source row, then cut over again"
            )
        for table, keys in (await s.waiting_rejects()).items():
            shown = "; ".join("(" + ", ".join(k) + ")" for k in keys[:5]) + (" …" if len(keys) > 5 else "")
            out.append(
                f"{s.phase}: {len(keys):,} rows of {table} wait for another row (a foreign key or a unique value): "
                f"{shown}; cut over the phase they wait for together with this one"
            )
    return tuple(out)


async def stray_capture(
    settings: Settings,
    target: asyncpg.Pool,
    source: asyncpg.Pool,
    name: str,
    lock: ledger.LockSession,
    *,
    dry_run: bool,
    wait: str = LOCK_WAIT,
    retries: int = LOCK_RETRIES,
) -> RollbackResult | None:
    """The rollback of a phase the ledger does not hold (pending, rolled back) whose change capture is on in the source
    anyway: two databases, a start killed after the source committed the triggers and before the target committed
    the phase.  Removes the capture and its log (nothing applied them: the phase has no copy); None when there is no
    such capture."""
    started = time.monotonic()
    if not await capture_state.registry(source, name):
        return None
    if not dry_run:
        dropped = await capture.remove(settings, target, name, lock=lock, wait=wait, retries=retries)
        log.warning("%s: change capture a killed start left on the source removed (%d changes logged)", name, dropped)
    plan = RollbackPlan(name, (), None, ())
    return RollbackResult(name, {}, None, None, (), time.monotonic() - started, plan=plan, dry_run=dry_run)
