"""Job kinds: what each needs in its definition, and the child command that
runs it. Every kind runs in a child process with the same environment,
timeout, process-group and log rules (services.run_execute)."""

from __future__ import annotations

import importlib
import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import environ
from django.conf import settings

if TYPE_CHECKING:
    from jobs.models import Job, Run

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BASE_DIR = Path(settings.BASE_DIR)


class KindError(ValueError):
    """The job cannot start: its definition does not resolve on this server."""


@dataclass
class Child:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def definition_errors(job: Job) -> dict[str, str]:
    errors: dict[str, str] = {}
    if job.kind == "shell" and not job.command.strip():
        errors["command"] = "The command is empty."
    if job.kind == "python":
        problem = callable_problem(job.callable)
        if problem:
            errors["callable"] = problem
        if not isinstance(job.kwargs, dict):
            errors["kwargs"] = 'Use a JSON object, e.g. {"days": 7}.'
    if job.kind == "sql":
        if not job.sql.strip():
            errors["sql"] = "The SQL script is empty."
        if job.database not in settings.DATABASES and not ENV_NAME.match(job.database or ""):
            errors["database"] = (
                "Name a DATABASES alias ("
                + ", ".join(settings.DATABASES)
                + ") or an environment variable holding a database URL, e.g. WAREHOUSE_URL."
            )
    if job.deliver_url:
        from jobs.delivery import url_problem  # delivery imports the models, which import this

        problem = url_problem(job.deliver_url)
        if problem:
            errors["deliver_url"] = problem
    return errors


def nul_paths(value: object, path: str) -> list[str]:
    """Where a NUL character is in `value`: a string, or a key or a string
    anywhere in nested tables and lists, as paths like TOKEN or a.b[2] (a
    key holding one is named with it escaped)."""
    if isinstance(value, str):
        return [path] if "\x00" in value else []
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            name = str(key).replace("\x00", "\\u0000")
            where = f"{path}.{name}" if path else name
            if "\x00" in str(key):
                found.append(where)
            found += nul_paths(item, where)
        return found
    if isinstance(value, list | tuple):
        return [p for i, item in enumerate(value) for p in nul_paths(item, f"{path}[{i}]")]
    return []


def callable_problem(path: str) -> str:
    """Why `path` is not an importable callable, or ""."""
    module_name, _, name = (path or "").strip().rpartition(".")
    if not module_name or not name:
        return 'Give a dotted path to a function, e.g. "myteam.jobs.refresh_stats".'
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # anything the module raises while importing
        return f"Cannot import {module_name}: {type(exc).__name__}: {exc}"
    target = getattr(module, name, None)
    if target is None:
        return f"{module_name} has no attribute {name!r}."
    if not callable(target):
        return f"{path} is not callable."
    return ""


def child_for(run: Run, *, workdir: Path, server_env: dict[str, str]) -> Child:
    """The argv (and extra environment) that runs this run's job."""
    job = run.job
    if job.kind == "python":
        return Child(
            argv=[
                sys.executable,
                "-m",
                "jobs.runners.python_job",
                job.callable,
                json.dumps(job.kwargs),
            ],
            env={"PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath(server_env)},
        )
    if job.kind == "sql":
        config = {
            "db": sql_database(job.database, server_env),
            "sql": job.sql,
            "statement_timeout": job.statement_timeout or job.timeout,
            "csv_path": str(workdir / "artifacts" / f"{job.slug}.csv"),
        }
        # A file only the child reads: the connection's password is never in
        # an environment the run page shows.
        path = workdir / "sql-job.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return Child(
            argv=[sys.executable, "-m", "jobs.runners.sql_job", str(path)],
            env={"PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath(server_env)},
        )
    return Child(argv=["/bin/sh", "-c", job.command])


def _pythonpath(server_env: dict[str, str]) -> str:
    parts = [str(BASE_DIR), *settings.JOBSITE_PYTHONPATH]
    if server_env.get("PYTHONPATH"):
        parts.append(server_env["PYTHONPATH"])
    return ":".join(parts)


def sql_database(name: str, server_env: dict[str, str]) -> dict:
    """Connection settings for a DATABASES alias or a *_URL variable."""
    if name in settings.DATABASES:
        db = settings.DATABASES[name]
    elif name in server_env:
        db = _parse_database_url(name, server_env[name])
    else:
        raise KindError(
            f"database {name!r} is neither a DATABASES alias nor set in the server's environment"
        )
    return {k: db.get(k) for k in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT")} | {
        "NAME": str(db.get("NAME"))
    }


def _parse_database_url(name: str, url: str) -> dict:
    """Parse a *_URL variable's value. The parser's own messages quote the
    URL (a port error can hold part of the password, the unknown-engine
    warning all of it), so none of them is passed on."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            db = environ.Env.db_url_config(url)
    except Exception:  # ValueError, and whatever else a malformed URL raises
        db = {}
    if not db.get("ENGINE"):
        raise KindError(f"{name} is not a valid database URL")
    return db
