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
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
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
        return
    wrapped = _wrap(getattr(owner, attr), when, nth)
    setattr(owner, attr, wrapped)
    if not path:  # a module's function: also where it was imported by name before (``from .status import validate``)
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] == module_name.split(".")[0] and module is not owner:
                for alias, value in list(vars(module).items()):
                    if value is original:
                        setattr(module, alias, wrapped)


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


def _child(target: str, nth: int, args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In a process forked from the fork server: the command's own environment, directory and stdio, then the CLI."""
    os.environ.clear()
    os.environ.update(env)
    time.tzset()  # TZ, as a process started with this environment reads it
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process's own fd 1, unbuffered as a pipe's would be
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    install(target, nth)
    from migrate_data.cli import main as cli_main

    cli_main(args)


_server: Any = None


def _fork_server() -> Any:
    """A multiprocessing ``forkserver`` that has imported the CLI once: each killed command is a fork of it, a process
    of its own (its own connections, killed by a real SIGKILL) without half a second of imports each time.  The fork
    server is a fresh interpreter, not this (threaded) test process."""
    global _server
    if _server is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["killer", "migrate_data.cli"])
        _server = ctx
    return _server


def kill_at(
    target: str, *args: str, url: str, cwd: Path, nth: int = 1, env: dict[str, str] | None = None, timeout: int = 120
) -> subprocess.CompletedProcess:
    """Run ``migrate-data ARGS`` with ``DATABASE_URL=url``, killed at ``target``; returns the finished process
    (returncode -9 when the step was reached)."""
    e = dict(os.environ)
    e.pop("DATABASE_URL", None)
    e["DATABASE_URL"] = url
    e.update(env or {})
    with tempfile.TemporaryDirectory(prefix="killer-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _fork_server().Process(target=_child, args=(target, nth, list(args), str(cwd), e, out, err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["migrate-data", *args], timeout)
        with open(out) as fo, open(err) as fe:
            stdout, stderr = fo.read(), fe.read()
    return subprocess.CompletedProcess(["migrate-data", *args], proc.exitcode, stdout, stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
