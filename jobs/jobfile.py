"""Job definitions as code: TOML job files read, checked, loaded and written.

Reading and checking a file's entries is pure (TOML data in, model field
values or error messages out); `jobs_load` is the service that writes them,
all or nothing; `jobs_dumps` renders jobs back in the same format.

Error messages name the job and the TOML key (`env`, not `environment`), so
the user can find the line to fix.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import EmailValidator, URLValidator
from django.db import transaction
from django.db.models import QuerySet
from django.utils.text import normalize_newlines, slugify

from jobs import services
from jobs.kinds import nul_paths
from jobs.models import MAX_BACKOFF, MAX_DURATION, Job, Run

# The keys this version understands, in the order dumpjobs writes them.
KEYS = (
    "name",
    "slug",
    "description",
    "owner",
    "tags",
    "kind",
    "command",
    "callable",
    "kwargs",
    "database",
    "sql",
    "statement_timeout",
    "deliver",
    "schedule",
    "timezone",
    "catchup",
    "depends_on",
    "trigger",
    "timeout",
    "overlap",
    "retries",
    "retry_delay",
    "retry_backoff",
    "retry_max_delay",
    "queue",
    "grace",
    "alert_emails",
    "alert_after",
    "webhook_url",
    "env",
    "secret_env",
    "enabled",
)
STRING_KEYS = frozenset(
    {"name", "slug", "description", "owner", "kind", "command", "schedule", "timezone"}
    | {"callable", "database", "sql"}
    | {"overlap", "queue", "catchup", "trigger", "webhook_url"}
)
# Keys only one kind of job takes (every other key applies to any kind), and
# the ones it cannot do without.
KIND_KEYS = {
    Job.Kind.SHELL: ("command",),
    Job.Kind.PYTHON: ("callable", "kwargs"),
    Job.Kind.SQL: ("database", "sql", "statement_timeout"),
}
REQUIRED_KIND_KEYS = {
    Job.Kind.SHELL: ("command",),
    Job.Kind.PYTHON: ("callable",),
    Job.Kind.SQL: ("database", "sql"),
}
# The keys of the `deliver` table, in the order dumpjobs writes them.
DELIVER_KEYS = ("url", "password", "passive", "timeout", "retries")
# Model field -> TOML key, where they differ.
KEY_FOR_FIELD = {
    "environment": "env",
    "secret_keys": "secret_env",
    "trigger_on_upstream": "trigger",
    "upstreams": "depends_on",
    **{f"deliver_{key}": f"deliver.{key}" for key in DELIVER_KEYS},
}
FIELD_FOR_KEY = {key: name for name, key in KEY_FOR_FIELD.items()}

# `trigger` values: only "upstream" (the clock is `schedule`).
TRIGGER_UPSTREAM = "upstream"
MAX_RETRIES = 20

_DURATION = re.compile(r"\s*(\d+)\s*([smh]?)\s*")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}
_REFERENCE_ONLY = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")
_NOT_ENV_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]+")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# Shared with the admin form, so both accept and refuse the same addresses and URLs.
validate_email = EmailValidator()
# Alerts are POSTed as JSON: ftp:// (which URLField allows) cannot take them.
validate_webhook_url = URLValidator(
    schemes=["http", "https"], message="Enter an http:// or https:// URL."
)


class JobFileError(Exception):
    """A job file that cannot be loaded; `errors` holds one message per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass
class LoadReport:
    path: str
    created: list[str] = field(default_factory=list)
    updated: list[tuple[str, list[str]]] = field(default_factory=list)  # (name, changed keys)
    unchanged: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    # Things that load but deserve a second look (a password written in the file).
    warnings: list[str] = field(default_factory=list)
    # Jobs that were hand-made or came from another file and are now this
    # file's (their definition was already the same: they also count as unchanged).
    adopted: list[str] = field(default_factory=list)
    # (old name, new name) of the jobs renamed (also in updated).
    renamed: list[tuple[str, str]] = field(default_factory=list)
    # (name, running run id) of jobs --prune did not delete yet, paused instead.
    kept_running: list[tuple[str, int]] = field(default_factory=list)
    dry_run: bool = False  # all of the above was rolled back

    def summary(self) -> str:
        lines = [
            f"{self.path}: {len(self.created)} created, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged, {len(self.pruned)} pruned"
        ]
        if self.dry_run:
            lines.insert(0, "Dry run: nothing was changed. Loading the file would give:")
        if self.created:
            lines.append("  created: " + ", ".join(self.created))
        if self.updated:
            parts = [f"{name} ({', '.join(keys)})" for name, keys in self.updated]
            lines.append("  updated: " + ", ".join(parts))
        if self.unchanged:
            lines.append("  unchanged: " + ", ".join(self.unchanged))
        if self.renamed:
            lines.append("  renamed: " + ", ".join(f"{old} -> {new}" for old, new in self.renamed))
        if self.pruned:
            lines.append("  pruned: " + ", ".join(self.pruned))
        for name, run_id in self.kept_running:
            lines.append(
                f"  not pruned yet: {name} (run #{run_id} is running; the job is paused, "
                "and the next --prune deletes it once the run has ended)"
            )
        if self.adopted:
            lines.append("  now managed by this file: " + ", ".join(self.adopted))
        return "\n".join(lines)


# --- Durations ------------------------------------------------------------------


