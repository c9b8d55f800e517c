#!/usr/bin/env python
"""Pipe floor: how fast can anything read a job's flood of output here?

The log-flood target compares capture speed with the same command writing to
/dev/null. This script measures, for the same command as bench/log_flood.py
(`yes <100-byte line> | head -c SIZE`), in the same repeat:

  /dev/null        the command's output sent to /dev/null (the baseline);
  cat              piped into `cat > /dev/null`: a C reader that does nothing;
  python 64 KiB    piped into a bare Python loop of os.read(fd, 64 KiB) behind
                   a selector, as jobs/execution.py reads (nothing stored);
  python 1 MiB     the same with the pipe enlarged to 1 MiB (F_SETPIPE_SZ)
                   and 1 MiB reads.
  python splice    piped, and moved on to /dev/null by os.splice: the
                   reader wakes for every write but copies nothing into
                   Python (what skipping a flood's middle would cost).
  file             no pipe: the output goes to an anonymous temporary file
                   (in --file-dir), whose size is polled every 10 ms and
                   whose bytes are never read (the floor of capturing to
                   a file and tailing it).
  file + punch     the same, punching holes (fallocate PUNCH_HOLE) behind
                   every 10 ms, so the disk holds only the last moments.

Each is MB/s and its ratio to /dev/null, min/median/max over the repeats.

    .venv/bin/python bench/pipe_floor.py                 # 500 MB, 3 repeats
    .venv/bin/python bench/pipe_floor.py --size 5M --repeat 1
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.log_flood import LINE, parse_size  # noqa: E402


def flood_command(size: int) -> str:
    return f"yes '{LINE.rstrip()}' | head -c {size}"


def to_devnull(size: int) -> float:
    started = time.perf_counter()
    subprocess.run(["sh", "-c", f"{flood_command(size)} > /dev/null"], check=True)
    return time.perf_counter() - started


def to_cat(size: int) -> float:
    started = time.perf_counter()
    subprocess.run(["sh", "-c", f"{flood_command(size)} | cat > /dev/null"], check=True)
    return time.perf_counter() - started


def to_python(size: int, *, pipe_bytes: int | None) -> float:
    read_bytes = pipe_bytes or 65536
    started = time.perf_counter()
    proc = subprocess.Popen(["sh", "-c", flood_command(size)], stdout=subprocess.PIPE)
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    if pipe_bytes:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, pipe_bytes)
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    received, eof = 0, False
    while not eof:
        for _key in selector.select(0.2):
            for _ in range(16):
                try:
                    data = os.read(fd, read_bytes)
                except BlockingIOError:
                    break
                if not data:
                    eof = True
                    break
                received += len(data)
    selector.close()
    proc.stdout.close()
    proc.wait()
    if received != size:
        raise RuntimeError(f"read {received} bytes, expected {size}")
    return time.perf_counter() - started


def to_splice(size: int) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(["sh", "-c", flood_command(size)], stdout=subprocess.PIPE)
    fd = proc.stdout.fileno()
    sink = os.open(os.devnull, os.O_WRONLY)
    received = 0
    while moved := os.splice(fd, sink, 1 << 20):  # blocks until data or EOF
        received += moved
    os.close(sink)
    proc.stdout.close()
    proc.wait()
    if received != size:
        raise RuntimeError(f"moved {received} bytes, expected {size}")
    return time.perf_counter() - started


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def to_file(size: int, *, directory: str | None, punch: bool) -> float:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    with tempfile.TemporaryFile(dir=directory, buffering=0) as out:
        fd = out.fileno()
        started = time.perf_counter()
        proc = subprocess.Popen(["sh", "-c", flood_command(size)], stdout=fd)
        punched = 0
        while True:
            gone = proc.poll() is not None
            end = os.fstat(fd).st_size // 4096 * 4096
            if punch and end > punched:
                flags = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
                if libc.fallocate(fd, flags, punched, end - punched) != 0:
                    raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE) failed")
                punched = end
            if gone:
                break
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        if os.fstat(fd).st_size != size:
            raise RuntimeError(f"file holds {os.fstat(fd).st_size} bytes, expected {size}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=500 * 10**6, help="bytes: 500M")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--file-dir", help="where the file readers write (default: $TMPDIR)")
    args = parser.parse_args(argv)
    load_at_start = common.load_text()
    readers = {
        "/dev/null": to_devnull,
        "cat": to_cat,
        "python 64 KiB": lambda size: to_python(size, pipe_bytes=None),
        "python 1 MiB": lambda size: to_python(size, pipe_bytes=1024 * 1024),
        "python splice": to_splice,
        "file": lambda size: to_file(size, directory=args.file_dir, punch=False),
        "file + punch": lambda size: to_file(size, directory=args.file_dir, punch=True),
    }
    speeds: dict[str, list[float]] = {name: [] for name in readers}
    for repeat in range(1, args.repeat + 1):
        for name, reader in readers.items():
            speeds[name].append(args.size / reader(args.size) / 1e6)
        print(
            f"  repeat {repeat}: " + ", ".join(f"{n} {s[-1]:,.0f} MB/s" for n, s in speeds.items()),
            flush=True,
        )
    print()
    print("## Pipe floor")
    for line in common.machine_lines("none (pipes only)", load_at_start):
        print(line)
    print(f"workload  `{flood_command(args.size)}`, {args.repeat} repeat(s)")
    print()
    baseline = speeds["/dev/null"]
    rows = [
        [
            name,
            common.fmt_spread(values, 0),
            common.fmt_spread([100 * v / b for v, b in zip(values, baseline, strict=True)], 1),
        ]
        for name, values in speeds.items()
    ]
    print(common.table(["reader", "MB/s min / median / max", "% of /dev/null"], rows))


if __name__ == "__main__":
    main()
