#!/usr/bin/env python
"""Start lateness: how long after its scheduled minute a job really starts.

Jobsite (`manage.py scheduler` + `manage.py qcluster`) against django-q2's own
CRON scheduler (a second qcluster with its scheduler on, bench/baseline_settings.py)
on the same database, measured in the same run:

  (a) one job every minute (`date +%s.%N`, i.e. as trivial as `true` but it
      prints its own start time) for --minutes fires;
  (b) --burst-jobs jobs due in the same minute, each `date +%s.%N; sleep 0.05`,
      Q_WORKERS workers, for --burst-minutes minutes. Jobsite fires on even
      minutes and django-q2 on odd ones so the two bursts do not compete.

Two figures per system: when the run was started (Jobsite: Run.started_at, the
worker's claim; django-q2: the task function's first line), and when the job's
process itself started (the time it printed). Lateness = that − scheduled time.

    .venv/bin/python bench/lateness.py                       # 10 + 3 minutes, SQLite
    .venv/bin/python bench/lateness.py --database postgres
    .venv/bin/python bench/lateness.py --minutes 1 --burst-jobs 5 --burst-minutes 1 \\
        --first-fire-in 3                                    # smoke size, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

COMMAND_A = "date +%s.%N"
COMMAND_B = "date +%s.%N; sleep 0.05"
CRON_A = "* * * * *"
CRON_B_JOBSITE = "0-58/2 * * * *"  # even minutes
CRON_B_BASELINE = "1-59/2 * * * *"  # odd minutes
LEAD_SECONDS = 8  # a natural first fire closer than this is skipped (setting up)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--pg-url", default=common.DEFAULT_PG_URL, help="server for --database postgres"
    )
    parser.add_argument("--minutes", type=int, default=10, help="(a): fires of the one job")
    parser.add_argument("--burst-jobs", type=int, default=100, help="(b): jobs due together")
    parser.add_argument("--burst-minutes", type=int, default=3, help="(b): bursts per system")
    parser.add_argument("--workers", type=int, default=4, help="Q_WORKERS of each cluster")
    parser.add_argument(
        "--first-fire-in",
        type=float,
        default=0,
        help="make each phase's first fire this many seconds away instead of the "
        "next minute boundary (smoke tests); later fires follow the cron",
    )
    parser.add_argument("--out", help="directory for logs and the database (default bench/out/...)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_at_start = common.load_text()
    directory = common.out_dir("lateness", args.out)
    url = common.fresh_database(
        args.database, "jobsite_bench_lateness", directory=directory, pg_url=args.pg_url
    )
    env = common.child_env(url, Q_WORKERS=str(args.workers))
    print(f"lateness: {args.database} database, logs in {directory}", flush=True)
    common.migrate(env)
    common.setup_django(url)

    from bench.baseline_settings import BASELINE_CLUSTER

    results = directory / "baseline-starts.jsonl"
    results.touch()
    with common.Processes(directory) as procs:
        procs.start("qcluster-jobsite", "qcluster", env=env)
        procs.start("scheduler", "scheduler", env=env)
        procs.start(
            "qcluster-baseline",
            "qcluster",
            env=dict(env, DJANGO_SETTINGS_MODULE="bench.baseline_settings"),
        )
        phases = [
            ("a", 1, args.minutes, COMMAND_A, CRON_A, CRON_A),
            ("b", args.burst_jobs, args.burst_minutes, COMMAND_B, CRON_B_JOBSITE, CRON_B_BASELINE),
        ]
        measured = {}
        for phase, jobs, fires, command, cron_jobsite, cron_baseline in phases:
            if jobs < 1 or fires < 1:
                continue
            measured[phase] = run_phase(
                phase=phase,
                jobs=jobs,
                fires=fires,
                command=command,
                cron_jobsite=cron_jobsite,
                cron_baseline=cron_baseline,
                first_fire_in=args.first_fire_in,
                results=results,
                cluster=BASELINE_CLUSTER,
                procs=procs,
            )
    report(args, measured, load_at_start)


def first_fire(cron: str, *, lead: float, first_fire_in: float) -> datetime:
    from jobs import scheduling

    now = datetime.now(UTC)
    if first_fire_in:
        return (now + timedelta(seconds=first_fire_in)).replace(microsecond=0)
    return scheduling.next_fire_after(cron, "UTC", now + timedelta(seconds=lead))


def run_phase(
    *,
    phase: str,
    jobs: int,
    fires: int,
    command: str,
    cron_jobsite: str,
    cron_baseline: str,
    first_fire_in: float,
    results: Path,
    cluster: str,
    procs: common.Processes,
) -> dict[str, dict[str, list[list[float]]]]:
    """Set up both systems' jobs, wait for `fires` fires of each, tear down.
    Returns {system: {figure: [lateness per job, one list per fire]}}."""
    from django_q.models import Schedule

    from jobs.models import Job, Run

    jobsite_first = first_fire(cron_jobsite, lead=LEAD_SECONDS, first_fire_in=first_fire_in)
    baseline_first = first_fire(cron_baseline, lead=LEAD_SECONDS, first_fire_in=first_fire_in)
    names = [f"lateness-{phase}-{i:03d}" for i in range(jobs)]
    created = [
        Job(name=n, slug=n, command=command, schedule=cron_jobsite, timeout=60) for n in names
    ]
    Job.objects.bulk_create(created)
    ours = Job.objects.filter(slug__in=names)
    for job in ours:
        Job.objects.filter(pk=job.pk).update(
            next_fire_at=jobsite_first, fire_basis=job.current_fire_basis
        )
    for n in names:
        Schedule.objects.create(
            name=n,
            func="bench.common.q2_timed_command",
            kwargs=repr({"command": command, "out": str(results), "phase": phase}),
            schedule_type=Schedule.CRON,
            cron=cron_baseline,
            repeats=-1,
            cluster=cluster,
            intended_date_kwarg="intended",
        )
    # Schedule.save() recomputes a new CRON schedule's next_run from now.
    Schedule.objects.filter(name__in=names).update(next_run=baseline_first)
    print(
        f"({phase}) {jobs} job(s) x {fires} fire(s): Jobsite from {jobsite_first:%H:%M:%S}, "
        f"django-q2 from {baseline_first:%H:%M:%S} (UTC)",
        flush=True,
    )
    wanted = jobs * fires

    finished = Run.objects.filter(
        job__in=ours, trigger=Run.Trigger.SCHEDULE, status__in=Run.FINISHED
    )

    def jobsite_runs() -> list:
        return list(finished.order_by("scheduled_for"))

    def baseline_rows() -> list[dict]:
        rows = [json.loads(line) for line in results.read_text().splitlines() if line]
        return [r for r in rows if r["phase"] == phase]

    last = max(jobsite_first, baseline_first)
    # The last fire is (fires - 1) cron periods after the first (at most 2
    # minutes apart); django-q2 checks every 30 s and a burst takes a while.
    timeout = (last - datetime.now(UTC)).total_seconds() + fires * 120 + 120
    # Counted, not loaded: this process shares the 2 cores with the systems
    # it measures, and loading every finished run each second took CPU from
    # a burst's workers.
    common.wait_until(
        lambda: finished.count() >= wanted and len(baseline_rows()) >= wanted,
        timeout=timeout,
        interval=1.0,
        procs=procs,
        what=f"({phase}) {wanted} finished runs on each system",
    )
    ours.update(enabled=False)
    Schedule.objects.filter(name__in=names).update(repeats=0)
    return {
        "jobsite": jobsite_lateness(jobsite_runs(), fires),
        "django-q2": baseline_lateness(baseline_rows(), fires),
    }


def jobsite_lateness(runs: list, fires: int) -> dict[str, list[list[float]]]:
    from jobs import runlog

    by_fire: dict[datetime, list] = {}
    for run in runs:
        by_fire.setdefault(run.scheduled_for, []).append(run)
    started, process = [], []
    for at in sorted(by_fire)[:fires]:
        group = by_fire[at]
        failed = [f"#{r.pk} {r.status} {r.error_summary}" for r in group if r.status != "succeeded"]
        if failed:
            print(f"  not succeeded at {at:%H:%M:%S}: {failed[:5]}", flush=True)
        ok = [r for r in group if r.status == "succeeded"]
        started.append([(r.started_at - at).total_seconds() for r in ok])
        process.append([child_time(runlog.read_log(r)) - at.timestamp() for r in ok])
    return {"run started": started, "process started": process}


def child_time(log_text: str) -> float:
    return float(log_text.strip().splitlines()[0])


def baseline_lateness(rows: list[dict], fires: int) -> dict[str, list[list[float]]]:
    by_fire: dict[str, list[dict]] = {}
    for row in rows:
        by_fire.setdefault(row["intended"], []).append(row)
    started, process = [], []
    for intended in sorted(by_fire, key=datetime.fromisoformat)[:fires]:
        at = datetime.fromisoformat(intended).timestamp()
        started.append([r["started"] - at for r in by_fire[intended]])
        process.append([r["child"] - at for r in by_fire[intended] if r["child"] is not None])
    return {"run started": started, "process started": process}


def report(args: argparse.Namespace, measured: dict, load_at_start: str) -> None:
    print()
    print("## Start lateness")
    for line in common.machine_lines(common.database_text(), load_at_start):
        print(line)
    print(
        f"workload  (a) 1 job `{COMMAND_A}` every minute, {args.minutes} fire(s); "
        f"(b) {args.burst_jobs} jobs `{COMMAND_B}` due in the same minute, "
        f"{args.burst_minutes} burst(s); Q_WORKERS={args.workers} per cluster"
        + (f"; first fire {args.first_fire_in:g} s after setup" if args.first_fire_in else "")
    )
    print("          lateness in seconds = start - scheduled time (same clock)")
    print()
    for phase, figures in measured.items():
        print(phase_table(phase, figures, target=1.0 if phase == "a" else 2.0))
        print()


def phase_table(phase: str, figures: dict, *, target: float) -> str:
    """Pooled p50/p99/max per system and figure; for bursts also the per-burst
    p99 as min/median/max over bursts; ratio = django-q2 / Jobsite (p99)."""
    rows = []
    pooled: dict[tuple[str, str], list[float]] = {}
    for system in ("jobsite", "django-q2"):
        for figure, per_fire in figures[system].items():
            values = [v for group in per_fire for v in group]
            pooled[(system, figure)] = values
            per_fire_p99 = [common.percentile(g, 99) for g in per_fire if g]
            rows.append(
                [
                    "Jobsite" if system == "jobsite" else "django-q2 CRON",
                    figure,
                    str(len(per_fire)),
                    str(len(values)),
                    common.fmt(common.percentile(values, 50)),
                    common.fmt(common.percentile(values, 99)),
                    common.fmt(max(values) if values else float("nan")),
                    common.fmt_spread(per_fire_p99),
                ]
            )
    for figure in ("run started", "process started"):
        ours = common.percentile(pooled[("jobsite", figure)], 99)
        theirs = common.percentile(pooled[("django-q2", figure)], 99)
        ratio = theirs / ours if ours > 0 else float("nan")
        rows.append(
            [
                "ratio",
                f"{figure}: django-q2 p99 / Jobsite p99",
                "",
                "",
                "",
                common.fmt(ratio, 1),
                "",
                "",
            ]
        )
    ours_p99 = common.percentile(pooled[("jobsite", "process started")], 99)
    verdict = "met" if ours_p99 <= target else "MISSED"
    title = (
        f"({phase}) {'one job every minute' if phase == 'a' else 'jobs due in the same minute'}"
        f" - target Jobsite process-start p99 <= {target:g} s: {verdict}"
    )
    header = [
        "system",
        "figure",
        "fires",
        "n",
        "p50 s",
        "p99 s",
        "max s",
        "p99 per fire min/med/max",
    ]
    return title + "\n" + common.table(header, rows)


if __name__ == "__main__":
    main()
