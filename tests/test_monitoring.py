"""/health/ and /metrics: what a load balancer and Prometheus see."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import time_machine
from django.core.cache import cache
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from jobs import services, stats
from jobs.clock import TICK_KEY
from jobs.models import Job, JobDailyStats, Run
from tests.conftest import wait_for

quiet = {"echo": lambda text: None}
TOKEN = "scrape-7c1e9a"


@pytest.fixture
def fresh_cache(db):
    """No scheduler tick and no cluster status left over from earlier tests
    (the cache table is not flushed between tests)."""
    cache.clear()
    yield
    cache.clear()


def tick(age: timedelta = timedelta(0)) -> None:
    """What the scheduler writes on every tick."""
    cache.set(TICK_KEY, (timezone.now() - age).isoformat(), timeout=None)


def make_run(job: Job, status: str, **fields) -> Run:
    now = timezone.now()
    return Run.objects.create(
        job=job,
        status=status,
        trigger=Run.Trigger.MANUAL,
        scheduled_for=now,
        queued_at=now,
        **fields,
    )


def scrape(client, **headers) -> dict:
    """GET /metrics with the token and parse it: {family name: [samples]}."""
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}", **headers})
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == CONTENT_TYPE_LATEST
    families = text_string_to_metric_families(response.content.decode())
    return {family.name: family.samples for family in families}


def values(samples, name: str, **labels) -> list[float]:
    return [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


# --- /health/ -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@override_settings(JOBSITE_SCHEDULER_STALE_SECONDS=5)
def test_health_is_ok_without_login_while_a_scheduler_and_a_cluster_run(
    client, fresh_cache, processes, make_user
):
    scheduler = processes.start("scheduler")
    processes.start("qcluster")

    # The scheduler's first tick hands the daily prune to the cluster: wait
    # until that task is through too, so the queue figures read 0.
    response = wait_for(
        lambda: (
            (r := client.get("/health/")).status_code == 200
            and r.json()["queue"]["django_q"] == 0
            and r
        ),
        timeout=60,
        message="/health/ never said ok with an empty queue:\n" + processes.output(),
    )

    body = response.json()
    assert body["status"] == "ok" and body["failing"] == []
    assert body["database"]["reachable"] is True
    assert body["database"]["latency_ms"] >= 0
    assert body["scheduler"]["alive"] is True
    assert 0 <= body["scheduler"]["age_seconds"] < 5
    [cluster] = body["workers"]["clusters"]
    assert cluster["workers"] == 2  # Q_WORKERS=2 in the processes fixture
    assert cluster["status"] in ("Idle", "Working")
    # Where the workers run is for signed-in users: /health/ is public.
    assert "host" not in cluster and "pid" not in cluster
    assert socket.gethostname() not in response.content.decode()
    client.force_login(make_user())
    [cluster] = client.get("/health/").json()["workers"]["clusters"]
    assert cluster["host"] == socket.gethostname() and cluster["pid"] > 0
    client.logout()
    assert body["queue"] == {"depth": 0, "django_q": 0}
    assert body["counts"] == {"running": 0, "failing": 0, "stale": 0}
    # Prometheus sees the same workers: an alert on jobsite_workers == 0.
    with override_settings(METRICS_TOKEN=TOKEN):
        families = scrape(client)
    assert values(families["jobsite_workers"], "jobsite_workers") == [2]
    assert values(families["jobsite_broker_queue_depth"], "jobsite_broker_queue_depth") == [0]

    # The scheduler stops: within its stale window, /health/ says so.
    scheduler.terminate()
    scheduler.wait(15)
    response = wait_for(
        lambda: (r := client.get("/health/")).status_code == 503 and r,
        timeout=15,
        message="/health/ did not notice the scheduler stopped",
    )
    body = response.json()
    assert body["status"] == "degraded"
    assert body["failing"] == ["scheduler"]
    assert body["workers"]["alive"] is True


def test_health_is_503_with_scheduler_failing_when_its_last_tick_is_old(client, fresh_cache):
    tick(age=timedelta(minutes=10))

    response = client.get("/health/")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert "scheduler" in body["failing"]
    assert body["scheduler"]["alive"] is False
    assert 600 <= body["scheduler"]["age_seconds"] < 660
    assert body["database"]["reachable"] is True


def test_health_for_a_load_balancer_is_503_when_the_database_is_down(client, database_down):
    response = client.get("/health/", {"scope": "web"})
    assert response.status_code == 503  # this web server is of no use
    assert response.json()["status"] == "down"


def test_health_for_a_load_balancer_is_200_while_only_the_clock_and_workers_are_down(
    client, fresh_cache
):
    tick(age=timedelta(minutes=10))  # the scheduler is down, no cluster runs

    response = client.get("/health/", {"scope": "web"})

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["failing"] == ["scheduler", "workers"]


def test_health_says_the_scheduler_never_ticked(client, fresh_cache):
    body = client.get("/health/").json()

    assert "scheduler" in body["failing"]
    assert body["scheduler"] == {
        "alive": False,
        "last_tick": None,
        "age_seconds": None,
        "stale_after_seconds": 30,
    }


def test_health_is_503_with_workers_failing_when_no_cluster_runs(client, fresh_cache):
    tick()

    response = client.get("/health/")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["failing"] == ["workers"]
    assert body["workers"] == {"alive": False, "clusters": []}
    assert body["scheduler"]["alive"] is True


def test_health_counts_running_failing_and_stale(client, fresh_cache, make_job):
    busy, waiting, failing, stale, fine = (make_job() for _ in range(5))
    make_run(busy, Run.Status.RUNNING)
    make_run(busy, Run.Status.QUEUED)
    make_run(waiting, Run.Status.QUEUED)
    make_run(failing, Run.Status.FAILED)
    make_run(fine, Run.Status.SUCCEEDED)
    Job.objects.filter(pk=failing.pk).update(alert_state=Job.AlertState.FAILING)
    Job.objects.filter(pk__in=[stale.pk, busy.pk]).update(alert_state=Job.AlertState.STALE)

    body = client.get("/health/").json()

    assert body["counts"] == {"running": 1, "failing": 1, "stale": 2}
    assert body["queue"]["depth"] == 2


@pytest.fixture
def database_down():
    """Point the default connection at a database that cannot be opened."""
    saved = dict(connection.settings_dict)
    connection.close()
    if connection.vendor == "sqlite":
        connection.settings_dict["NAME"] = "/nonexistent-dir/jobsite.sqlite3"
    else:
        connection.settings_dict["PORT"] = "1"  # nothing listens there: refused
    yield
    connection.close()
    connection.settings_dict.clear()
    connection.settings_dict.update(saved)


@pytest.mark.django_db(transaction=True)
def test_health_is_503_json_saying_the_database_is_down(client, database_down):
    response = client.get("/health/")

    assert response.status_code == 503
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert body["status"] == "down"
    assert body["failing"][0] == "database"
    assert body["database"]["reachable"] is False
    assert body["database"]["error"] == "OperationalError"
    assert body["counts"] is None and body["queue"] is None


# --- /metrics -------------------------------------------------------------------------------


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_count_runs_by_job_and_status_as_the_daily_rollups_do(client, make_job):
    good = make_job(name="nightly-export", command="true")
    bad = make_job(name="flaky-upload", command="exit 3")
    for _ in range(2):
        services.run_foreground(job=good, **quiet)
    services.run_foreground(job=bad, **quiet)

    samples = scrape(client)["jobsite_runs"]

    assert values(samples, "jobsite_runs_total", job="nightly-export", status="succeeded") == [2]
    assert values(samples, "jobsite_runs_total", job="nightly-export", status="failed") == [0]
    assert values(samples, "jobsite_runs_total", job="flaky-upload", status="failed") == [1]
    assert values(samples, "jobsite_runs_total", job="flaky-upload", status="succeeded") == [0]
    for job in (good, bad):
        rollup = JobDailyStats.objects.get(job=job)
        for status in ("succeeded", "failed", "timed_out", "lost", "cancelled", "skipped"):
            got = values(samples, "jobsite_runs_total", job=job.slug, status=status)
            assert got == [getattr(rollup, status)], (job.slug, status)


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_histograms_cover_the_last_day_of_runs(client, make_job):
    job = make_job(name="slow-report")
    now = timezone.now()
    for minutes, late in ((3, 2), (20, 40)):  # (duration in minutes, lateness in seconds)
        run = make_run(
            job,
            Run.Status.SUCCEEDED,
            started_at=now - timedelta(minutes=minutes),
            finished_at=now,
        )
        Run.objects.filter(pk=run.pk).update(scheduled_for=run.started_at - timedelta(seconds=late))
    make_run(
        job,
        Run.Status.SUCCEEDED,
        started_at=now - timedelta(days=2, minutes=1),
        finished_at=now - timedelta(days=2),
    )

    families = scrape(client)
    duration = families["jobsite_run_duration_seconds"]
    lateness = families["jobsite_run_lateness_seconds"]

    assert values(duration, "jobsite_run_duration_seconds_count", job="slow-report") == [2]
    assert values(duration, "jobsite_run_duration_seconds_sum", job="slow-report") == [
        pytest.approx(23 * 60, abs=1)
    ]
    assert values(
        duration, "jobsite_run_duration_seconds_bucket", job="slow-report", le="300.0"
    ) == [1]
    assert values(
        duration, "jobsite_run_duration_seconds_bucket", job="slow-report", le="1800.0"
    ) == [2]
    assert values(lateness, "jobsite_run_lateness_seconds_bucket", job="slow-report", le="5.0") == [
        1
    ]
    assert values(lateness, "jobsite_run_lateness_seconds_sum", job="slow-report") == [
        pytest.approx(42, abs=0.01)
    ]


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_show_active_runs_alert_states_last_success_and_scheduler_tick(
    client, fresh_cache, make_job
):
    busy = make_job(name="busy")
    broken = make_job(name="broken", command="exit 1")
    services.run_foreground(job=busy, **quiet)
    make_run(busy, Run.Status.RUNNING)
    make_run(busy, Run.Status.QUEUED)
    make_run(busy, Run.Status.QUEUED)
    Job.objects.filter(pk=broken.pk).update(alert_state=Job.AlertState.STALE)
    tick(age=timedelta(seconds=7))
    busy.refresh_from_db()

    families = scrape(client)

    assert values(families["jobsite_runs_running"], "jobsite_runs_running", job="busy") == [1]
    assert values(families["jobsite_runs_queued"], "jobsite_runs_queued", job="busy") == [2]
    assert values(families["jobsite_runs_queued"], "jobsite_runs_queued", job="broken") == [0]
    assert values(families["jobsite_jobs_stale"], "jobsite_jobs_stale") == [1]
    states = families["jobsite_job_alert_state"]
    assert values(states, "jobsite_job_alert_state", job="broken", state="stale") == [1]
    assert values(states, "jobsite_job_alert_state", job="broken", state="ok") == [0]
    assert values(states, "jobsite_job_alert_state", job="busy", state="ok") == [1]
    last_success = families["jobsite_job_last_success_timestamp_seconds"]
    assert values(last_success, last_success[0].name, job="busy") == [
        pytest.approx(busy.last_success_at.timestamp())
    ]
    assert values(last_success, last_success[0].name, job="broken") == []  # never succeeded
    [tick_at] = values(
        families["jobsite_scheduler_last_tick_timestamp_seconds"],
        "jobsite_scheduler_last_tick_timestamp_seconds",
    )
    assert tick_at == pytest.approx((timezone.now() - timedelta(seconds=7)).timestamp(), abs=5)


@override_settings(METRICS_TOKEN=TOKEN)
@pytest.mark.parametrize(
    "header", [None, "Bearer wrong-token", f"Basic {TOKEN}", TOKEN, "Bearer é", "Bearer ÿþ"]
)
def test_metrics_with_a_token_configured_refuse_a_missing_or_wrong_one(client, db, header):
    headers = {"Authorization": header} if header else {}

    response = client.get("/metrics", headers=headers)

    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"jobsite_" not in response.content


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_with_the_right_token_need_no_login(client, make_job):
    make_job(name="visible")

    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 200
    assert 'jobsite_runs_queued{job="visible"} 0.0' in response.content.decode()


@override_settings(METRICS_TOKEN="")
def test_metrics_without_a_token_need_a_login(client, make_user, make_job):
    make_job(name="visible")

    anonymous = client.get("/metrics")
    client.force_login(make_user())
    logged_in = client.get("/metrics")

    assert anonymous.status_code == 302
    assert anonymous.url.startswith("/accounts/login/?next=/metrics")
    assert logged_in.status_code == 200
    assert 'jobsite_runs_queued{job="visible"} 0.0' in logged_in.content.decode()


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_queries_do_not_grow_with_the_number_of_jobs(client, fresh_cache, make_job):
    def add_jobs(count: int) -> None:
        for _ in range(count):
            job = make_job()
            now = timezone.now()
            done = make_run(
                job,
                Run.Status.SUCCEEDED,
                started_at=now - timedelta(seconds=5),
                finished_at=now,
            )
            stats.record_finished(done)
            Job.objects.filter(pk=job.pk).update(last_success_at=now)
            make_run(job, Run.Status.QUEUED)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            samples = scrape(client)["jobsite_runs"]
        assert len(values(samples, "jobsite_runs_total", status="succeeded")) == Job.objects.count()
        return len(captured)

    add_jobs(3)
    queries()  # the day's first scrape sums the closed days and caches them
    few = queries()
    add_jobs(27)

    assert queries() == few


def assert_histograms_consistent(families: dict) -> None:
    """Every histogram series: buckets cumulative and ending in +Inf, +Inf
    equal to _count, a _sum no less than 0."""
    for name, samples in families.items():
        if not name.endswith("_seconds") or not any(s.name == f"{name}_bucket" for s in samples):
            continue
        for job in {s.labels["job"] for s in samples}:
            buckets = [s for s in samples if s.name == f"{name}_bucket" and s.labels["job"] == job]
            assert buckets[-1].labels["le"] == "+Inf", (name, job)
            counts = [s.value for s in buckets]
            assert counts == sorted(counts), (name, job, counts)
            assert values(samples, f"{name}_count", job=job) == [counts[-1]], (name, job)
            assert values(samples, f"{name}_sum", job=job)[0] >= 0, (name, job)


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_lateness_leaves_out_reruns_of_an_older_runs_logical_time(client, make_job):
    """Rerunning last week's run is not a late start: it must not push the
    job's lateness histogram (and a lateness alert) to a week."""
    job = make_job(name="weekly-export", command="true")
    now = timezone.now()
    week_ago = now - timedelta(days=7)
    old = Run.objects.create(
        job=job,
        status=Run.Status.FAILED,
        trigger=Run.Trigger.SCHEDULE,
        scheduled_for=week_ago,
        queued_at=week_ago,
        started_at=week_ago + timedelta(seconds=1),
        finished_at=week_ago + timedelta(seconds=30),
    )
    services.run_create(job=job, trigger=Run.Trigger.MANUAL)  # an on-time start...
    on_time = Run.objects.filter(job=job, trigger=Run.Trigger.MANUAL).get()
    assert services.run_claim(run_id=on_time.pk, worker="host:1") is not None
    services.run_execute(Run.objects.get(pk=on_time.pk), **quiet)
    rerun = services.run_rerun(run=old, by=None)  # ...and last week's, again
    assert services.run_claim(run_id=rerun.pk, worker="host:1") is not None
    services.run_execute(Run.objects.get(pk=rerun.pk), **quiet)
    assert Run.objects.get(pk=rerun.pk).status == Run.Status.SUCCEEDED

    families = scrape(client)

    lateness = families["jobsite_run_lateness_seconds"]
    assert values(lateness, "jobsite_run_lateness_seconds_count", job="weekly-export") == [1]
    assert values(lateness, "jobsite_run_lateness_seconds_sum", job="weekly-export")[0] < 60
    assert values(
        lateness, "jobsite_run_lateness_seconds_bucket", job="weekly-export", le="60.0"
    ) == [1]
    # Both runs ran in the last day: both count for the duration.
    duration = families["jobsite_run_duration_seconds"]
    assert values(duration, "jobsite_run_duration_seconds_count", job="weekly-export") == [2]
    assert_histograms_consistent(families)


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_stay_parseable_with_quotes_backslashes_newlines_and_unicode_in_jobs(client, db):
    """Names (and slugs, which the API and a shell can set past the form's
    validation) that would break a hand-written exposition."""
    nasty = 'ex"port\\ nächtlich\n} 1 # 🚀'
    job = Job.objects.create(name=nasty, slug=nasty, command="true", timeout=30)
    now = timezone.now()
    for seconds in (0.5, 7, 4000):
        make_run(
            job,
            Run.Status.SUCCEEDED,
            started_at=now - timedelta(seconds=seconds),
            finished_at=now,
        )

    families = scrape(client)

    assert values(families["jobsite_runs_queued"], "jobsite_runs_queued", job=nasty) == [0]
    duration = families["jobsite_run_duration_seconds"]
    assert [
        s.value
        for s in duration
        if s.name == "jobsite_run_duration_seconds_bucket" and s.labels["job"] == nasty
    ] == [1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3]
    assert_histograms_consistent(families)


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_say_no_worker_runs_and_how_many_tasks_wait(client, fresh_cache, make_job):
    """No cluster: jobsite_workers is 0 (the alert), and the run handed to
    django-q2's broker waits there."""
    services.run_create(job=make_job(), trigger=Run.Trigger.MANUAL)

    families = scrape(client)

    assert values(families["jobsite_workers"], "jobsite_workers") == [0]
    assert values(families["jobsite_broker_queue_depth"], "jobsite_broker_queue_depth") == [1]


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_run_totals_do_not_sum_every_day_of_history_on_each_scrape(
    client, fresh_cache, make_job
):
    """Years of daily rollups are summed once a day, not on every scrape
    (every 15 s); the totals stay exact, today's runs included."""
    job = make_job(name="long-lived", command="true")
    today = timezone.localdate()
    JobDailyStats.objects.bulk_create(
        JobDailyStats(job=job, day=today - timedelta(days=n), succeeded=10, failed=1)
        for n in range(1, 400)
    )
    first = scrape(client)["jobsite_runs"]
    services.run_foreground(job=job, **quiet)

    with CaptureQueriesContext(connection) as captured:
        second = scrape(client)["jobsite_runs"]

    total = "jobsite_runs_total"
    assert values(first, total, job="long-lived", status="succeeded") == [3990]
    assert values(second, total, job="long-lived", status="succeeded") == [3991]
    assert values(second, total, job="long-lived", status="failed") == [399]
    rollup_table = JobDailyStats._meta.db_table
    rollup_reads = [q["sql"] for q in captured if rollup_table in q["sql"]]
    assert rollup_reads and all(str(today) in sql for sql in rollup_reads), rollup_reads


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_run_totals_carry_over_midnight(client, fresh_cache, make_job):
    job = make_job(name="nightly", command="true")
    with time_machine.travel(timezone.localtime().replace(hour=23, minute=59), tick=False):
        services.run_foreground(job=job, **quiet)
        before = scrape(client)["jobsite_runs"]
    with time_machine.travel(
        timezone.localtime().replace(hour=23, minute=59) + timedelta(minutes=2)
    ):
        after_midnight = scrape(client)["jobsite_runs"]
        services.run_foreground(job=job, **quiet)
        later = scrape(client)["jobsite_runs"]

    total = "jobsite_runs_total"
    assert values(before, total, job="nightly", status="succeeded") == [1]
    assert values(after_midnight, total, job="nightly", status="succeeded") == [1]
    assert values(later, total, job="nightly", status="succeeded") == [2]


def test_health_stays_json_when_counting_fails_after_the_database_answered(client, db, monkeypatch):
    """/health/ is read by machines: a query failing after SELECT 1 (a
    table locked, the server going away) must not turn it into an HTML 500."""
    from django.db import OperationalError

    from jobs import monitoring

    def broken():
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(monitoring, "counts", broken)
    response = client.get("/health/")

    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert body["counts"] is None and body["queue"] is None
    assert body["counts_error"] == "OperationalError"
    assert "server closed" not in response.content.decode()
