"""Run a Python job's callable in this (child) process.

    python -m jobs.runners.python_job DOTTED.PATH '{"kwarg": 1}'

print(), logging and warnings go to stdout (the run log); an exception
prints its traceback and exits 1, so its last line is the error summary.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import traceback
import warnings


def main(argv: list[str]) -> int:
    path, kwargs = argv[1], json.loads(argv[2]) if len(argv) > 2 else {}
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    module_name, _, name = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), name)
    except Exception:
        traceback.print_exc()
        print(f"ImportError: cannot import {path}", file=sys.stderr)
        return 2
    try:
        result = target(**kwargs)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    if result is not None:
        print(f"returned {result!r}")
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    sys.exit(main(sys.argv))
