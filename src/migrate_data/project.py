"""Project-level helpers: scaffold a new migration project; the demo of the shipped example."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from . import api, closing, console, human, report
from .db import open_pool
from .errors import BadInput

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).parent / "templates"
# The demo's sample project: in a wheel, the copy the build put in the package (setup.py); from a source tree (an
# editable install), the repository's own alembic.ini, alembic/, mappings/ and scripts/.
SAMPLES = (Path(__file__).parent / "sample", Path(__file__).resolve().parents[2])
SEED = Path("scripts") / "seed_legacy.py"


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


def sample_project(settings: api.Settings) -> api.Settings:
    """The settings the demo runs with: the project's own when it has the sample's seed script (the repository),
    else the sample shipped with migrate-data, with reports and backups in the working directory."""
    if (settings.project_dir / SEED).is_file():
        return settings
    sample = next((d for d in SAMPLES if (d / SEED).is_file() and (d / "mappings").is_dir()), None)
    if sample is None:
        raise BadInput(
            f"{settings.project_dir / SEED}: the demo needs the sample project, and this installation has none",
            hint="reinstall migrate-data from its wheel or its repository, or pass --project pointing at the repository",
        )
    log.info("the demo runs the sample project in %s", sample)
    return replace(settings, project_dir=sample, output_dir=settings.output_dir or Path.cwd())


def _seed_module(project: Path):  # type: ignore[no-untyped-def]
    path = project / SEED
    spec = importlib.util.spec_from_file_location("seed_legacy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def demo(settings: api.Settings, *, scale: float, say: Callable[[str], None]) -> int:
    """Seed the sample database, run the phases up to the last data phase, roll that back and run it again."""
    settings = sample_project(settings)
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
        tracker = console.Tracker(name)
        result = await api.run_phase(settings, name, options, on_event=tracker)
        tracker.finish()
        assert result.validation is not None
        ok = ok and result.validation.ok
        following = closing.next_step(result, list(every))
        report.add_run_details(
            result.reports, result.validation, steps=closing.timer_list(tracker), next_step=following
        )
        say(f"\n$ migrate-data {name} --yes")
        say(closing.summary(result, tracker, next_step=following))

    for name in phases:
        await run(name)
        if name == "phase2a":  # the application writes between nights; `sync` catches up
            ok = await _between_nights(settings, name, say) and ok
    say("\n$ migrate-data status")
    say(await _status_table(settings))
    if phases:
        last = phases[-1]
        rb = await api.rollback(settings, last)
        say(f"\n$ migrate-data rollback {last} --yes")
        say("\n".join(f"{t}: {n:,} rows deleted" for t, n in rb.deleted.items()))
        say(f"phase {last} rolled back in {human.dur(rb.seconds)}")
        await run(last)
    say(f"\nreports are in {settings.reports_dir}")
    return 0 if ok else 3


async def _status_table(settings: api.Settings) -> str:
    """What ``migrate-data status`` shows of the demo's phases: state, rows, quarantined, validation."""
    lines = [
        {"phase": s.phase, "state": s.state, "rows": s.rows, "quarantined": s.quarantined, "validation": s.validation}
        for s in await api.status(settings)
    ]
    return report.summary(lines, right=("rows", "quarantined"))


DEMO_WRITES = (
    "INSERT INTO customers (phone_number, full_name, city) VALUES ('+593999000001', 'Cliente nuevo', 'Quito')",
    "UPDATE customers SET city = 'Cuenca' WHERE phone_number = '+593900000001'",
    "DELETE FROM customers WHERE phone_number = '+593900000002'",
)


async def _between_nights(settings: api.Settings, phase: str, say: Callable[[str], None]) -> bool:
    """The day after the night's copy: the application inserts, updates and deletes customers; `sync` applies
    those writes through the mapping, and the validation with checksums passes."""
    async with open_pool(settings.effective_source_url, max_size=1) as pool:
        for statement in DEMO_WRITES:
            await pool.execute(statement)
    say("\n$ psql    # the application, the next day\n" + "".join(f"{w};\n" for w in DEMO_WRITES).rstrip())
    p = (await api.sync(settings, [phase])).phases[0]
    say(
        f"\n$ migrate-data sync {phase}\n{p.phase}: {p.changes} changes applied: {p.upserted} rows upserted, "
        f"{p.deleted} deleted; {p.waiting} waiting"
    )
    v = await api.validate(settings, phase, deep=True)
    say(f"\n$ migrate-data validate {phase} --deep\n{report.verdict_line(v)}")
    return v.ok
