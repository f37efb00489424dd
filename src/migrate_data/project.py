"""Project-level helpers: scaffold a new migration project; the demo of the shipped example."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from . import api, report
from .db import open_pool
from .errors import BadInput

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).parent / "templates"


def init_project(directory: Path) -> list[Path]:
    """Create alembic.ini, alembic/ (env.py, script.py.mako, versions/) and mappings/ in ``directory``."""
    if directory.exists() and any(directory.iterdir()):
        existing = [p for p in ("alembic.ini", "alembic", "mappings") if (directory / p).exists()]
        if existing:
            raise BadInput(f"{directory} already has {', '.join(existing)}; not overwriting anything")
    versions = directory / "alembic" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    created = [versions]
    for src in sorted(TEMPLATES.rglob("*")):
        if src.is_dir() or src.name == ".keep":
            continue
        dest = directory / src.relative_to(TEMPLATES)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        created.append(dest)
    return created


def _seed_module(project: Path):  # type: ignore[no-untyped-def]
    path = project / "scripts" / "seed_legacy.py"
    if not path.is_file():
        raise BadInput(
            f"{path}: the demo needs the project's sample-data script",
            hint="run the demo from the migrate-data repository, or pass --project pointing at it",
        )
    spec = importlib.util.spec_from_file_location("seed_legacy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def demo(settings: api.Settings, *, scale: float, say: Callable[[str], None]) -> int:
    """Seed the sample database, run the phases up to the last data phase, roll that back and run it again."""
    seed = _seed_module(settings.project_dir)
    async with open_pool(settings.database_url, max_size=1) as pool, pool.acquire() as conn:
        if await conn.fetchval("SELECT to_regclass('customers') IS NOT NULL"):
            raise BadInput(
                "the demo database already has a customers table; the demo wants an empty database",
                hint="run `migrate-data demo` without DATABASE_URL to use a throwaway embedded server",
            )
        rows = await seed.seed(conn, scale)
    say(f"seeded the legacy database at scale {scale}: " + ", ".join(f"{t} {n:,}" for t, n in rows.items()))
    every = api.project_phases(settings)
    last_data = max((i for i, ph in enumerate(every.values()) if ph.tables), default=-1)
    phases = list(every)[: last_data + 1]  # up to the last phase that copies data
    options = api.RunOptions(batch_size=500)
    ok = True

    async def run(name: str) -> None:
        nonlocal ok
        result = await api.run_phase(settings, name, options)
        assert result.validation is not None
        ok = ok and result.validation.ok
        copied = sum(t.rows_written for t in result.tables)
        rejected = sum(t.rejected for t in result.tables)
        say(
            f"\n$ migrate-data {name} --yes\n"
            f"{copied:,} rows copied, {rejected:,} rejected, validation "
            f"{'passed' if result.validation.ok else 'FAILED'} in {result.seconds:.1f}s; report {result.reports['html']}"
        )
        say(report.to_text(result.validation))

    for name in phases:
        await run(name)
    say("\n$ migrate-data status")
    say(
        report.summary(
            [
                {"phase": s.phase, "state": s.state, "rows": s.rows, "validation": s.validation}
                for s in await api.status(settings)
            ]
        )
    )
    if phases:
        last = phases[-1]
        rb = await api.rollback(settings, last)
        say(
            f"\n$ migrate-data rollback {last} --yes\n"
            + ", ".join(f"{t} {n:,} deleted" for t, n in rb.deleted.items())
            + f" in {rb.seconds:.1f}s"
        )
        await run(last)
    say(f"\nreports are in {settings.reports_dir}")
    return 0 if ok else 3
