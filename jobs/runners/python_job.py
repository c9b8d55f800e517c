"""Run a Python job's callable in this (child) process.

    python -m jobs.runners.python_job DOTTED.PATH '{"kwarg": 1}'

print(), logging and warnings go to stdout (the run log); an exception
prints its traceback and exits 1; its last line is the error summary
(reported to Jobsite, not guessed from the output).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import traceback
import warnings

from jobs.runners import report_failure


def main(argv: list[str]) -> int:
    path, kwargs = argv[1], json.loads(argv[2]) if len(argv) > 2 else {}
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    module_name, _, name = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), name)
    except Exception:
        traceback.print_exc()
        summary = f"ImportError: cannot import {path}"
        print(summary, file=sys.stderr)
        report_failure(summary)
        return 2
    try:
        result = target(**kwargs)
    except SystemExit as exc:
        return _exit_status(exc)
    except BaseException as exc:
        traceback.print_exc()
        report_failure(_exception_line(exc))
        return 1
    if result is not None:
        print(f"returned {result!r}")
    return 0


def _exit_status(exc: SystemExit) -> int:
    """As the interpreter exits on sys.exit(code): None is success, a number
    is the status, anything else is printed to stderr and is status 1."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    report_failure(_first_line(str(exc.code)) or "Exit code 1")
    return 1


def _exception_line(exc: BaseException) -> str:
    """The traceback's last line, "ValueError: bad input" (the first line of
    a message that has several)."""
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    try:
        message = _first_line(str(exc))
    except Exception:  # a broken __str__; the traceback says so too
        message = ""
    return f"{name}: {message}" if message else name


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    sys.exit(main(sys.argv))
