"""manage.py dumpjobs [--output FILE] [SLUG ...]: jobs as a loadjobs TOML file."""

from __future__ import annotations

import sys
from pathlib import Path

from django.core.management.base import BaseCommand

from jobs.jobfile import jobs_dumps
from jobs.management.commands.runjob import EXIT_USAGE, unknown_job_message
from jobs.models import Job

EXIT_CANNOT_WRITE = 73  # EX_CANTCREAT (sysexits.h)


class Command(BaseCommand):
    help = (
        "Write jobs as TOML in the loadjobs format. Secret values and delivery passwords "
        "are never written: ${NAME} references are kept, other values become placeholders "
        "(with a warning on stderr)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("slugs", nargs="*", metavar="SLUG", help="Only these jobs.")
        parser.add_argument("--output", "-o", help="Write to this file instead of stdout.")

    def handle(self, *args, slugs: list[str], output: str | None, **options) -> None:
        jobs = Job.objects.order_by("name").prefetch_related("upstreams")
        if slugs:
            jobs = jobs.filter(slug__in=slugs)
            missing = sorted(set(slugs) - {job.slug for job in jobs})
            if missing:
                for slug in missing:
                    self.stderr.write(unknown_job_message(slug))
                sys.exit(EXIT_USAGE)
        text, warnings = jobs_dumps(list(jobs))
        for warning in warnings:
            self.stderr.write(f"warning: {warning}")
        if output:
            try:
                Path(output).write_text(text, encoding="utf-8")
            except OSError as exc:
                self.stderr.write(f"Cannot write {output}: {exc.strerror or exc}")
                sys.exit(EXIT_CANNOT_WRITE)
            self.stderr.write(f"Wrote {len(jobs)} job(s) to {output}")
        else:
            self.stdout.write(text, ending="")
