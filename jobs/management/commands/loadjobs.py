"""manage.py loadjobs FILE [--prune]: job definitions as code."""

from __future__ import annotations

import sys

from django.core.management.base import BaseCommand

from jobs.jobfile import JobFileError, jobs_load

EXIT_INVALID = 2


class Command(BaseCommand):
    help = (
        "Create or update the jobs a TOML file defines (all or nothing; loading the "
        "same file twice changes nothing)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("file", help="A TOML file of [[job]] tables.")
        parser.add_argument(
            "--prune",
            action="store_true",
            help="Delete jobs loaded earlier from this file that it no longer names.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Say what loading (and --prune) would create, change, rename and delete; "
            "change nothing.",
        )

    def handle(self, *args, file: str, prune: bool, dry_run: bool, **options) -> None:
        try:
            report = jobs_load(path=file, prune=prune, dry_run=dry_run)
        except JobFileError as exc:
            for message in exc.errors:
                self.stderr.write(message)
            self.stderr.write(f"Nothing was loaded: {len(exc.errors)} problem(s).")
            sys.exit(EXIT_INVALID)
        for warning in report.warnings:
            self.stderr.write(f"warning: {warning}")
        self.stdout.write(report.summary())
