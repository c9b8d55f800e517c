"""django-q2 entry points: thin callers of services."""

from __future__ import annotations

import multiprocessing

from django.db import InterfaceError, OperationalError, connection

from jobs import execution, services


def execute_run(run_id: int) -> str:
    if not execution.adopting() and multiprocessing.parent_process() is not None:
        # A django-q2 worker inherits what its jobs leave behind with setsid
        # (execution.adopt_orphans). Not in sync mode, where tasks run inside
        # a process (a test run, a shell) that has children of its own.
        execution.adopt_orphans()
    run = _claim(run_id)
    if run is None:
        return "nothing to claim"
    return services.run_execute(run, reload=False).status


def _claim(run_id: int):
    """The run's claim, without Django's connection health check first.

    django-q2 resets the check before every task, and on PostgreSQL it is a
    `SELECT 1` round trip: one per run, as many as the whole claim. Instead
    the claim trusts the kept connection, and if the server dropped it (a
    restart), reconnects and claims once more. A claim that failed was rolled
    back (one statement, or one transaction). Only if the server committed
    it and the reply was lost does the second claim find nothing; the run's
    lease then runs out and the sweeper marks it lost, as for a dead worker."""
    connection.health_check_done = True
    try:
        return services.run_claim(run_id=run_id, worker=services.worker_name())
    except (OperationalError, InterfaceError):
        if connection.in_atomic_block:
            raise
        connection.close()
        return services.run_claim(run_id=run_id, worker=services.worker_name())


def notify_flip(flip_id: int) -> str:
    from jobs import notify

    return notify.notify_flip(flip_id=flip_id)


def retry_notification(notification_id: int) -> str:
    from jobs import notify

    return notify.retry(notification_id=notification_id)
