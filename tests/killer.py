"""Run ``migrate-data`` and SIGKILL it at a named step: deterministic fault injection.

    python tests/killer.py migrate_data.api:_rollback_restore:enter [--nth 2] -- rollback phase5 --yes

``module:function`` names a function (``module:Class.method`` a method); ``enter`` kills the process when the
function is called, ``return`` right after it returns (for a coroutine function: after its ``await`` completed).
``--nth N`` kills at the N-th call (default 1).  The process dies exactly as a ``kill -9`` from outside would kill
it: no ``finally``, no ``atexit``, no flush.  The tests call :func:`kill_at` and compare the database afterwards.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(fn: Any, when: str, nth: int) -> Any:
    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == nth

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrapper(*args: Any, **kwargs: Any) -> Any:
            kill = hit()
            if kill and when == "enter":
                _die()
            result = await fn(*args, **kwargs)
            if kill:
                _die()
            return result

        return awrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kill = hit()
        if kill and when == "enter":
            _die()
        result = fn(*args, **kwargs)
        if kill:
            _die()
        return result

    return wrapper


def install(target: str, nth: int = 1) -> None:
    """Patch ``module:qualname:enter|return`` so the process kills itself there."""
    module_name, qualname, when = target.split(":")
    if when not in ("enter", "return"):
        raise SystemExit(f"killer: {when!r}: expected enter or return")
    owner: Any = importlib.import_module(module_name)
    *path, attr = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = inspect.getattr_static(owner, attr)
    if isinstance(original, staticmethod):
        setattr(owner, attr, staticmethod(_wrap(original.__func__, when, nth)))
    else:
        setattr(owner, attr, _wrap(getattr(owner, attr), when, nth))


def main(argv: list[str]) -> None:
    sep = argv.index("--")
    opts, args = argv[:sep], argv[sep + 1 :]
    nth = 1
    if "--nth" in opts:
        i = opts.index("--nth")
        nth = int(opts[i + 1])
        del opts[i : i + 2]
    for target in opts:
        install(target, nth)
    from migrate_data.cli import main as cli_main

    cli_main(args)


def kill_at(
    target: str, *args: str, url: str, cwd: Path, nth: int = 1, env: dict[str, str] | None = None, timeout: int = 120
) -> subprocess.CompletedProcess:
    """Run ``migrate-data ARGS`` with ``DATABASE_URL=url``, killed at ``target``; returns the finished process
    (returncode -9 when the step was reached)."""
    e = dict(os.environ)
    e.pop("DATABASE_URL", None)
    e["DATABASE_URL"] = url
    e.update(env or {})
    return subprocess.run(
        [sys.executable, str(HERE / "killer.py"), target, "--nth", str(nth), "--", *args],
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        input="",
        timeout=timeout,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
