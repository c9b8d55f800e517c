"""manage.py runall: the web server, the django-q2 cluster and the scheduler in
the foreground, for `make run`. Ctrl-C stops all three."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time

from django.core.management.base import BaseCommand, CommandError

from jobs.execution import kill_group


class Command(BaseCommand):
    help = "Serve the dashboard (gunicorn), run the workers (qcluster) and the scheduler."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--bind", default=default_bind())
        parser.add_argument("--web-workers", type=int, default=2)

    def handle(self, *args, bind: str, web_workers: int, **options) -> None:
        check_port_free(bind)
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
        stop = {"signal": None, "count": 0}

        def request_stop(signum, _frame):
            stop["signal"] = signum
            stop["count"] += 1

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
        self.shutdown(children, again=lambda: stop["count"] > 1)
        sys.exit(exit_code)

    def shutdown(
        self,
        children: dict[str, subprocess.Popen],
        wait: float = 20.0,
        again=lambda: False,
    ) -> None:
        self.stdout.write("Stopping web, workers and scheduler…")
        for proc in children.values():
            if proc.poll() is None:
                proc.terminate()
        started = time.monotonic()
        said = False
        while time.monotonic() < started + wait and not again():
            if all(proc.poll() is not None for proc in children.values()):
                break
            if not said and time.monotonic() > started + 1:
                # The workers let a running job finish first: say so, or
                # Ctrl-C looks like it did nothing.
                self.stdout.write(
                    f"Waiting up to {wait:.0f}s for running jobs to finish; "
                    "press Ctrl-C again to stop them now."
                )
                said = True
            time.sleep(0.1)
        forced = again()
        for name, proc in children.items():
            if proc.poll() is None:
                self.stderr.write(
                    f"Killing {name} now (a second Ctrl-C): its running jobs are killed "
                    "and show as lost once the lease runs out."
                    if forced
                    else f"{name} did not stop in {wait:.0f}s; killing it and its running jobs."
                )
                kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
        self.stdout.write("Stopped.")


def default_bind() -> str:
    """BIND, else 127.0.0.1:PORT (PORT as in the Procfile; 8000 by default)."""
    return os.environ.get("BIND") or f"127.0.0.1:{os.environ.get('PORT') or 8000}"


def check_port_free(bind: str) -> None:
    """Fail before starting anything when the web server could not listen:
    gunicorn would retry for five seconds and exit, after the workers and
    the clock had started."""
    if bind.startswith(("unix:", "fd://")):
        return
    host, _, port = bind.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        number = int(port)
    except ValueError as exc:
        raise CommandError(f'--bind "{bind}" is not HOST:PORT.') from exc
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, number))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise CommandError(f"Cannot listen on {bind}: {exc.strerror}.") from exc
            raise CommandError(
                f"Port {number} on {host} is already in use (another Jobsite, or another "
                f"server). Stop it, or use another port: PORT={number + 1} make run"
            ) from exc