def parse_duration(value: object) -> int:
    """Seconds from 90, "90", "30s", "45m" or "2h"; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match:
            return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(
        f"{value!r} is not a duration; use seconds (90) or a string with "
        's, m or h (e.g. "30s", "45m", "2h")'
    )


def format_duration(seconds: int) -> str:
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


# --- Reading and checking ---------------------------------------------------------


def read_entries(path: Path) -> tuple[list[Any], list[str]]:
    """The file's [[job]] tables (not yet checked), and where each begins
    ("FILE:LINE", to start its error messages; "" when that is unclear)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise JobFileError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError([f"{path}: cannot read: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError([f"{path}: not valid TOML: {exc}"]) from None
    errors = [
        f'{path}: unknown top-level key "{key}" (job definitions go in [[job]] tables)'
        for key in data
        if key != "job"
    ]
    entries = data.get("job", [])
    if not isinstance(entries, list):
        errors.append(f"{path}: write each job as a [[job]] table")
        entries = []
    if errors:
        raise JobFileError(errors)
    return entries, _entry_places(path, text, len(entries))


# A [[job]] header on a line of its own (tomllib tells no positions).
_JOB_HEADER = re.compile(r"\s*\[\[\s*job\s*\]\]\s*(#.*)?")


def _entry_places(path: Path, text: str, count: int) -> list[str]:
    """ "FILE:LINE" of each entry's [[job]] header. Blank when the headers do
    not match the entries one for one (`job = [...]` inline, or a header
    inside a multi-line string): better no line than a wrong one."""
    lines = [n for n, line in enumerate(text.splitlines(), 1) if _JOB_HEADER.fullmatch(line)]
    if len(lines) != count:
        return [""] * count
    return [f"{path}:{line}" for line in lines]


def entry_label(entry: Any, index: int, place: str = "") -> str:
    """How messages name an entry: 'FILE:LINE: job "name"' (or job #N without a name)."""
    name = entry.get("name") if isinstance(entry, dict) else None
    if isinstance(name, str) and name.strip():
        shown = name.replace("\x00", "\\u0000")  # a NUL is refused, and said so
        label = f'job "{shown}"'
    else:
        label = f"job #{index}"
    return f"{place}: {label}" if place else label


def entry_fields(entry: Any, label: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Model field values for one [[job]] table, and its problems as
    (model field, message) pairs; no fields when the table is unreadable.

    `upstreams` holds the depends_on names (resolved to jobs by _plan_jobs).
    Keys left out take their default value: the file is the whole truth
    about a job, so deleting a line resets that setting.
    """
    if not isinstance(entry, dict):
        return {}, [("", f"{label}: write each job as a [[job]] table")]
    problems = [("", _unknown_key_message(label, key)) for key in entry if key not in KEYS]
    problems += [("", message) for message in _type_errors(entry, label)]
    if problems:
        return {}, problems
    if not entry.get("name", "").strip():
        problems.append(("name", f'{label}: missing required key "name"'))
    problems += _choice_errors(entry, label)
    what, what_problems = _kind_fields(entry, label)
    problems += what_problems
    deliver, deliver_problems = _deliver_fields(entry, label)
    problems += deliver_problems
    durations, duration_problems = _durations(entry, label)
    problems += duration_problems
    problems += _retry_errors(entry, label)
    problems += _alert_errors(entry, label)
    problems += [
        ("tags", f'{label}: tag "{tag}" contains a comma; give each tag as its own list item')
        for tag in entry.get("tags", [])
        if "," in tag
    ]
    name = entry.get("name", "").strip()
    slug = entry["slug"] if "slug" in entry else slugify(name)
    if "slug" not in entry and not slug:
        message = f'{label}: cannot derive a slug from the name; set "slug"'
        problems.append(("slug", message if name else ""))
    upstreams = [upstream.strip() for upstream in entry.get("depends_on", [])]
    problems += _depends_on_errors(entry, label, name, upstreams)
    fields = {
        "name": name,
        "slug": slug,
        "description": normalize_newlines(entry.get("description", "")),
        "owner": entry.get("owner", ""),
        "tags": ", ".join(tag.strip() for tag in entry.get("tags", []) if tag.strip()),
        "kind": entry.get("kind", Job.Kind.SHELL),
        **what,
        **deliver,
        "schedule": entry.get("schedule", "").strip(),
        "timezone": entry.get("timezone", "UTC"),
        "catchup": entry.get("catchup", _default("catchup")),
        "trigger_on_upstream": entry.get("trigger") == TRIGGER_UPSTREAM,
        "overlap": entry.get("overlap", Job.Overlap.SKIP),
        "retries": entry.get("retries", _default("retries")),
        "retry_backoff": _backoff(entry),
        **durations,
        "queue": entry.get("queue", ""),
        "alert_emails": [address.strip() for address in entry.get("alert_emails", [])],
        "alert_after": entry.get("alert_after", _default("alert_after")),
        "webhook_url": entry.get("webhook_url", "").strip(),
        "environment": dict(entry.get("env", {})),
        "secret_keys": list(entry.get("secret_env", [])),
        "enabled": entry.get("enabled", True),
        "upstreams": upstreams,
    }
    return fields, problems


def _default(field_name: str) -> Any:
    return Job._meta.get_field(field_name).get_default()


def _unknown_key_message(label: str, key: str) -> str:
    close = difflib.get_close_matches(key, KEYS, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f'{label}: unknown key "{key}"{hint}'


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_errors(entry: dict[str, Any], label: str) -> list[str]:
    # PostgreSQL cannot store a NUL, nor look up a name holding one.
    errors = [
        f"{label}: {path}: a NUL character (\\u0000) cannot be stored; remove it"
        for path in nul_paths(entry, "")
    ]
    for key, value in entry.items():
        if key in STRING_KEYS and not isinstance(value, str):
            errors.append(f'{label}: "{key}" must be a string')
    for key in ("tags", "secret_env", "depends_on", "alert_emails"):
        value = entry.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            errors.append(f'{label}: "{key}" must be a list of strings')
    env = entry.get("env", {})
    if not isinstance(env, dict):
        errors.append(f'{label}: "env" must be a table, e.g. env = {{ TARGET = "reports" }}')
    else:
        errors += [
            f'{label}: env {key} must be a string (quote it: {key} = "{value}")'
            for key, value in env.items()
            if not isinstance(value, str)
        ]
    errors += _kwargs_type_errors(entry.get("kwargs", {}), label)
    errors += _deliver_type_errors(entry.get("deliver", {}), label)
    if not isinstance(entry.get("enabled", True), bool):
        errors.append(f'{label}: "enabled" must be true or false')
    if "retries" in entry and not _is_int(entry["retries"]):
        errors.append(f'{label}: "retries" must be a whole number, e.g. retries = 2')
    if "alert_after" in entry and not _is_int(entry["alert_after"]):
        errors.append(f'{label}: "alert_after" must be a whole number, e.g. alert_after = 2')
    backoff = entry.get("retry_backoff", 2)
    if not (_is_int(backoff) or isinstance(backoff, float)):
        errors.append(f'{label}: "retry_backoff" must be a number, e.g. retry_backoff = 2')
    return errors


def _choice_errors(entry: dict[str, Any], label: str) -> list[tuple[str, str]]:
    problems = []
    kind = entry.get("kind", Job.Kind.SHELL)
    if kind not in Job.Kind.values:
        allowed = ", ".join(f'"{choice}"' for choice in Job.Kind.values)
        problems.append(("kind", f'{label}: unknown kind "{kind}"; use one of {allowed}'))
    for key, choices in (("overlap", Job.Overlap.values), ("catchup", Job.Catchup.values)):
        value = entry.get(key, choices[0])
        if value not in choices:
            allowed = ", ".join(f'"{choice}"' for choice in choices)
            problems.append((key, f'{label}: unknown {key} "{value}"; use one of {allowed}'))
    trigger = entry.get("trigger")
    if trigger is not None and trigger != TRIGGER_UPSTREAM:
        problems.append(
            (
                "trigger_on_upstream",
                f'{label}: unknown trigger "{trigger}"; the only trigger is "upstream" '
                '(a clock is set with "schedule")',
            )
        )
    return problems


def _kwargs_type_errors(kwargs: Any, label: str) -> list[str]:
    if not isinstance(kwargs, dict):
        return [f'{label}: "kwargs" must be a table, e.g. kwargs = {{ days = 7 }}']
    return [f"{label}: kwargs: {problem}" for problem in json_problems(kwargs, "")]


def json_problems(value: Any, path: str) -> list[str]:
    """What in a TOML value (or in the admin's JSON, where Python's json
    takes NaN, Infinity and 1e999) JSON cannot hold: the callable gets JSON
    kwargs, and PostgreSQL refuses them."""
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in json_problems(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in json_problems(item, f"{path}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{path[1:]} = {value}: use a finite number"]
    if value is not None and not isinstance(value, str | int | float | bool):
        return [f'{path[1:]} is a date or time; write it as a string, e.g. "2024-01-31"']
    return []


def _deliver_type_errors(deliver: Any, label: str) -> list[str]:
    if not isinstance(deliver, dict):
        return [
            f'{label}: "deliver" must be a table, e.g. deliver = {{ url = '
            '"ftp://user@host/dir", password = "${FTP_PASSWORD}" }'
        ]
    errors = []
    for key, value in deliver.items():
        if key not in DELIVER_KEYS:
            close = difflib.get_close_matches(key, DELIVER_KEYS, n=1)
            hint = f' (did you mean "deliver.{close[0]}"?)' if close else ""
            errors.append(f'{label}: unknown key "deliver.{key}"{hint}')
        elif key in ("url", "password") and not isinstance(value, str):
            errors.append(f'{label}: "deliver.{key}" must be a string')
        elif key == "passive" and not isinstance(value, bool):
            errors.append(f'{label}: "deliver.passive" must be true or false')
        elif key == "retries" and not _is_int(value):
            errors.append(f'{label}: "deliver.retries" must be a whole number, e.g. retries = 2')
    return errors


def _kind_fields(entry: dict[str, Any], label: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """What to run (command; callable and kwargs; database, sql and
    statement_timeout), and its problems: a missing key the kind needs, or
    a key of another kind."""
    kind = entry.get("kind", Job.Kind.SHELL)
    problems = []
    if kind in KIND_KEYS:
        problems += [
            (key, f'{label}: "{key}" is a key of {other} jobs, not {kind}')
            for other, keys in KIND_KEYS.items()
            if other != kind
            for key in keys
            if key in entry
        ]
        problems += [
            (key, f'{label}: missing required key "{key}" (a {kind} job needs it)')
            for key in REQUIRED_KIND_KEYS[kind]
            if not entry.get(key, "").strip()
        ]
    fields = {
        "command": normalize_newlines(entry.get("command", "")),
        "callable": entry.get("callable", "").strip(),
        "kwargs": dict(entry.get("kwargs", {})),
        "database": entry.get("database", "").strip(),
        "sql": normalize_newlines(entry.get("sql", "")),
        "statement_timeout": None,
    }
    if "statement_timeout" in entry:
        try:
            fields["statement_timeout"] = parse_duration(entry["statement_timeout"])
        except ValueError as exc:
            problems.append(("statement_timeout", f"{label}: statement_timeout: {exc}"))
        else:
            if fields["statement_timeout"] <= 0:
                problems.append(
                    ("statement_timeout", f"{label}: statement_timeout: must be more than 0")
                )
                fields["statement_timeout"] = None
    return fields, problems


def _deliver_fields(
    entry: dict[str, Any], label: str
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The deliver_* fields from the `deliver` table (defaults when it is left out)."""
    deliver = entry.get("deliver", {})
    fields = {
        "deliver_url": deliver.get("url", "").strip(),
        "deliver_password": deliver.get("password", ""),
        "deliver_passive": deliver.get("passive", _default("deliver_passive")),
        "deliver_timeout": _default("deliver_timeout"),
        "deliver_retries": deliver.get("retries", _default("deliver_retries")),
    }
    problems = []
    if "deliver" in entry and not fields["deliver_url"]:
        problems.append(
            ("deliver_url", f'{label}: deliver needs "url", e.g. "ftp://user@host/dir"')
        )
    if "timeout" in deliver:
        try:
            fields["deliver_timeout"] = parse_duration(deliver["timeout"])
        except ValueError as exc:
            problems.append(("deliver_timeout", f"{label}: deliver.timeout: {exc}"))
        else:
            if fields["deliver_timeout"] <= 0:
                problems.append(
                    ("deliver_timeout", f"{label}: deliver.timeout: must be more than 0")
                )
                fields["deliver_timeout"] = _default("deliver_timeout")
    if not 0 <= fields["deliver_retries"] <= MAX_RETRIES:
        problems.append(
            (
                "deliver_retries",
                f"{label}: deliver.retries: use a whole number from 0 to {MAX_RETRIES}",
            )
        )
        fields["deliver_retries"] = _default("deliver_retries")
    return fields, problems


def entry_warnings(entry: dict[str, Any], label: str) -> list[str]:
    """What loads but deserves a second look: a password written in the file."""
    password = entry.get("deliver", {}).get("password", "")
    if not password or is_reference(password):
        return []
    name = password_variable(slugify(entry.get("name", "")) or "job")
    return [
        f"{label}: deliver.password is written in the file; use ${{NAME}} (e.g. "
        f'password = "${{{name}}}") so the password stays in the server\'s environment'
    ]


def is_reference(value: str) -> bool:
    """True for a lone ${NAME}: a value kept in the server's environment."""
    return bool(_REFERENCE_ONLY.fullmatch(value))


def password_variable(slug: str) -> str:
    """PARTNER_EXPORT_FTP_PASSWORD for the job "partner-export"."""
    name = _NOT_ENV_NAME_CHARS.sub("_", slug).strip("_").upper()
    if not name or name[0].isdigit():
        name = f"JOB_{name}".rstrip("_")
    return f"{name}_FTP_PASSWORD"


def _durations(
    entry: dict[str, Any], label: str
) -> tuple[dict[str, int | None], list[tuple[str, str]]]:
    """timeout, retry_delay, retry_max_delay and grace in seconds (grace None
    when left out: derived from the schedule), and their problems."""
    defaults = {
        "timeout": settings.JOBSITE_DEFAULT_TIMEOUT,
        "retry_delay": _default("retry_delay"),
        "retry_max_delay": _default("retry_max_delay"),
    }
    values, problems = {}, []
    for key, default in defaults.items():
        try:
            values[key] = parse_duration(entry.get(key, default))
        except ValueError as exc:
            problems.append((key, f"{label}: {key}: {exc}"))
            values[key] = default
    values["grace"] = None
    if "grace" in entry:
        try:
            values["grace"] = parse_duration(entry["grace"])
        except ValueError as exc:
            problems.append(("grace", f"{label}: grace: {exc}"))
    for key, default in (*defaults.items(), ("grace", None)):
        if key != "timeout" and values[key] is not None and values[key] < 0:
            problems.append((key, f"{label}: {key}: must not be negative"))
            values[key] = default
        elif key != "timeout" and values[key] is not None and values[key] > MAX_DURATION:
            problems.append((key, f"{label}: {key}: at most {MAX_DURATION // 3600}h (30 days)"))
            values[key] = default
    return values, problems


def _retry_errors(entry: dict[str, Any], label: str) -> list[tuple[str, str]]:
    problems = []
    retries = entry.get("retries", 0)
    if not 0 <= retries <= MAX_RETRIES:
        problems.append(
            ("retries", f"{label}: retries: use a whole number from 0 to {MAX_RETRIES}")
        )
    backoff = entry.get("retry_backoff", _default("retry_backoff"))
    if not 1 <= backoff <= MAX_BACKOFF:  # also NaN
        problems.append(
            (
                "retry_backoff",
                f"{label}: retry_backoff: must be from 1 to {MAX_BACKOFF} "
                "(1 waits retry_delay every time; 2 doubles it each attempt)",
            )
        )
    return problems


def _backoff(entry: dict[str, Any]) -> float:
    """The entry's retry_backoff, or the default when it is out of range
    (NaN and a 400-digit integer included: float() of one overflows)."""
    default = _default("retry_backoff")
    backoff = entry.get("retry_backoff", default)
    return backoff if 1 <= backoff <= MAX_BACKOFF else default


def _alert_errors(entry: dict[str, Any], label: str) -> list[tuple[str, str]]:
    """Each alert address a valid email address, once; alert_after at least 1;
    the webhook an http(s) URL."""
    problems = []
    seen: set[str] = set()
    for address in entry.get("alert_emails", []):
        address = address.strip()
        try:
            validate_email(address)
        except ValidationError:
            problems.append(
                ("alert_emails", f'{label}: alert_emails: "{address}" is not an email address')
            )
        if address.lower() in seen:
            problems.append(("alert_emails", f'{label}: alert_emails names "{address}" twice'))
        seen.add(address.lower())
    if entry.get("alert_after", 1) < 1:
        problems.append(
            (
                "alert_after",
                f"{label}: alert_after: use a whole number of at least 1 "
                "(1 alerts on the first failure)",
            )
        )
    url = entry.get("webhook_url", "").strip()
    if url:
        try:
            validate_webhook_url(url)
        except ValidationError:
            problems.append(
                (
                    "webhook_url",
                    f'{label}: webhook_url: "{url}" is not an http:// or https:// URL',
                )
            )
    return problems


def _depends_on_errors(
    entry: dict[str, Any], label: str, name: str, upstreams: list[str]
) -> list[tuple[str, str]]:
    """Problems a job's depends_on has on its own (names are resolved later)."""
    problems = []
    seen: set[str] = set()
    for upstream in upstreams:
        if not upstream:
            problems.append(("upstreams", f"{label}: depends_on: a job name is empty"))
        elif upstream == name:
            problems.append(("upstreams", f"{label}: depends_on: a job cannot depend on itself"))
        elif upstream in seen:
            problems.append(("upstreams", f'{label}: depends_on names "{upstream}" twice'))
        seen.add(upstream)
    if entry.get("trigger") == TRIGGER_UPSTREAM and not upstreams:
        problems.append(
            (
                "trigger_on_upstream",
                f'{label}: trigger = "upstream" needs depends_on: the jobs whose '
                "success starts this one",
            )
        )
    return problems


def clean_messages(job: Job, label: str, *, reported: Collection[str] = ()) -> list[str]:
    """Job.full_clean() problems, named by TOML key instead of model field
    (leaving out fields in `reported`, whose problem was already said)."""
    try:
        # Uniqueness is checked across the whole file by _plan_jobs, with
        # messages that say which other job is in the way.
        job.full_clean(validate_unique=False)
    except ValidationError as exc:
        return [
            f"{label}: {KEY_FOR_FIELD.get(name, name)}: {message}"
            for name, messages in exc.message_dict.items()
            if name not in reported
            for message in messages
        ]
    return []


# --- Loading ----------------------------------------------------------------------


@dataclass
class _Plan:
    job: Job
    created: bool
    changed: list[str]  # model field names ("upstreams" when depends_on changed)
    upstreams: list[str] = field(default_factory=list)  # names, as the file gives them
    renamed_from: str = ""  # the job's name before this load, when the file renames it


def _same(field_name: str, old: Any, new: Any) -> bool:
    if field_name == "tags":  # "a,b" typed in the admin equals ["a", "b"]
        return [t.strip() for t in old.split(",") if t.strip()] == [
            t.strip() for t in new.split(",") if t.strip()
        ]
    return old == new


def _plan_jobs(
    entries: list[Any], source: str, *, prune: bool = False, places: list[str] | None = None
) -> list[_Plan]:
    """Check every entry and work out what to write; JobFileError lists all problems.

    An entry is the job of the same name; failing that, a job this file
    loaded earlier under another name that the file no longer names, with
    the entry's slug: a rename (the job keeps its runs and history).
    """
    errors: list[str] = []
    checked: list[tuple[str, dict[str, Any], set[str]]] = []
    places = places or [""] * len(entries)
    for index, (entry, place) in enumerate(zip(entries, places, strict=True), start=1):
        label = entry_label(entry, index, place)
        fields, problems = entry_fields(entry, label)
        errors += [message for _name, message in problems if message]
        if fields:
            checked.append((label, fields, {name for name, _message in problems}))
    named = [fields for _label, fields, reported in checked if not {"name", "slug"} & reported]
    errors += _duplicate_errors(named)
    existing = Job.objects.in_bulk([f["name"] for f in named], field_name="name")
    slug_owners = Job.objects.in_bulk([f["slug"] for f in named], field_name="slug")
    in_file = {f["name"] for f in named}
    for fields in named:
        owner = slug_owners.get(fields["slug"])
        if fields["name"] not in existing and _renamed_by_file(owner, source, in_file):
            existing[fields["name"]] = owner
    renames = {job.name: name for name, job in existing.items() if job.name != name}
    graph = _DependencyGraph.from_database().renamed(renames)
    plans = []
    for label, fields, reported in checked:
        job = existing.get(fields["name"])
        owner = slug_owners.get(fields["slug"])
        if owner is not None and (job is None or owner.pk != job.pk):
            errors.append(_slug_taken_message(label, fields, owner, source))
        renamed_from = job.name if job is not None and job.name != fields["name"] else ""
        upstreams = fields.pop("upstreams")
        plan = _plan_one(fields | {"source": source}, job)
        plan.upstreams, plan.renamed_from = upstreams, renamed_from
        if not plan.created and set(upstreams) != graph.upstreams_of(plan.job.name):
            plan.changed.append("upstreams")
        errors += clean_messages(plan.job, label, reported=reported)
        plans.append((label, plan))
    errors += _dependency_errors(plans, graph, source=source, prune=prune, renames=renames)
    if errors:
        raise JobFileError(errors)
    return [plan for _label, plan in plans]


def _renamed_by_file(job: Job | None, source: str, in_file: set[str]) -> bool:
    """True for a job this file loaded earlier and names no more."""
    return job is not None and job.source == source and job.name not in in_file


def _slug_taken_message(label: str, fields: dict[str, Any], owner: Job, source: str) -> str:
    taken = f'{label}: slug "{fields["slug"]}" is already used by job "{owner.name}"'
    if owner.source == source or owner.name == fields["name"]:
        return f'{taken}; set another "slug"'
    where = f"loaded from {owner.source}" if owner.source else "not from a job file"
    return (
        f'{taken} ({where}); set another "slug", or, if this entry is that job, '
        f'give it the name "{owner.name}" (once loaded, renaming it in this file keeps its '
        "history)"
    )


def _duplicate_errors(all_fields: list[dict[str, Any]]) -> list[str]:
    errors = []
    names: set[str] = set()
    slugs: dict[str, str] = {}
    for fields in all_fields:
        name, slug = fields["name"], fields["slug"]
        if name in names:
            errors.append(f'job "{name}" appears more than once in the file')
        elif slug in slugs:
            errors.append(f'job "{name}": slug "{slug}" is also the slug of job "{slugs[slug]}"')
        names.add(name)
        slugs.setdefault(slug, name)
    return errors


def _plan_one(fields: dict[str, Any], job: Job | None) -> _Plan:
    if job is None:
        return _Plan(Job(**fields), created=True, changed=list(fields))
    changed = [name for name, value in fields.items() if not _same(name, getattr(job, name), value)]
    for name in changed:
        setattr(job, name, fields[name])
    return _Plan(job, created=False, changed=changed)


# --- Dependencies -----------------------------------------------------------------


class _DependencyGraph:
    """Upstream edges by job name: "a depends on b" is the edge a -> b."""

    def __init__(self, edges: dict[str, list[str]]) -> None:
        self.edges = edges

    @classmethod
    def from_database(cls) -> _DependencyGraph:
        edges: dict[str, list[str]] = {}
        rows = Job.upstreams.through.objects.values_list("from_job__name", "to_job__name")
        for down, up in rows.order_by("from_job__name", "to_job__name"):
            edges.setdefault(down, []).append(up)
        return cls(edges)

    def renamed(self, renames: dict[str, str]) -> _DependencyGraph:
        """The graph with jobs' old names (keys of `renames`) replaced by their new ones."""
        edges = {
            renames.get(down, down): [renames.get(up, up) for up in ups]
            for down, ups in self.edges.items()
        }
        return _DependencyGraph(edges)

    def upstreams_of(self, name: str) -> set[str]:
        return set(self.edges.get(name, []))

    def downstreams_of(self, name: str) -> list[str]:
        return sorted(down for down, ups in self.edges.items() if name in ups)

    def replaced(self, new_edges: dict[str, list[str]], removed: set[str]) -> _DependencyGraph:
        """The graph once the file's jobs have `new_edges` and `removed` jobs are gone."""
        edges = {
            down: [up for up in ups if up not in removed]
            for down, ups in self.edges.items()
            if down not in removed and down not in new_edges
        }
        return _DependencyGraph(edges | new_edges)

    def cycle_through(self, start: str) -> list[str] | None:
        """The shortest path start -> ... -> start (breadth first), or None."""
        parent: dict[str, str | None] = {start: None}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for up in self.edges.get(node, []):
                if up == start:
                    path = [node]
                    while (previous := parent[path[-1]]) is not None:
                        path.append(previous)
                    return [*reversed(path), start]
                if up not in parent:
                    parent[up] = node
                    queue.append(up)
        return None


def _dependency_errors(
    plans: list[tuple[str, _Plan]],
    graph: _DependencyGraph,
    *,
    source: str,
    prune: bool,
    renames: dict[str, str],
) -> list[str]:
    """Unknown upstreams, and cycles in the graph the file would make
    (its own edges plus those of the database's other jobs). `renames`:
    old name -> new name of the jobs the file renames."""
    in_file = {plan.job.name for _label, plan in plans}
    referenced = {name for _label, plan in plans for name in plan.upstreams}
    known = in_file | set(Job.objects.filter(name__in=referenced).values_list("name", flat=True))
    pruned: set[str] = set()
    if prune:
        pruned = set(
            Job.objects.filter(source=source)
            .exclude(name__in=in_file | set(renames))
            .values_list("name", flat=True)
        )
    errors = []
    for label, plan in plans:
        for upstream in plan.upstreams:
            if upstream in renames:
                errors.append(
                    f'{label}: depends_on names "{upstream}", which this file renames to '
                    f'"{renames[upstream]}"; write "{renames[upstream]}"'
                )
            elif upstream in pruned:
                errors.append(
                    f'{label}: depends_on names "{upstream}", which --prune would delete '
                    "(it is no longer in this file)"
                )
            elif upstream not in known:
                errors.append(
                    f'{label}: depends_on names "{upstream}", which is neither in this file '
                    "nor an existing job"
                )
    # A job naming itself is reported by entry_fields: leave that edge out.
    new_edges = {
        plan.job.name: [up for up in plan.upstreams if up != plan.job.name] for _l, plan in plans
    }
    proposed = graph.replaced(new_edges, pruned)
    for name in sorted(pruned):
        errors += [
            f'--prune would delete job "{name}", which job "{down}" depends on'
            for down in graph.downstreams_of(name)
            if down not in pruned and down not in in_file
        ]
    return errors + _cycle_errors([plan.job.name for _label, plan in plans], proposed)


def _cycle_errors(names: list[str], graph: _DependencyGraph) -> list[str]:
    errors = []
    seen: list[set[str]] = []
    for name in names:
        cycle = graph.cycle_through(name)
        if cycle is None or set(cycle) in seen:
            continue
        seen.append(set(cycle))
        errors.append(
            f"dependency cycle: {' -> '.join(cycle)} (each job depends on the next; "
            "remove one of these depends_on entries)"
        )
    return errors


def jobs_load(*, path: str | Path, prune: bool = False, dry_run: bool = False) -> LoadReport:
    """Create or update the jobs a TOML file defines; all or nothing.

    1. Read and check every [[job]] (types, keys, Job.full_clean(), unknown
       upstreams, dependency cycles); any problem raises JobFileError and
       nothing is written.
    2. In one transaction: create new jobs, save only the changed fields of
       changed ones (unchanged jobs keep updated_at and the scheduler's
       next_fire_at), rename the jobs whose entry has a new name and the
       same slug, set changed upstream sets, and with `prune` delete the
       jobs this same file created earlier that it no longer names
       (see _prune: not while one of their runs is running).

    Jobs remember the file's absolute path in Job.source; the scheduler picks
    up new and changed schedules at its next tick. `dry_run`: all of it, then
    rolled back: the report says what a load would do.
    """
    source_path = Path(path).resolve()
    source = str(source_path)
    report = LoadReport(path=source)
    with transaction.atomic():
        entries, places = read_entries(source_path)
        plans = _plan_jobs(entries, source, prune=prune, places=places)
        report.warnings = [
            warning
            for index, (entry, place) in enumerate(zip(entries, places, strict=True), start=1)
            for warning in entry_warnings(entry, entry_label(entry, index, place))
        ]
        for plan in plans:
            _save_plan(plan, report, source=source)
        _save_upstreams(plans)
        gone = Job.objects.filter(source=source).exclude(pk__in=[plan.job.pk for plan in plans])
        # (name, slug) of the jobs the file no longer names, before --prune deletes them.
        dropped = list(gone.order_by("name").values_list("name", "slug"))
        if prune:
            _prune(gone, report)
        report.warnings += _rename_hints(dropped, report, prune=prune)
        if dry_run:  # nothing kept, nothing done on commit (no files deleted, no emails)
            transaction.set_rollback(True)
            report.dry_run = True
    return report


def _prune(doomed: QuerySet[Job], report: LoadReport) -> None:
    """Delete `doomed`, but not a job with a running run: deleting it would
    kill the run and lose its record. Such a job is paused instead (it
    fires no more; its waiting retries are skipped) and the next --prune
    deletes it, once the run has ended.

    The job's queued and running runs are locked first (PostgreSQL), so a
    worker claiming one meanwhile is either seen as running or, after the
    commit, finds nothing to claim. SQLite's write lock orders them anyway."""
    active = Run.objects.select_for_update().filter(job__in=doomed, status__in=Run.ACTIVE)
    running: dict[int, int] = {}
    for job_id, run_id, status in active.order_by("pk").values_list("job_id", "pk", "status"):
        if status == Run.Status.RUNNING:
            running.setdefault(job_id, run_id)
    for job in doomed.filter(pk__in=running).order_by("name"):
        if job.enabled:
            services.job_set_enabled(job=job, enabled=False)
        report.kept_running.append((job.name, running[job.pk]))
    doomed = doomed.exclude(pk__in=running)
    report.pruned = sorted(doomed.values_list("name", flat=True))
    services.jobs_delete(jobs=doomed)


def _rename_hints(dropped: list[tuple[str, str]], report: LoadReport, *, prune: bool) -> list[str]:
    """A job renamed in the file along with its slug (a slug derived from
    the name changes with it) reads as a new job, and the old one as gone:
    say how a rename keeps the job's history."""
    if not report.created:
        return []
    created = " / ".join(f'"{name}"' for name in report.created)
    if prune:
        return [
            f'job "{name}" was deleted by --prune, and {created} is new: if it was "{name}" '
            f"renamed, its runs and history are gone; to rename a job and keep them, keep "
            f'its slug (slug = "{slug}")'
            for name, slug in dropped
            if name in report.pruned
        ]
    return [
        f'job "{name}" is no longer in this file, and {created} is new: if that is "{name}" '
        "renamed, there are two jobs now; to have one, with the runs and history, delete "
        f'the new one and load again with slug = "{slug}" (the old slug) in its entry'
        for name, slug in dropped
    ]


def _save_plan(plan: _Plan, report: LoadReport, *, source: str) -> None:
    definition = [name for name in plan.changed if name not in ("source", "upstreams")]
    if plan.renamed_from:
        report.renamed.append((plan.renamed_from, plan.job.name))
    if plan.created:
        plan.job.save()
        report.created.append(plan.job.name)
    elif set(plan.changed) - {"source"}:
        plan.job.save(update_fields=[*definition, "source", "updated_at"])
        keys = [KEY_FOR_FIELD.get(name, name) for name in plan.changed if name != "source"]
        report.updated.append((plan.job.name, keys))
    else:
        report.unchanged.append(plan.job.name)
        if plan.changed:
            # Bookkeeping, not a definition change: updated_at stays.
            Job.objects.filter(pk=plan.job.pk).update(source=source)
            report.adopted.append(plan.job.name)


def _save_upstreams(plans: list[_Plan]) -> None:
    """Set the upstream sets that changed (after every job of the file exists)."""
    changed = [plan for plan in plans if "upstreams" in plan.changed or plan.created]
    names = {name for plan in changed for name in plan.upstreams}
    ids = dict(Job.objects.filter(name__in=names).values_list("name", "pk"))
    for plan in changed:
        if plan.upstreams or not plan.created:
            plan.job.upstreams.set([ids[name] for name in plan.upstreams])


# --- Dumping -----------------------------------------------------------------------


def job_entry(job: Job) -> tuple[dict[str, Any], list[str]]:
    """A job as a [[job]] table (keys at their default left out) and warnings.

    A secret's value is never written: a ${NAME} reference is kept as it is,
    any other value becomes the placeholder ${KEY}, with a warning. So is
    the delivery password: a literal one becomes ${SLUG_FTP_PASSWORD}.
    """
    warnings = _unused_field_warnings(job)
    env = dict(job.environment)
    for key in job.secret_keys:
        if key in env and not _REFERENCE_ONLY.fullmatch(env[key]):
            secret = env[key]
            env[key] = f"${{{key}}}"
            warnings.append(
                f'job "{job.name}": the value of secret {key} was not exported; '
                f"written as ${{{key}}}, so set {key} in the server's environment"
            )
            # Another value holding it (a URL with the token in it) would
            # give it away: pages mask such values too (services.masked).
            for other, value in env.items():
                if other != key and secret.strip() and secret in value:
                    env[other] = value.replace(secret, f"${{{key}}}")
                    warnings.append(
                        f'job "{job.name}": env {other} holds the value of secret {key}; '
                        f"written with ${{{key}}} in its place"
                    )
    # Sorted by name so a dump diffs cleanly (uses prefetch_related("upstreams")).
    upstreams = sorted(upstream.name for upstream in job.upstreams.all())
    if job.trigger_on_upstream and not upstreams:
        warnings.append(
            f'job "{job.name}": trigger on upstream success is set but the job has no '
            'upstreams, so it can never trigger; trigger = "upstream" was not written'
        )
    values: dict[str, Any] = {
        "name": job.name,
        "slug": job.slug if job.slug != slugify(job.name) else None,
        "description": job.description,
        "owner": job.owner,
        "tags": job.tag_list,
        "kind": job.kind if job.kind != Job.Kind.SHELL else None,
        **_kind_entry(job, warnings),
        "deliver": _deliver_entry(job, warnings),
        "schedule": job.schedule,
        "timezone": job.timezone if job.timezone != "UTC" else None,
        "catchup": _unless_default(job, "catchup"),
        "depends_on": upstreams,
        "trigger": TRIGGER_UPSTREAM if job.trigger_on_upstream and upstreams else None,
        "timeout": format_duration(job.timeout)
        if job.timeout != settings.JOBSITE_DEFAULT_TIMEOUT
        else None,
        "overlap": job.overlap if job.overlap != Job.Overlap.SKIP else None,
        "retries": job.retries or None,
        "retry_delay": _duration_unless_default(job, "retry_delay"),
        "retry_backoff": _number(job.retry_backoff)
        if job.retry_backoff != _default("retry_backoff")
        else None,
        "retry_max_delay": _duration_unless_default(job, "retry_max_delay"),
        "queue": job.queue,
        "grace": None if job.grace is None else format_duration(job.grace),
        "alert_emails": list(job.alert_emails),
        "alert_after": _unless_default(job, "alert_after"),
        "webhook_url": job.webhook_url,
        "env": env,
        "secret_env": list(job.secret_keys),
        "enabled": None if job.enabled else False,
    }
    entry = {key: value for key, value in values.items() if value not in (None, "", [], {})}
    return entry, warnings


def _kind_entry(job: Job, warnings: list[str]) -> dict[str, Any]:
    """The keys of the job's own kind (the others are left out)."""
    dropped: list[str] = []
    kwargs = _without_nulls(job.kwargs, "kwargs", dropped)
    if dropped and job.kind == Job.Kind.PYTHON:
        warnings.append(f'job "{job.name}": TOML has no null: {", ".join(dropped)} was not written')
    values = {
        "command": job.command,
        "callable": job.callable,
        "kwargs": kwargs,
        "database": job.database,
        "sql": job.sql,
        "statement_timeout": None
        if job.statement_timeout is None
        else format_duration(job.statement_timeout),
    }
    return {key: values[key] for key in KIND_KEYS.get(job.kind, ())}


def _without_nulls(value: Any, path: str, dropped: list[str]) -> Any:
    """`value` without JSON nulls, which TOML cannot write; their paths go to `dropped`."""
    if not isinstance(value, dict | list):
        return value
    items = value.items() if isinstance(value, dict) else enumerate(value)
    kept = []
    for key, item in items:
        where = f"{path}.{key}" if isinstance(value, dict) else f"{path}[{key}]"
        if item is None:
            dropped.append(where)
        else:
            kept.append((key, _without_nulls(item, where, dropped)))
    return dict(kept) if isinstance(value, dict) else [item for _key, item in kept]


def _unused_field_warnings(job: Job) -> list[str]:
    """Fields of another kind that hold a value (possible when made outside
    loadjobs and the admin): not written, so say so."""
    unused = [
        key
        for kind, keys in KIND_KEYS.items()
        if kind != job.kind
        for key in keys
        if getattr(job, key) not in (None, "", {}, [])
    ]
    return [
        f'job "{job.name}": {key} is set but only {kind} jobs use it, and this is a '
        f"{job.kind} job; {key} was not written"
        for key in unused
        for kind, keys in KIND_KEYS.items()
        if key in keys
    ]


def _deliver_entry(job: Job, warnings: list[str]) -> dict[str, Any] | None:
    """The `deliver` table, or None without a delivery URL. The password is
    written only as a ${NAME} reference."""
    if not job.deliver_url:
        if job.deliver_password:
            warnings.append(
                f'job "{job.name}": a delivery password is set but no delivery URL; '
                "deliver was not written"
            )
        return None
    password = job.deliver_password
    if password and not is_reference(password):
        name = password_variable(job.slug)
        password = f"${{{name}}}"
        warnings.append(
            f'job "{job.name}": the delivery password was not exported; written as '
            f"{password}, so set {name} in the server's environment"
        )
    values = {
        "url": job.deliver_url,
        "password": password,
        "passive": _unless_default(job, "deliver_passive"),
        "timeout": _duration_unless_default(job, "deliver_timeout"),
        "retries": _unless_default(job, "deliver_retries"),
    }
    return {key: value for key, value in values.items() if value not in (None, "")}


def _unless_default(job: Job, field_name: str) -> Any:
    value = getattr(job, field_name)
    return None if value == _default(field_name) else value


def _duration_unless_default(job: Job, field_name: str) -> str | None:
    value = _unless_default(job, field_name)
    return None if value is None else format_duration(value)


def _number(value: float) -> int | float:
    """3.0 as 3: what a person would write."""
    return int(value) if float(value).is_integer() else value


def jobs_dumps(jobs: list[Job]) -> tuple[str, list[str]]:
    """TOML text for `jobs` in the loadjobs format, and warnings for stderr."""
    parts = ["# Jobsite job definitions: load with `manage.py loadjobs FILE`.\n"]
    warnings: list[str] = []
    for job in jobs:
        entry, job_warnings = job_entry(job)
        warnings += job_warnings
        lines = [
            f"{_toml_key(key)} = {_toml_value(value, multiline=True)}"
            for key, value in entry.items()
        ]
        parts.append("\n[[job]]\n" + "\n".join(lines) + "\n")
    return "".join(parts), warnings


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_value(key)


def _toml_value(value: Any, *, multiline: bool = False) -> str:
    """One value, compactly (tomli_w would spread lists and tables over lines)."""
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = tomli_w.dumps({"v": value}, multiline_strings=multiline and "\n" in str(value))
    return text.removeprefix("v = ").rstrip("\n")
