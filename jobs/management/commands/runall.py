"""manage.py runall: the web server, the django-q2 cluster and the scheduler in
the foreground, for `make run`. Ctrl-C stops all three."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from django.core.management.base import BaseCommand

from jobs.execution import kill_group


class Command(BaseCommand):
    help = "Serve the dashboard (gunicorn), run the workers (qcluster) and the scheduler."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--bind", default=os.environ.get("BIND", "127.0.0.1:8000"))
        parser.add_argument("--web-workers", type=int, default=2)

    def handle(self, *args, bind: str, web_workers: int, **options) -> None:
        python = sys.executable
        manage = os.path.abspath(sys.argv[0])
        gunicorn = os.path.join(os.path.dirname(python), "gunicorn")
        commands = {
            "web": [
                gunicorn,
                "jobsite.wsgi",
                "--bind",
                bind,
                "--workers",
                str(web_workers),
                "--access-logfile",
                "-",
                "--graceful-timeout",
                "5",
            ],
            "workers": [python, manage, "qcluster"],
            "scheduler": [python, manage, "scheduler"],
        }
        stop = {"signal": None}

        def request_stop(signum, _frame):
            stop["signal"] = signum

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        # Own sessions: Ctrl-C reaches only us, and we stop each child the
        # way it wants (SIGTERM to django-q2's main process only: a signal
        # to its whole group can hang it).
        children = {
            name: subprocess.Popen(argv, start_new_session=True) for name, argv in commands.items()
        }
        self.stdout.write(f"Jobsite is running on http://{bind}/ - press Ctrl-C to stop.")
        exit_code = 0
        while stop["signal"] is None:
            time.sleep(0.5)
            dead = [name for name, proc in children.items() if proc.poll() is not None]
            if dead:
                self.stderr.write(f"{', '.join(dead)} exited; stopping the others.")
                exit_code = 1
                break
        self.shutdown(children)
        sys.exit(exit_code)

    def shutdown(self, children: dict[str, subprocess.Popen], wait: float = 20.0) -> None:
        self.stdout.write("Stopping web, workers and scheduler…")
        for proc in children.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + wait
        for name, proc in children.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stderr.write(f"{name} did not stop in {wait:.0f}s; killing it.")
                kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
        self.stdout.write("Stopped.")
