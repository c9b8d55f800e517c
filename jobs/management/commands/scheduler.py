"""manage.py scheduler: Jobsite's clock (like celery beat; safe to run several)."""

from __future__ import annotations

import logging
import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import DatabaseError, close_old_connections, connections
from django.utils import timezone

from jobs import clock

log = logging.getLogger("jobs.scheduler")


class Command(BaseCommand):
    help = "Fire scheduled jobs on time. Several schedulers may run at once: claims make it safe."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--once", action="store_true", help="Do one tick and exit.")
        parser.add_argument(
            "--max-sleep",
            type=float,
            default=settings.JOBSITE_SCHEDULER_MAX_SLEEP,
            help="Longest sleep between ticks, in seconds (default %(default)s).",
        )

    def handle(self, *args, once: bool, max_sleep: float, **options) -> None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        log.info("scheduler started (max sleep %.1fs)", max_sleep)
        while not stop.is_set():
            pause = self.tick(max_sleep)
            if once:
                break
            stop.wait(pause)
        log.info("scheduler stopped")

    def tick(self, max_sleep: float) -> float:
        close_old_connections()
        try:
            for run in clock.tick():
                log.info(
                    "fired %s for %s: run #%s %s",
                    run.job.slug,
                    run.scheduled_for.isoformat(),
                    run.pk,
                    run.status,
                )
            return clock.sleep_seconds(now=timezone.now(), max_sleep=max_sleep)
        except DatabaseError as exc:
            # A database restart must not kill the clock: retry shortly.
            log.warning("database unavailable, retrying: %s", exc)
            connections.close_all()
            return max_sleep
        except Exception:
            # Nor a bug in one part of a tick (the sweep, a digest): the
            # clock that stops is the failure nobody sees.
            log.exception("scheduler tick failed, trying again in %.0f s", ERROR_PAUSE)
            connections.close_all()
            return max(max_sleep, ERROR_PAUSE)


ERROR_PAUSE = 5.0
