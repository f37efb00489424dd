"""The build step that ships the sample project inside the package (``migrate_data/sample``), for ``migrate-data
demo`` from a wheel.  The repository's top-level ``alembic.ini``, ``alembic/``, ``mappings/`` and
``scripts/seed_legacy.py`` stay the one copy: the wheel gets theirs at build time; an editable install reads them
where they are (``project.sample_project``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SAMPLE = (
    "alembic.ini",
    "alembic/env.py",
    "alembic/script.py.mako",
    "alembic/sql/*.sql",
    "alembic/versions/*.py",
    "mappings/*.yaml",
    "scripts/seed_legacy.py",
)


class build_py_with_sample(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "migrate_data" / "sample"
        for pattern in SAMPLE:
            found = sorted(ROOT.glob(pattern))
            if not found:
                raise SystemExit(f"setup.py: the sample project has no {pattern}")
            for src in found:
                target = dest / src.relative_to(ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)


setup(cmdclass={"build_py": build_py_with_sample})
