"""Django's SQLite backend, waiting its turn at the write lock by polling.

Every transaction here is IMMEDIATE (settings): it takes SQLite's single
write lock at BEGIN, and waits there while another connection holds it.
SQLite's own wait sleeps longer and longer between tries (1, 2, 5, 10, 15,
20, 25 ... then 100 ms at a time), so a process that has waited a while
sleeps 25-100 ms at a time, while a process writing one transaction after
another takes the lock back before the sleeper wakes. In a burst (100
jobs due in the same minute) the scheduler's fires kept django-q2's pusher
and the workers standing for 0.1-0.2 s at a time (docs/PERFORMANCE.md).

Here BEGIN asks for the lock without SQLite's wait, and asks again every
half millisecond until the connection's usual timeout. Every other
statement keeps SQLite's wait: a write outside a transaction, a COMMIT.
"""

from __future__ import annotations

import time

from django.db import OperationalError
from django.db.backends.sqlite3 import base

POLL_SECONDS = 0.0005


class DatabaseWrapper(base.DatabaseWrapper):
    def _start_transaction_under_autocommit(self) -> None:
        if self.transaction_mode != "IMMEDIATE":
            super()._start_transaction_under_autocommit()
            return
        timeout = float(self.settings_dict["OPTIONS"].get("timeout", 5))
        deadline = time.monotonic() + timeout
        # On the driver's connection: no statement of Django's to log or count.
        self.connection.execute("PRAGMA busy_timeout = 0")
        try:
            while True:
                try:
                    self.cursor().execute("BEGIN IMMEDIATE")
                    return
                except OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() >= deadline:
                        raise
                time.sleep(POLL_SECONDS)
        finally:
            self.connection.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
