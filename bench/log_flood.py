#!/usr/bin/env python
"""Log flood benchmark: a job printing 1 GB, run through the real worker path.

A child Python process (the "worker") runs the job as tasks.execute_run does:
services.run_create / run_claim / run_execute (run_foreground's path without
its terminal echo): run_process reads the pipe, RunLogWriter stores the head
and tail in the database. This script samples the worker's VmRSS from
/proc every 10 ms and reports, for each figure min/median/max over the
repeats:

- worker RSS growth: peak during the run minus RSS just before it (after a
  warm-up run, so imports are not counted) — target <= 50 MB;
- capture speed: bytes/s through Jobsite vs the same command with its
  output sent to /dev/null, same run — target >= 50%; and, to separate
  reading the pipe from storing the log, execution.run_process alone with
  the output thrown away;
- stored log bytes <= JOBSITE_LOG_HEAD_BYTES + JOBSITE_LOG_TAIL_BYTES, and
  the stored head and tail equal, byte for byte, the first and last bytes
  printed (first line "FIRST <nonce>", last line "LAST <nonce>").

    .venv/bin/python bench/log_flood.py                # 1 GB, 3 repeats, SQLite
    .venv/bin/python bench/log_flood.py --size 20M --repeat 1
    .venv/bin/python bench/log_flood.py --database-url postgres://postgres@127.0.0.1:5432/bench3h

The database named in --database-url is dropped and created again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
from bench import retention  # noqa: E402
from bench.retention import recreate_database, setup_django  # noqa: E402

LINE = "x" * 99 + "\n"  # 100 bytes


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)B?", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"size like 1G, 200M or 65536, not {text!r}")
    factor = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match.group(2)]
    return int(float(match.group(1)) * factor)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=10**9, help="bytes printed: 1G")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", default="sqlite:////tmp/bench3-flood.sqlite3")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nonce", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def command(size: int, nonce: str) -> str:
    """FIRST line, `size` bytes of 100-byte lines, LAST line."""
    body = size - size % len(LINE)
    return (
        f"printf 'FIRST %s\\n' {nonce}; yes '{LINE.rstrip()}' | head -c {body}; "
        f"printf 'LAST %s\\n' {nonce}"
    )


def expected_head(size: int, nonce: str, length: int) -> str:
    """The first `length` characters printed (when that is less than everything)."""
    first = f"FIRST {nonce}\n"
    return (first + LINE * (length // len(LINE) + 1))[:length]


def expected_tail(size: int, nonce: str, length: int) -> str:
    """The last `length` characters printed (when that is less than everything).
    The body is whole 100-byte lines, so its suffix is a suffix of LINE * m."""
    last = f"LAST {nonce}\n"
    body = max(0, length - len(last))
    return ((LINE * (body // len(LINE) + 1))[len(LINE) * (body // len(LINE) + 1) - body :] + last)[
        -length:
    ]


def expected_all(size: int, nonce: str) -> str:
    return f"FIRST {nonce}\n" + LINE * (size // len(LINE)) + f"LAST {nonce}\n"


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# --- The worker -----------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    setup_django(args.database_url)
    from jobs import execution, services
    from jobs.models import Job, Run

    def quiet(text: str) -> None:
        """A worker has no terminal: run_execute's echo is None there."""

    warm = Job.objects.create(
        name=f"warm-{args.nonce}", slug=f"warm-{args.nonce}", command="echo w"
    )
    services.run_foreground(job=warm, echo=quiet)  # imports and first queries
    job = Job.objects.create(
        name=f"flood-{args.nonce}",
        slug=f"flood-{args.nonce}",
        command=command(args.size, args.nonce),
        timeout=3600,
    )
    # The floor: the same reads by run_process, output thrown away (no RunLogWriter).
    began = time.monotonic()
    execution.run_process(
        ["/bin/sh", "-c", job.command],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        timeout=3600,
        kill_grace=5,
        on_start=lambda pgid: None,
        on_output=lambda data: None,
        on_tick=lambda: False,
    )
    pipe_floor = time.monotonic() - began
    print(json.dumps({"ready": rss_kb(os.getpid())}), flush=True)
    began = time.monotonic()
    # What a django-q2 worker does (tasks.execute_run): no echo. run_foreground
    # would echo every byte to a terminal (manage.py runjob).
    queued = services.run_create(job=job, trigger=Run.Trigger.MANUAL, here=True)
    run = services.run_execute(services.run_claim(run_id=queued.pk, worker="bench"))
    elapsed = time.monotonic() - began
    print(
        json.dumps(
            {
                "run": run.pk,
                "status": run.status,
                "elapsed": elapsed,
                "pipe_floor": pipe_floor,
                "hwm": rss_kb(os.getpid(), "VmHWM"),
            }
        ),
        flush=True,
    )


# --- The measurement ------------------------------------------------------------------


def baseline(size: int, nonce: str) -> float:
    began = time.monotonic()
    subprocess.run(["/bin/sh", "-c", f"{{ {command(size, nonce)}; }} > /dev/null"], check=True)
    return time.monotonic() - began


