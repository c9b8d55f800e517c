"""manage.py runjob SLUG: run a job now, in the foreground, like any other run."""

from __future__ import annotations

import difflib
import signal
import sys

from django.conf import settings
from django.core.management.base import BaseCommand

from jobs import execution, services
from jobs.models import Job, Run

# Exit codes besides the job's own (sysexits.h and coreutils' timeout(1)).
EXIT_USAGE = 2
EXIT_TIMED_OUT = 124
EXIT_SKIPPED = 75  # EX_TEMPFAIL: try again later
EXIT_INTERRUPTED = 130


def exit_code_for(run: Run) -> int:
    """The shell convention for a finished run: the child's own code, 128+N
    when signal N killed it, 124 for a timeout, 75 when it was skipped."""
    if run.status == Run.Status.SUCCEEDED:
        return 0
    if run.status == Run.Status.TIMED_OUT:
        return EXIT_TIMED_OUT
    if run.status == Run.Status.SKIPPED:
        return EXIT_SKIPPED
    if run.status == Run.Status.CANCELLED:
        return EXIT_INTERRUPTED
    if run.exit_code is None or run.exit_code == 0:
        return 1  # failed before or around the child (e.g. an unset ${NAME})
    if run.exit_code < 0:
        return 128 + -run.exit_code
    return run.exit_code


def find_job(slug: str) -> Job | None:
    return Job.objects.filter(slug=slug).first()


def unknown_job_message(slug: str) -> str:
    slugs = list(Job.objects.values_list("slug", flat=True))
    close = [s for s in slugs if slug in s] + difflib.get_close_matches(slug, slugs, n=3)
    close = list(dict.fromkeys(close))[:3]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f'No job with slug "{slug}".{hint}'


class Command(BaseCommand):
    help = (
        "Run a job now in the foreground: stream its output, record the run "
        "(trigger cli) and exit with the job's exit code."
    )

    def run_from_argv(self, argv) -> None:
        # From the command line this process starts nothing but the job, so
        # it may inherit and kill what the job leaves behind with `setsid`
        # (not under call_command, inside a process with children of its own).
        execution.adopt_orphans()
        super().run_from_argv(argv)

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug", help="The job's slug.")
        parser.add_argument(
            "--enqueue",
            action="store_true",
            help="Hand the run to the workers instead, print its URL and return.",
        )

    def handle(self, *args, slug: str, enqueue: bool, **options) -> None:
        job = find_job(slug)
        if job is None:
            self.stderr.write(unknown_job_message(slug))
            sys.exit(EXIT_USAGE)
        if enqueue:
            run = services.run_create(job=job, trigger=Run.Trigger.CLI)
            if run.status == Run.Status.SKIPPED:
                self.stderr.write(f"skipped: {run.error_summary} ({self.run_url(run)})")
                sys.exit(EXIT_SKIPPED)
            run.refresh_from_db()
            if run.enqueued_at is None:
                self.stderr.write(self.waiting_message(run))
            self.stdout.write(self.run_url(run))
            return
        run = self.run_in_foreground(job)
        if run.status == Run.Status.QUEUED:
            # overlap=queue or replace: it waits for the running run to end,
            # and the workers (not this process) will start it then.
            self.stderr.write(self.waiting_message(run))
            sys.exit(EXIT_SKIPPED)
        self.stderr.write(self.summary(run))
        sys.exit(exit_code_for(run))

    def run_in_foreground(self, job: Job) -> Run:
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            return services.run_foreground(job=job, echo=self.echo)
        except KeyboardInterrupt:
            # The child (in its own session) was killed by run_process on the
            # way out; record the run as cancelled rather than leave it running.
            run = self.interrupted_run(job)
            if run is None:
                raise
            return run
        finally:
            signal.signal(signal.SIGTERM, previous)

    def interrupted_run(self, job: Job) -> Run | None:
        run = (
            Run.objects.filter(
                job=job,
                trigger=Run.Trigger.CLI,
                status=Run.Status.RUNNING,
                worker=services.worker_name(),
            )
            .order_by("-id")
            .first()
        )
        if run is not None:
            services.run_finish(
                run=run, status=Run.Status.CANCELLED, summary="Interrupted in manage.py runjob"
            )
            run.refresh_from_db()
        return run

    def echo(self, text: str) -> None:
        self.stdout.write(text, ending="")
        self.stdout.flush()

    def run_url(self, run: Run) -> str:
        return settings.SITE_URL + run.get_absolute_url()

    def waiting_message(self, run: Run) -> str:
        url = self.run_url(run)
        blocker = (
            Run.objects.filter(job_id=run.job_id, status=Run.Status.RUNNING)
            .exclude(pk=run.pk)
            .order_by("id")
            .first()
        )
        if blocker is None:
            return f"waiting: queued; the workers will start it ({url})"
        if blocker.cancel_requested_at is not None:
            return (
                f"waiting: replacing run #{blocker.pk}, which is being cancelled; "
                f"the workers will start this run when it ends ({url})"
            )
        return (
            f"waiting: queued behind run #{blocker.pk}; the workers will start it "
            f"when that run ends ({url})"
        )

    def summary(self, run: Run) -> str:
        url = self.run_url(run)
        if run.status == Run.Status.SKIPPED:
            return f"skipped: {run.error_summary} ({url})"
        duration = run.duration()
        took = f" in {duration.total_seconds():.1f}s" if duration is not None else ""
        detail = f": {run.error_summary}" if run.error_summary else ""
        return f"{run.job.slug} run #{run.pk} {run.status}{detail}{took}, {url}"


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
