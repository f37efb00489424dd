"""A phase is its steps: ``plan`` prints the statements a run executes, and a rollback undoes the steps in reverse."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conftest import run
from migrate_data import api, db, steps

# What a run does to the database that is not the tool's own bookkeeping: DDL and DML on the application's tables,
# change capture's function and triggers, sequences moved.  The ledger (unquoted ``migrate_data.``) and reads are not.
_CONTROL = re.compile(
    r"^(SELECT|EXPLAIN|WITH|SAVEPOINT|RELEASE|ROLLBACK|BEGIN|COMMIT|SET|SHOW|DECLARE|FETCH|CLOSE)\b", re.I
)
_LEDGER = re.compile(
    r"^(INSERT INTO|UPDATE|DELETE FROM|CREATE SCHEMA IF NOT EXISTS|CREATE TABLE IF NOT EXISTS)\s+migrate_data\b"
)


def _norm(statement: str) -> str:
    return re.sub(r"\s+", " ", statement).strip().rstrip(";").strip()


def _is_effect(statement: str) -> bool:
    s = _norm(statement)
    if "setval(" in s:
        return True
    return not _CONTROL.match(s) and not _LEDGER.match(s)


@contextmanager
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every statement sent on a connection of a pool that ``db.open_pool`` opens while inside."""
    seen: list[str] = []
    init = db._session_init

    async def logging_init(conn):  # noqa: ANN001
        await init(conn)
        conn.add_query_logger(lambda r: seen.append(r.query))

    monkeypatch.setattr(db, "_session_init", logging_init)
    yield seen
    monkeypatch.setattr(db, "_session_init", init)


def test_plan_prints_exactly_the_statements_the_run_executes(applied_db, settings_for, monkeypatch):
    settings = settings_for(applied_db("phase2a"))
    planned = run(api.plan(settings, "phase2b"))
    described = {_norm(s) for st in planned.steps for s in st.statements}
    with recorded(monkeypatch) as seen:
        # small batches: every table runs its first batch's statement and the next batches' one
        result = run(api.run_phase(settings, "phase2b", api.RunOptions(backup=False, batch_size=60)))
    assert result.status == "done"
    executed = {_norm(s) for s in seen if _is_effect(s)}
    assert executed, "the recorder saw nothing: the test would prove nothing"
    assert executed - described == set()
    # and nothing is described that the run left out (the validation's reads are described but are not effects)
    effects_described = {s for st in planned.steps if st.step in ("schema", "copy") for s in map(_norm, st.statements)}
    assert effects_described - executed == set()


def test_plan_lists_the_steps_of_a_phase_in_the_order_a_run_applies_them(applied_db, settings_for):
    url = applied_db("phase1")
    settings = settings_for(url)
    planned = run(api.plan(settings, "phase2a"))
    assert [s.step for s in planned.steps] == ["backup", "schema", "copy", "validate"]
    backup = planned.steps[0]
    assert backup.commands and '-t "customers"' in backup.commands[0] and '-t "clientes"' in backup.commands[0]
    copy = planned.steps[2]
    assert [h for h, _ in copy.parts] == [
        "public.professions -> public.profesiones",
        "public.customers -> public.clientes",
    ]
    assert all(any(s.startswith("INSERT INTO") for s in sqls) for _, sqls in copy.parts)


def test_rollback_undoes_the_steps_in_the_reverse_order_of_the_run(applied_db, settings_for, monkeypatch):
    url = applied_db("phase1")
    settings = settings_for(url)
    applied: list[str] = []
    undone: list[str] = []
    for cls in (steps.Backup, steps.Start, steps.Copy, steps.Validate):
        apply_, undo_ = cls.apply, cls.undo

        async def tracked_apply(self, r, _f=apply_):  # noqa: ANN001
            applied.append(type(self).__name__)
            return await _f(self, r)

        async def tracked_undo(self, u, _f=undo_):  # noqa: ANN001
            undone.append(type(self).__name__)
            return await _f(self, u)

        monkeypatch.setattr(cls, "apply", tracked_apply)
        monkeypatch.setattr(cls, "undo", tracked_undo)
    run(api.run_phase(settings, "phase2a", api.RunOptions(backup=False)))
    result = run(api.rollback(settings, "phase2a"))
    assert applied == ["Backup", "Start", "Copy", "Validate"]
    assert undone == list(reversed(applied))
    assert result.deleted == {"public.clientes": 997, "public.profesiones": 40}
