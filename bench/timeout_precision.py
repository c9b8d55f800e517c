#!/usr/bin/env python
"""Timeout precision: a job that ignores SIGTERM and forks children.

The job (`trap '' TERM`, three backgrounded subshells that also ignore
SIGTERM, each running `sleep`, and a `sleep` of its own) runs through
services.run_foreground with a timeout of 5 s. A watcher thread scans /proc
every 10 ms for the job's processes (their command lines carry a nonce) and
records when the first appears and when the last is gone (zombies waiting
for a reaper do not count). Reports, min/median/max over the repeats: start
-> whole tree gone, against the target timeout + grace + 1 s; and when
run_foreground returned.

    .venv/bin/python bench/timeout_precision.py                  # 5 s timeout, 3 repeats
    .venv/bin/python bench/timeout_precision.py --timeout 1 --grace 1 --repeat 1

--grace sets JOBSITE_KILL_GRACE for this process (default: the setting, 5 s).
The database named in --database-url is dropped and created again.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
from bench.log_flood import machine_line, spread  # noqa: E402
from bench.retention import recreate_database, setup_django  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=int, default=5)
    parser.add_argument("--grace", type=int, default=None, help="JOBSITE_KILL_GRACE (s)")
    parser.add_argument("--children", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", default="sqlite:////tmp/bench3-timeout.sqlite3")
    return parser.parse_args(argv)


def command(marker: str, children: int) -> str:
    # `sleep 1000.<digits>`: a normal sleep whose argument marks this run.
    return (
        f"trap '' TERM; for i in $(seq {children}); do (trap '' TERM; sleep {marker}) & done; "
        f"sleep {marker}"
    )


def alive_with(marker: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains marker."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append(int(entry))
    return found


class Watcher(threading.Thread):
    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker = marker
        self.first_seen: float | None = None
        self.gone: float | None = None
        self.most = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            pids = alive_with(self.marker)
            self.most = max(self.most, len(pids))
            if pids and self.first_seen is None:
                self.first_seen = now
            if self.first_seen is not None:
                if pids:
                    self.gone = None
                elif self.gone is None:
                    self.gone = now
            time.sleep(0.01)


def one_run(timeout: int, children: int) -> dict:
    from jobs import services
    from jobs.models import Job, Run

    marker = f"1000.{uuid.uuid4().int % 10**9}"
    job = Job.objects.create(
        name=f"stubborn-{marker}",
        slug=f"stubborn-{marker.replace('.', '-')}",
        command=command(marker, children),
        timeout=timeout,
    )
    watcher = Watcher(marker)
    watcher.start()
    called = time.monotonic()
    run = services.run_foreground(job=job, echo=lambda text: None)
    returned = time.monotonic()
    deadline = returned + 30
    while watcher.gone is None and time.monotonic() < deadline:
        time.sleep(0.01)
    watcher.stop.set()
    watcher.join()
    leftovers = alive_with(marker)
    return {
        "status": run.status,
        "expected_status": Run.Status.TIMED_OUT,
        "processes": watcher.most,
        "tree_gone": (watcher.gone or float("nan")) - (watcher.first_seen or called),
        "returned": returned - (watcher.first_seen or called),
        "from_call": (watcher.gone or float("nan")) - called,
        "leftovers": leftovers,
    }


def main() -> None:
    args = parse_args()
    if args.grace is not None:
        os.environ["JOBSITE_KILL_GRACE"] = str(args.grace)
    load_start = os.getloadavg()
    recreate_database(args.database_url)
    setup_django(args.database_url)
    from django.conf import settings
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    grace = settings.JOBSITE_KILL_GRACE
    target = args.timeout + grace + 1
    results = []
    for i in range(args.repeat):
        r = one_run(args.timeout, args.children)
        results.append(r)
        print(
            f"  repeat {i + 1}: {r['status']}, {r['processes']} processes, tree gone after "
            f"{r['tree_gone']:.2f}s, run_foreground returned after {r['returned']:.2f}s",
            flush=True,
        )
    load_end = os.getloadavg()
    print()
    print(
        f"Timeout precision: timeout {args.timeout}s, grace {grace}s, job ignores SIGTERM "
        f"and forks {args.children} children; {args.repeat} repeats   [{machine_line()}]"
    )
    print(f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f}")
    rows = [
        ("figure", "min / median / max", "target"),
        (
            "start -> whole tree gone (s)",
            spread([r["tree_gone"] for r in results], ".2f"),
            f"<= {target}",
        ),
        (
            "start -> run_foreground returned (s)",
            spread([r["returned"] for r in results], ".2f"),
            "",
        ),
        (
            "over timeout + grace (s)",
            spread([r["tree_gone"] - args.timeout - grace for r in results], ".2f"),
            "<= 1",
        ),
        ("processes in the tree", spread([r["processes"] for r in results], ".0f"), ""),
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    ok = all(
        r["status"] == r["expected_status"] and not r["leftovers"] and r["processes"] > 1
        for r in results
    )
    print("checks (timed out, nothing left, tree seen):", "OK" if ok else "FAILED")
    print(
        "within target:",
        "yes" if all(r["tree_gone"] <= target for r in results) else "NO",
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
