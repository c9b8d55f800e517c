"""Retention: prune_runs, manage.py prune_runs and the daily prune."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.cache import cache
from django.core.management import call_command
from django.utils import timezone

from jobs import artifacts, retention, stats
from jobs.models import AlertFlip, Artifact, Job, JobDailyStats, Run, RunLogChunk

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(days=120)
RECENT = NOW - timedelta(days=10)


def make_run(job: Job, *, status: str = Run.Status.SUCCEEDED, at: datetime = OLD, **fields) -> Run:
    finished = status in Run.FINISHED
    return Run.objects.create(
        job=job,
        trigger=Run.Trigger.MANUAL,
        status=status,
        scheduled_for=at,
        queued_at=at,
        started_at=at if status != Run.Status.QUEUED else None,
        finished_at=at + timedelta(seconds=5) if finished else None,
        **fields,
    )


def add_log(run: Run, *texts: str) -> None:
    for seq, text in enumerate(texts, start=1):
        RunLogChunk.objects.create(run=run, seq=seq, is_head=seq == 1, data=text, size=len(text))


def prune(**kwargs) -> retention.PruneReport:
    kwargs.setdefault("older_than", timedelta(days=90))
    return retention.prune_runs(now=NOW, **kwargs)


def test_prune_deletes_old_finished_runs_and_keeps_active_and_recent_ones(make_job):
    job = make_job()
    old = [make_run(job, status=s) for s in Run.FINISHED]
    old_queued = make_run(job, status=Run.Status.QUEUED)
    old_running = make_run(job, status=Run.Status.RUNNING)
    recent = make_run(job, at=RECENT)
    # Finished 89 days ago: inside the window by its finish time.
    edge = make_run(job, at=NOW - timedelta(days=89, hours=23))

    report = prune()

    assert report.runs == len(old)
    assert not Run.objects.filter(pk__in=[r.pk for r in old]).exists()
    assert set(Run.objects.values_list("pk", flat=True)) == {
        old_queued.pk,
        old_running.pk,
        recent.pk,
        edge.pk,
    }


def test_prune_deletes_the_runs_log_chunks_and_artifact_files(make_job, settings, tmp_path):
    settings.MEDIA_ROOT = str(tmp_path / "media")
    job = make_job()
    old, recent = make_run(job), make_run(job, at=RECENT)
    add_log(old, "head\n", "tail\n")
    add_log(recent, "kept\n")
    stored: dict[int, Path] = {}
    for run in (old, recent):
        produced = tmp_path / f"out-{run.pk}"
        produced.mkdir()
        (produced / "export.csv").write_text("id,total\n1,2\n")
        (artifact,) = artifacts.collect(run, produced)
        stored[run.pk] = Path(artifact.file.path)
    assert all(path.exists() for path in stored.values())

    report = prune()

    assert (report.runs, report.log_chunks, report.artifacts) == (1, 2, 1)
    assert not stored[old.pk].exists()
    assert stored[recent.pk].exists()
    assert list(RunLogChunk.objects.values_list("data", flat=True)) == ["kept\n"]
    assert list(Artifact.objects.values_list("run_id", flat=True)) == [recent.pk]


def test_prune_keeps_the_daily_stats_so_charts_still_show_the_past(make_job):
    job = make_job()
    for status in (Run.Status.SUCCEEDED, Run.Status.FAILED, Run.Status.SUCCEEDED):
        stats.record_finished(make_run(job, status=status))
    day = timezone.localdate(OLD + timedelta(seconds=5))
    before = JobDailyStats.objects.get(job=job, day=day)

    prune()

    assert not Run.objects.exists()
    after = JobDailyStats.objects.get(job=job, day=day)
    assert (after.succeeded, after.failed, after.executed) == (2, 1, 3)
    assert (after.succeeded, after.failed) == (before.succeeded, before.failed)


def test_prune_unlinks_reruns_retries_flips_and_job_slots_pointing_at_deleted_runs(make_job):
    job = make_job()
    old = make_run(job, status=Run.Status.FAILED)
    rerun = make_run(job, at=RECENT, rerun_of=old)
    retry = make_run(job, at=RECENT, retry_of=old, attempt=2)
    flip = AlertFlip.objects.create(job=job, old_state="ok", new_state="failing", at=OLD, run=old)
    Job.objects.filter(pk=job.pk).update(active_run=old)  # a slot never released

    prune()

    rerun.refresh_from_db()
    retry.refresh_from_db()
    flip.refresh_from_db()
    job.refresh_from_db()
    assert (rerun.rerun_of_id, retry.retry_of_id, flip.run_id, job.active_run_id) == (
        None,
        None,
        None,
        None,
    )


def test_prune_handles_every_relation_to_run():
    """prune_runs deletes or unlinks each of these itself; a new relation to
    Run must be added there (its foreign key would fail the batch's commit)."""
    relations = {
        (f.related_model, f.field.name)
        for f in Run._meta.get_fields(include_hidden=True)
        if f.auto_created and not f.concrete
    }
    assert relations == {
        (Job, "active_run"),
        (Run, "rerun_of"),
        (Run, "retry_of"),
        (AlertFlip, "run"),
        (Artifact, "run"),
        (RunLogChunk, "run"),
    }


def test_prune_works_in_batches_and_reports_progress(make_job):
    job = make_job()
    for _ in range(5):
        make_run(job)
    seen: list[tuple[int, int]] = []

    report = prune(batch=2, progress=lambda r: seen.append((r.batches, r.runs)))

    assert seen == [(1, 2), (2, 4), (3, 5)]
    assert report.batches == 3
    assert report.runs == 5
    assert report.elapsed >= report.longest_batch > 0
    assert not Run.objects.exists()


def test_prune_of_nothing_is_zero_batches(make_job):
    make_run(make_job(), at=RECENT)
    report = prune()
    assert (report.batches, report.runs) == (0, 0)
    assert Run.objects.count() == 1


def test_prune_runs_command_prints_progress_and_a_summary(make_job):
    job = make_job()
    for _ in range(3):
        add_log(make_run(job, at=timezone.now() - timedelta(days=100)), "a\n")
    recent = make_run(job, at=timezone.now() - timedelta(days=1))
    out = StringIO()

    call_command("prune_runs", "--older-than", "90d", "--batch", "2", stdout=out)

    text = out.getvalue()
    assert "batch 1: 2 runs deleted" in text
    assert "batch 2: 3 runs deleted" in text
    assert "Deleted 3 runs (3 log chunks, 0 artifacts)" in text
    assert "2 batches" in text
    assert list(Run.objects.values_list("pk", flat=True)) == [recent.pk]


def test_prune_runs_dry_run_deletes_nothing(make_job):
    job = make_job()
    for _ in range(3):
        add_log(make_run(job, at=timezone.now() - timedelta(days=100)), "a\n", "b\n")
    make_run(job, at=timezone.now() - timedelta(days=1))
    out = StringIO()

    call_command("prune_runs", "--older-than", "90d", "--dry-run", stdout=out)

    assert "would delete 3 runs" in out.getvalue()
    assert "(6 log chunks)" in out.getvalue()
    assert Run.objects.count() == 4
    assert RunLogChunk.objects.count() == 6


def test_prune_runs_command_rejects_a_bad_age(db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="not like"):
        call_command("prune_runs", "--older-than", "ninety days", stdout=StringIO())


@pytest.mark.parametrize("age", ["99999999999d", "1000000d", "5300000w"])
def test_a_period_too_long_for_a_date_is_an_error_not_a_traceback(db, age):
    """prune_runs and send_digest share the period parser: a timedelta
    overflowed, or now - period did."""
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match=f'Period "{age}" is too long: at most 36500d'):
        call_command("prune_runs", "--older-than", age, stdout=StringIO())
    with pytest.raises(CommandError, match="too long"):
        call_command("send_digest", "--period", age, stdout=StringIO())