def measured_run(args: argparse.Namespace, nonce: str) -> dict:
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--child",
            "--database-url",
            args.database_url,
            "--size",
            str(args.size),
            "--nonce",
            nonce,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=BASE_DIR,
    )
    ready = json.loads(proc.stdout.readline())
    peak = [ready["ready"]]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], rss_kb(proc.pid))
            except (OSError, ValueError):
                return
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = json.loads(proc.stdout.readline())
    done.set()
    sampler.join()
    proc.wait()
    result["rss_before_kb"] = ready["ready"]
    result["growth_mb"] = (peak[0] - ready["ready"]) / 1024
    result["hwm_growth_mb"] = (result["hwm"] - ready["ready"]) / 1024
    return result


def check_log(run_id: int, size: int, nonce: str) -> dict:
    from django.conf import settings

    from jobs.models import Run, RunLogChunk

    run = Run.objects.get(pk=run_id)
    chunks = list(RunLogChunk.objects.filter(run=run).order_by("seq"))
    head = "".join(c.data for c in chunks if c.is_head)
    tail = "".join(c.data for c in chunks if not c.is_head)
    stored = sum(c.size for c in chunks)
    printed = len(f"FIRST {nonce}\n") + size - size % len(LINE) + len(f"LAST {nonce}\n")
    cap = settings.JOBSITE_LOG_HEAD_BYTES + settings.JOBSITE_LOG_TAIL_BYTES
    if run.log_dropped_bytes == 0:  # small: everything was stored
        head_ok = tail_ok = head + tail == expected_all(size, nonce)
    else:
        head_ok = head == expected_head(size, nonce, len(head))
        tail_ok = tail == expected_tail(size, nonce, len(tail))
    lines = (head + tail).splitlines()
    head_ok = head_ok and lines[0] == f"FIRST {nonce}"
    tail_ok = tail_ok and lines[-1] == f"LAST {nonce}"
    return {
        "stored": stored,
        "cap": cap,
        "printed": printed,
        "log_bytes": run.log_bytes,
        "accounted": stored + run.log_dropped_bytes == printed == run.log_bytes,
        "head_ok": head_ok,
        "tail_ok": tail_ok,
        "status": run.status,
    }


def spread(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def machine_line() -> str:
    from django.db import connection

    return retention.machine_line(connection)


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    load_start = os.getloadavg()
    recreate_database(args.database_url)
    setup_django(args.database_url)
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    connection.close()
    results = []
    for i in range(args.repeat):
        nonce = uuid.uuid4().hex[:12]
        base = baseline(args.size, nonce)
        run = measured_run(args, nonce)
        log = check_log(run["run"], args.size, nonce)
        connection.close()
        results.append({"baseline": base, **run, **log})
        print(
            f"  repeat {i + 1}: {run['elapsed']:.2f}s (baseline {base:.2f}s), "
            f"RSS +{run['growth_mb']:.1f} MB, stored {log['stored']:,} B, "
            f"head {'ok' if log['head_ok'] else 'WRONG'}, "
            f"tail {'ok' if log['tail_ok'] else 'WRONG'}",
            flush=True,
        )
    load_end = os.getloadavg()
    printed = results[0]["printed"]
    mbps = [r["printed"] / r["elapsed"] / 1e6 for r in results]
    base_mbps = [r["printed"] / r["baseline"] / 1e6 for r in results]
    ratio = [r["baseline"] / r["elapsed"] * 100 for r in results]
    growth = [r["growth_mb"] for r in results]
    checks = all(
        r["head_ok"] and r["tail_ok"] and r["accounted"] and r["stored"] <= r["cap"]
        for r in results
    )
    checks = checks and all(r["status"] == "succeeded" for r in results)
    print()
    print(f"Log flood: {printed:,} bytes printed, {args.repeat} repeats   [{machine_line()}]")
    print(
        f"log cap {settings.JOBSITE_LOG_HEAD_BYTES:,} head + {settings.JOBSITE_LOG_TAIL_BYTES:,}"
        f" tail; flush every {settings.JOBSITE_LOG_FLUSH_SECONDS}s / "
        f"{settings.JOBSITE_LOG_FLUSH_BYTES:,} B"
    )
    print(f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f}")
    rows = [
        ("figure", "min / median / max", "target"),
        ("worker RSS growth (MB)", spread(growth, ".1f"), "<= 50"),
        ("capture time (s)", spread([r["elapsed"] for r in results], ".2f"), ""),
        ("capture speed (MB/s)", spread(mbps, ",.0f"), ""),
        ("baseline > /dev/null (MB/s)", spread(base_mbps, ",.0f"), ""),
        (
            "run_process, output discarded (MB/s)",
            spread([r["printed"] / r["pipe_floor"] / 1e6 for r in results], ",.0f"),
            "",
        ),
        ("capture / baseline (%)", spread(ratio, ".1f"), ">= 50"),
        (
            "stored log bytes",
            spread([r["stored"] for r in results], ",.0f"),
            f"<= {results[0]['cap']:,}",
        ),
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(
        "checks (head and tail intact, bytes accounted, stored <= cap, succeeded):",
        "OK" if checks else "FAILED",
    )
    sys.exit(0 if checks else 1)


if __name__ == "__main__":
    main()
