"""Jobsite settings: everything comes from the environment (django-environ).

The defaults make the embedded set-up work with no environment at all:
SQLite in WAL mode, django-q2's ORM broker, a database cache shared by the
web, the scheduler and the workers.
"""

from __future__ import annotations

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="jobsite-insecure-development-key-change-me")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# PORT: the port `make run` (and the Procfile) serves on.
SITE_URL = env.str(
    "SITE_URL", default=f"http://127.0.0.1:{env.str('PORT', default='') or 8000}"
).rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_q",
    "jobs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "jobsite.urls"
WSGI_APPLICATION = "jobsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
}
_default_db = DATABASES["default"]
if _default_db["ENGINE"] == "django.db.backends.sqlite3":
    # django-q2 loses 25-32% of results under 8 workers with SQLite's defaults
    # ("database is locked" inside the result-pruning transaction). WAL plus
    # IMMEDIATE transactions plus a busy timeout lost none (DESIGN.md).
    # Django's backend, but a transaction waits for the write lock by
    # polling, not by SQLite's ever longer sleeps (jobsite/db/sqlite3).
    _default_db["ENGINE"] = "jobsite.db.sqlite3"
    _default_db["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": env.int("SQLITE_TIMEOUT", default=20),
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A file, not :memory:, so the worker and scheduler processes the tests
    # start can see the test database.
    _default_db["TEST"] = {
        "NAME": env.str("JOBSITE_TEST_DB", default=str(BASE_DIR / ".test-db.sqlite3"))
    }
# The ORM broker polls constantly: reconnecting on every poll cut throughput
# from 227 to 39 tasks/s on PostgreSQL (DESIGN.md). On SQLite a connection is
# a file open plus Django's set-up (PRAGMAs, ~30 SQL functions): 1.5 ms of CPU
# that a worker paid for every run, as django-q2 closes old connections
# after each task.
_default_db["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=600)
_default_db["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache: shared, so the dashboard sees django-q2's cluster status --------

REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "jobsite_cache",
        }
    }

# --- Jobs -----------------------------------------------------------------

# The longest timeout a job may have; django-q2's own timeout and retry are
# derived from it so django-q2 never kills or redelivers a run we still own.
JOBSITE_MAX_TIMEOUT = env.int("JOBSITE_MAX_TIMEOUT", default=6 * 3600)
JOBSITE_DEFAULT_TIMEOUT = env.int("JOBSITE_DEFAULT_TIMEOUT", default=3600)
# Seconds between SIGTERM and SIGKILL when a run times out or is cancelled.
JOBSITE_KILL_GRACE = env.int("JOBSITE_KILL_GRACE", default=5)
# Per-run log cap: the first HEAD bytes and the last TAIL bytes are kept.
JOBSITE_LOG_HEAD_BYTES = env.int("JOBSITE_LOG_HEAD_BYTES", default=256 * 1024)
JOBSITE_LOG_TAIL_BYTES = env.int("JOBSITE_LOG_TAIL_BYTES", default=768 * 1024)
# Output is flushed to the database at least this often / this much.
JOBSITE_LOG_FLUSH_SECONDS = env.float("JOBSITE_LOG_FLUSH_SECONDS", default=1.0)
JOBSITE_LOG_FLUSH_BYTES = env.int("JOBSITE_LOG_FLUSH_BYTES", default=64 * 1024)
JOBSITE_HEARTBEAT_SECONDS = env.float("JOBSITE_HEARTBEAT_SECONDS", default=5.0)
# A running run's lease: no heartbeat for this long and the sweeper marks it lost.
JOBSITE_LEASE_SECONDS = env.int("JOBSITE_LEASE_SECONDS", default=60)
# A queued run sent to the workers this long ago but never claimed is sent
# again (a broker lost it); after JOBSITE_MAX_DELIVERIES tries it is lost.
JOBSITE_REQUEUE_SECONDS = env.int("JOBSITE_REQUEUE_SECONDS", default=300)
JOBSITE_MAX_DELIVERIES = env.int("JOBSITE_MAX_DELIVERIES", default=5)
JOBSITE_SWEEP_SECONDS = env.float("JOBSITE_SWEEP_SECONDS", default=5.0)
# A fire older than this when the scheduler gets to it was missed (no
# scheduler was running); the job's catch-up policy decides what happens.
JOBSITE_MISFIRE_GRACE = env.int("JOBSITE_MISFIRE_GRACE", default=60)
JOBSITE_CATCHUP_MAX = env.int("JOBSITE_CATCHUP_MAX", default=100)
# Python jobs import their callables with these on sys.path (after the
# project's own directory), e.g. "/srv/myteam".
JOBSITE_PYTHONPATH = env.list("JOBSITE_PYTHONPATH", default=[])
# Where runs get their scratch directory ($JOBSITE_ARTIFACTS_DIR lives there).
JOBSITE_WORK_DIR = env.str("JOBSITE_WORK_DIR", default="") or None
MEDIA_ROOT = env.str("MEDIA_ROOT", default=str(BASE_DIR / "media"))
MEDIA_URL = "media/"

# Daily prune of old runs: when (HH:MM in TIME_ZONE; empty = no built-in
# prune) and how many days of finished runs to keep (daily rollups stay).
JOBSITE_PRUNE_TIME = env.str("JOBSITE_PRUNE_TIME", default="03:30")
JOBSITE_RETENTION_DAYS = env.int("JOBSITE_RETENTION_DAYS", default=90)

# --- Being told: alerts, digests, health, metrics -----------------------------
# A global webhook for every alert (in addition to each job's own), JSON POST
# with a Slack-compatible "text" field.
JOBSITE_WEBHOOK_URL = env.str("JOBSITE_WEBHOOK_URL", default="")
JOBSITE_WEBHOOK_TIMEOUT = env.float("JOBSITE_WEBHOOK_TIMEOUT", default=5.0)
JOBSITE_WEBHOOK_TRIES = env.int("JOBSITE_WEBHOOK_TRIES", default=3)
# The daily digest: when (HH:MM in TIME_ZONE; empty = no built-in digest),
# and whether to send "all good" when nothing happened.
JOBSITE_DIGEST_TIME = env.str("JOBSITE_DIGEST_TIME", default="08:00")
JOBSITE_DIGEST_SKIP_EMPTY = env.bool("JOBSITE_DIGEST_SKIP_EMPTY", default=False)
# /health/ says the scheduler is down when its last tick is older than this.
JOBSITE_SCHEDULER_STALE_SECONDS = env.int("JOBSITE_SCHEDULER_STALE_SECONDS", default=30)
# /metrics needs "Authorization: Bearer <token>" when set (else a login).
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
# The scheduler never sleeps longer than this, so edits take effect quickly.
JOBSITE_SCHEDULER_MAX_SLEEP = env.float("JOBSITE_SCHEDULER_MAX_SLEEP", default=1.0)

# --- django-q2 --------------------------------------------------------------

_q_timeout = JOBSITE_MAX_TIMEOUT + JOBSITE_KILL_GRACE + 60
Q_CLUSTER = {
    "name": env.str("Q_CLUSTER_NAME_PREFIX", default="jobsite"),
    "workers": env.int("Q_WORKERS", default=4),
    "recycle": env.int("Q_RECYCLE", default=500),
    # Jobsite enforces each job's timeout itself (process-group kill); this is
    # only the outer bound so a wedged worker is eventually replaced.
    "timeout": _q_timeout,
    # Must exceed the longest task plus its queue wait or the ORM broker
    # delivers it twice (the run claim would still make it harmless).
    "retry": _q_timeout + 600,
    "max_attempts": 1,
    "ack_failures": True,
    # Successful tasks are not kept: every run is recorded in jobs_run, and
    # keeping django-q2's copy pruned to N rows made its single monitor
    # process read N rows under a write lock for every task (13 ms of CPU per
    # run with N=250; on SQLite every worker waited on it). Failed tasks are
    # still kept. Q_SAVE_LIMIT=250 restores django-q2's default.
    "save_limit": env.int("Q_SAVE_LIMIT", default=-1),
    "catch_up": False,
    # Our own scheduler (manage.py scheduler) replaces django-q2's 30 s one.
    "scheduler": False,
    # How long the ORM broker's pusher sleeps when the queue is empty: the
    # wait before a new run reaches a worker. 0.2 s made the first runs of a
    # burst start 0.15-0.25 s late; 0.05 costs one indexed SELECT 20 times a
    # second while idle (docs/PERFORMANCE.md). Redis needs no polling.
    "poll": env.float("Q_POLL", default=0.05),
    "guard_cycle": 0.5,
    "label": "Task queue",
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"
    # Hands out up to `bulk` due tasks per turn at the database's write
    # lock, where django-q2's ORM broker takes one turn per task (jobs/broker.py).
    Q_CLUSTER["broker_class"] = "jobs.broker.BatchingOrmBroker"
    Q_CLUSTER["bulk"] = env.int("Q_BULK", default=10)

# --- Email ----------------------------------------------------------------

vars().update(env.email_url("EMAIL_URL", default="consolemail://"))
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="jobsite@localhost")
# Without a timeout a mail server that accepts and never answers blocks a worker.
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=30)

# --- Auth, i18n, static -------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "jobs-overview"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedStaticFilesStorage"
        )
    },
}
WHITENOISE_USE_FINDERS = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}
