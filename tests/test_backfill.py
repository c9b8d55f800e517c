"""Backfill: a job run for each of its fires in a past range, each with its
own logical time, one after another (manage.py backfill, the job page)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command

from jobs import runlog, services
from jobs.models import Job, MissedFires, Run

T0 = datetime(2026, 6, 1, tzinfo=UTC)


def call(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("backfill", *args, stdout=out, stderr=err)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue(), err.getvalue()


def test_a_backfill_runs_each_day_once_in_order_with_its_own_logical_time(
    make_job, q_sync, django_capture_on_commit_callbacks
):
    job = make_job(
        name="daily-export", schedule="0 2 * * *", command='echo "$JOBSITE_SCHEDULED_FOR"'
    )

    with django_capture_on_commit_callbacks(execute=True):
        code, out, err = call("daily-export", "--from", "2026-06-01", "--to", "2026-06-03")

    assert code == 0, err
    days = [T0 + timedelta(days=d, hours=2) for d in range(3)]
    assert out.split() == [day.isoformat() for day in days]
    assert "queued 3 backfill runs, oldest first" in err
    runs = list(Run.objects.filter(job=job).order_by("pk"))
    assert [(r.trigger, r.scheduled_for, r.status) for r in runs] == [
        (Run.Trigger.BACKFILL, day, Run.Status.SUCCEEDED) for day in days
    ]
    # One after another, in order: each started after the one before ended.
    for before, after in zip(runs, runs[1:], strict=False):
        assert after.started_at >= before.finished_at
    assert [runlog.read_log(r).strip() for r in runs] == [day.isoformat() for day in days]


def test_backfill_runs_wait_their_turn_under_the_jobs_overlap_policy(make_job):
    job = make_job(schedule="0 * * * *", overlap="skip")
    runs = services.run_backfill(
        job=job, start=T0, end=T0 + timedelta(hours=3), by=None, now=T0 + timedelta(days=1)
    )
    assert len(runs) == 4
    assert Run.objects.filter(job=job, enqueued_at__isnull=False).count() == 1
    assert set(Run.objects.filter(job=job).values_list("status", flat=True)) == {"queued"}


def test_each_backfill_run_is_judged_by_its_upstreams_run_for_that_day(
    make_job, q_sync, django_capture_on_commit_callbacks
):
    load = make_job(name="load", schedule="0 1 * * *")
    export = make_job(name="export", schedule="0 2 * * *", overlap="allow")
    export.upstreams.add(load)
    Job.objects.filter(pk=load.pk).update(created_at=T0 - timedelta(days=30))
    for day, status in ((0, Run.Status.SUCCEEDED), (1, Run.Status.FAILED)):
        at = T0 + timedelta(days=day, hours=1)
        Run.objects.create(
            job=load, status=status, trigger=Run.Trigger.SCHEDULE, scheduled_for=at,
            queued_at=at, started_at=at, finished_at=at, exit_code=0 if day == 0 else 1,
        )  # fmt: skip

    with django_capture_on_commit_callbacks(execute=True):
        services.run_backfill(
            job=export, start=T0, end=T0 + timedelta(days=2), by=None, now=T0 + timedelta(days=3)
        )

    first, second = Run.objects.filter(job=export).order_by("scheduled_for")
    assert first.status == Run.Status.SUCCEEDED
    assert second.status == Run.Status.SKIPPED
    assert second.error_summary.startswith("waiting on load: failed at 2026-06-02")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", "--from", "2026-06-01", "--to", "2026-06-02"], "no job with slug 'nope'"),
        (["hourly", "--from", "June 1st", "--to", "2026-06-02"], "--from 'June 1st' is not"),
        (["hourly", "--from", "2026-06-02", "--to", "2026-06-01"], "ends before it begins"),
        (["hourly", "--from", "2020-01-01", "--to", "2026-06-01"], "at most 1000"),
        (["manual", "--from", "2026-06-01", "--to", "2026-06-02"], "has no schedule"),
    ],
)
def test_backfill_says_what_is_wrong_and_queues_nothing(make_job, args, message):
    make_job(name="hourly", schedule="0 * * * *")
    make_job(name="manual", schedule="")
    code, _out, err = call(*args)
    assert code == 2
    assert message in err
    assert not Run.objects.exists()


def test_dry_run_lists_the_fires_in_the_jobs_zone_and_queues_nothing(make_job):
    make_job(name="berlin", schedule="30 6 * * *", timezone="Europe/Berlin")
    code, out, err = call("berlin", "--from", "2026-10-24", "--to", "2026-10-26", "--dry-run")
    assert code == 0, err
    # Across the end of summer time: 06:30 local each day, the offset changes.
    assert out.split() == [
        "2026-10-24T06:30:00+02:00",
        "2026-10-25T06:30:00+01:00",
        "2026-10-26T06:30:00+01:00",
    ]
    assert "would queue 3 backfill runs" in err
    assert not Run.objects.exists()


def test_missed_fires_are_backfilled_from_the_job_page(client, make_job, make_user):
    job = make_job(name="nightly", schedule="0 3 * * *")
    gap = MissedFires.objects.create(
        job=job, first=T0 + timedelta(hours=3), last=T0 + timedelta(days=2, hours=3), count=3,
        policy="latest", recorded_at=T0 + timedelta(days=3),
    )  # fmt: skip
    viewer = make_user(perms=("jobs.view_job", "jobs.view_run"))
    client.force_login(viewer)
    url = f"/jobs/nightly/backfill/{gap.pk}/"
    assert "Run these 3 fires" not in client.get(job.get_absolute_url()).content.decode()
    assert client.post(url).status_code == 403

    client.force_login(make_user(perms=("jobs.view_job", "jobs.view_run", "jobs.run_job")))
    page = client.get(job.get_absolute_url()).content.decode()
    assert "Run these 3 fires" in page
    assert client.get(url).status_code == 405
    response = client.post(url)

    runs = list(Run.objects.filter(job=job).order_by("scheduled_for"))
    assert [r.scheduled_for for r in runs] == [T0 + timedelta(days=d, hours=3) for d in range(3)]
    assert {r.trigger for r in runs} == {Run.Trigger.BACKFILL}
    assert response.status_code == 302 and response["Location"] == job.get_absolute_url()
    messages = [str(m) for m in response.wsgi_request._messages]
    assert messages == ["Queued 3 backfill runs of nightly, oldest first."]
    # Done once: the gap says so, and a second press queues nothing more.
    gap.refresh_from_db()
    assert gap.backfilled_at is not None
    assert "backfilled" in client.get(job.get_absolute_url()).content.decode()
    client.post(url)
    assert Run.objects.filter(job=job).count() == 3