@pytest.fixture
def daily_prune(settings):
    settings.TIME_ZONE = "Europe/Berlin"
    settings.JOBSITE_PRUNE_TIME = "03:30"
    settings.JOBSITE_RETENTION_DAYS = 90
    days = ("2026-06-15", "2026-06-16")
    keys = [f"jobsite:prune:done:{d}" for d in days]
    cache.delete_many(keys)  # a database cache is not flushed between tests
    yield
    cache.delete_many(keys)


def test_daily_prune_runs_once_a_day_after_its_local_time(make_job, daily_prune, q_sync):
    job = make_job()
    make_run(job)
    # 03:29 in Berlin (CEST, UTC+2) is 01:29 UTC.
    before = datetime(2026, 6, 15, 1, 29, tzinfo=UTC)
    after = datetime(2026, 6, 15, 1, 31, tzinfo=UTC)

    assert not retention.prune_due(now=before)
    assert retention.prune_due(now=after)
    assert retention.prune_daily(now=after) is True
    assert not Run.objects.exists()

    make_run(job, at=after - timedelta(days=100))
    assert not retention.prune_due(now=after + timedelta(hours=5))
    assert retention.prune_daily(now=after + timedelta(hours=5)) is False
    assert Run.objects.count() == 1

    next_day = after + timedelta(days=1)
    assert retention.prune_due(now=next_day)
    assert retention.prune_daily(now=next_day) is True
    assert not Run.objects.exists()


