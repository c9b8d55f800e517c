"""The SQLite backend's wait for the write lock (jobsite/db/sqlite3)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from django.db import OperationalError, connection, transaction

from jobs.models import Job

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's write lock only"),
]

HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
print("released", flush=True)
"""


def hold_write_lock(seconds: float) -> subprocess.Popen:
    """Another process holding SQLite's write lock for `seconds`."""
    connection.ensure_connection()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, connection.settings_dict["NAME"], str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def busy_timeout() -> int:
    return connection.connection.execute("PRAGMA busy_timeout").fetchone()[0]


def test_a_transaction_waits_for_the_lock_and_then_writes():
    holder = hold_write_lock(0.4)
    started = time.monotonic()
    with transaction.atomic():
        Job.objects.create(name="waited", slug="waited", command="true")
    waited = time.monotonic() - started
    assert holder.wait(5) == 0 and holder.stdout.read().strip() == "released"
    assert waited >= 0.3, "it did not wait for the other process"
    assert Job.objects.filter(slug="waited").exists()
    # SQLite's own wait is back for every other statement.
    assert busy_timeout() == int(connection.settings_dict["OPTIONS"]["timeout"] * 1000)


def test_a_lock_held_past_the_timeout_is_the_usual_error(monkeypatch):
    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "timeout", 0.3)
    holder = hold_write_lock(2)
    try:
        with pytest.raises(OperationalError, match="database is locked"), transaction.atomic():
            Job.objects.create(name="never", slug="never", command="true")
    finally:
        holder.kill()
        holder.wait()
    assert busy_timeout() == 300
    assert not Job.objects.filter(slug="never").exists()
    connection.close()  # the next test's connection waits the usual 20 s again
