"""Importable callables for python-job tests (job files and the admin)."""

from __future__ import annotations

NOT_CALLABLE = 42


def refresh_stats(days: int = 7, tables: list[str] | None = None) -> int:
    print(f"refreshing {days} day(s) of {', '.join(tables or ['all tables'])}")
    return days
