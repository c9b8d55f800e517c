"""Importable callables for python-job tests (job files and the admin)."""

from __future__ import annotations

import os
import sys

NOT_CALLABLE = 42


def refresh_stats(days: int = 7, tables: list[str] | None = None) -> int:
    print(f"refreshing {days} day(s) of {', '.join(tables or ['all tables'])}")
    return days


def exit_with(status: int | str | None = None) -> None:
    sys.exit(status)


def print_then_exit(message: str, code: int) -> None:
    print(message, flush=True)
    os._exit(code)  # no traceback, no cleanup: as a crashing extension would