def test_daily_prune_uses_the_retention_window(make_job, daily_prune, q_sync, settings):
    settings.JOBSITE_RETENTION_DAYS = 30
    job = make_job()
    now = datetime(2026, 6, 15, 2, 0, tzinfo=UTC)
    make_run(job, at=now - timedelta(days=31))
    kept = make_run(job, at=now - timedelta(days=29))

    assert retention.prune_daily(now=now) is True

    assert list(Run.objects.values_list("pk", flat=True)) == [kept.pk]


def test_no_daily_prune_without_a_prune_time(db, settings):
    settings.JOBSITE_PRUNE_TIME = ""
    assert not retention.prune_due(now=datetime(2026, 6, 15, 23, 0, tzinfo=UTC))


# --- Files of deleted jobs and runs ---------------------------------------------------------------


@pytest.fixture
def stored_file(settings, tmp_path):
    """stored_file(job) -> (a new run of `job`, the path of a file stored for it)."""
    from django.core.files.base import ContentFile

    settings.MEDIA_ROOT = str(tmp_path / "media")

    def store(job: Job) -> tuple[Run, Path]:
        run = make_run(job)
        artifact = Artifact(run=run, name="a.txt", size=1, created_at=NOW)
        artifact.file.save("a.txt", ContentFile(b"x"))
        path = Path(artifact.file.path)
        assert path.exists()
        return run, path

    return store


def test_deleting_a_job_in_the_admin_deletes_its_runs_files(
    make_job, admin_client, stored_file, django_capture_on_commit_callbacks
):
    job = make_job()
    _run, path = stored_file(job)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(f"/admin/jobs/job/{job.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Job.objects.filter(pk=job.pk).exists()
    assert not path.exists()


def test_deleting_runs_in_the_admin_deletes_their_files(
    make_job, admin_client, stored_file, django_capture_on_commit_callbacks
):
    job = make_job()
    (run, doomed), (_other, kept) = stored_file(job), stored_file(job)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            "/admin/jobs/run/",
            {"action": "delete_selected", "_selected_action": [run.pk], "post": "yes"},
        )
    assert response.status_code == 302
    assert not Run.objects.filter(pk=run.pk).exists()
    assert (doomed.exists(), kept.exists()) == (False, True)


def test_loadjobs_prune_deletes_the_pruned_jobs_files(
    make_job, stored_file, tmp_path, django_capture_on_commit_callbacks
):
    jobfile = tmp_path / "jobs.toml"
    jobfile.write_text('[[job]]\nname = "old"\ncommand = "true"\n')
    call_command("loadjobs", str(jobfile), stdout=StringIO())
    _run, path = stored_file(Job.objects.get(name="old"))
    jobfile.write_text('[[job]]\nname = "new"\ncommand = "true"\n')
    with django_capture_on_commit_callbacks(execute=True):
        call_command("loadjobs", str(jobfile), "--prune", stdout=StringIO())
    assert list(Job.objects.values_list("name", flat=True)) == ["new"]
    assert not path.exists()


@pytest.mark.parametrize("how", ["job.delete()", "runs' queryset delete()"])
def test_prune_runs_deletes_the_files_of_runs_deleted_another_way(make_job, stored_file, how):
    gone, other = make_job(), make_job()
    run, orphan = stored_file(gone)
    _other_run, kept = stored_file(other)
    if how == "job.delete()":
        gone.delete()  # as in manage.py shell: the cascade deletes rows, not files
    else:
        Run.objects.filter(pk=run.pk).delete()
    assert orphan.exists()
    out = StringIO()

    call_command("prune_runs", "--older-than", "36500d", stdout=out)

    assert "Deleted 1 stored files of runs that were deleted without them" in out.getvalue()
    assert not orphan.exists()
    assert not orphan.parent.exists()  # the run's directory too
    assert kept.exists()
    assert Run.objects.filter(job=other).count() == 1


def test_the_daily_prune_deletes_the_files_of_a_job_deleted_in_a_shell(make_job, stored_file):
    job = make_job()
    _run, orphan = stored_file(job)
    job.delete()

    summary = retention.prune_task(90, NOW.isoformat())

    assert "1 files of runs deleted another way" in summary
    assert not orphan.exists()
