"""manage.py prune_runs --older-than 90d [--batch N] [--dry-run]"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from jobs import retention
from jobs.management.commands.send_digest import parse_period
from jobs.models import RunLogChunk


class Command(BaseCommand):
    help = (
        "Delete finished runs (with their logs and artifact files) that finished longer "
        "ago than --older-than, in short batches. Queued and running runs are never "
        "deleted; the daily rollups are kept, so charts and rates still show the past."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--older-than",
            required=True,
            help="Age of the runs to delete, by finish time: 90d, 12w, 36h.",
        )
        parser.add_argument(
            "--batch", type=int, default=1000, help="Runs per transaction (default 1000)."
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be deleted; delete nothing."
        )

    def handle(self, *args, older_than: str, batch: int, dry_run: bool, **options) -> None:
        age = parse_period(older_than)
        if batch < 1:
            raise CommandError("--batch must be at least 1.")
        now = timezone.now()
        cutoff = timezone.localtime(now - age)
        if dry_run:
            runs = retention.prunable(older_than=age, now=now)
            chunks = RunLogChunk.objects.filter(run__in=runs).count()
            self.stdout.write(
                f"Dry run: would delete {runs.count():,} runs finished before "
                f"{cutoff:%Y-%m-%d %H:%M %Z} ({chunks:,} log chunks). Nothing deleted."
            )
            return
        self.stdout.write(f"Deleting runs finished before {cutoff:%Y-%m-%d %H:%M %Z} …")
        report = retention.prune_runs(older_than=age, batch=batch, now=now, progress=self.progress)
        self.stdout.write(
            f"Deleted {report.runs:,} runs ({report.log_chunks:,} log chunks, "
            f"{report.artifacts:,} artifacts) in {report.elapsed:.1f}s: "
            f"{report.batches:,} batches, longest {report.longest_batch:.3f}s. "
            "Daily stats kept."
        )
        if report.orphaned_files:
            self.stdout.write(
                f"Deleted {report.orphaned_files:,} stored files of runs that were deleted "
                "without them (e.g. job.delete() in a shell)."
            )

    def progress(self, report: retention.PruneReport) -> None:
        self.stdout.write(
            f"  batch {report.batches:,}: {report.runs:,} runs deleted, "
            f"{report.elapsed:.1f}s, {report.runs_per_second:,.0f} runs/s"
        )
        self.stdout.flush()
