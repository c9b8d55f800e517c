"""Uploading a run's artifacts to an FTP/FTPS destination."""

from __future__ import annotations

import ftplib
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from jobs.models import Artifact


@dataclass(frozen=True)
class Destination:
    tls: bool
    host: str
    port: int
    user: str
    password: str
    directory: str
    passive: bool
    timeout: float

    @classmethod
    def from_url(cls, url: str, *, password: str, passive: bool, timeout: float) -> Destination:
        parsed = urlparse(url)
        problem = url_problem(url)
        if problem:
            raise DeliveryError(f"Cannot upload to {url}: {problem}")
        return cls(
            tls=parsed.scheme == "ftps",
            host=parsed.hostname or "",
            port=parsed.port or 21,
            user=unquote(parsed.username or "anonymous"),
            password=password,
            directory=unquote(parsed.path or "/"),
            passive=passive,
            timeout=timeout,
        )

    def describe(self) -> str:
        scheme = "ftps" if self.tls else "ftp"
        return f"{scheme}://{self.user}@{self.host}:{self.port}{self.directory}"


class DeliveryError(Exception):
    pass


class DeliveryStopped(Exception):
    """The run was cancelled (or is no longer this worker's) during the upload."""


def url_problem(url: str) -> str:
    """Why `url` is no destination, or "" (also checked when a job is saved)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("ftp", "ftps") or not parsed.hostname:
        return "Use ftp://user@host[:port]/directory or ftps://…"
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        return "The port must be a number from 1 to 65535."
    if parsed.password:
        return "Do not put the password in the URL: use the password field with ${NAME}."
    return ""


def deliver(
    artifacts: list[Artifact],
    destination: Destination,
    *,
    retries: int,
    log: Callable[[str], None],
    should_stop: Callable[[], bool] = lambda: False,
    pause: float = 1.0,
) -> None:
    """Upload every artifact, each attempt on a fresh connection; raise
    DeliveryError with the last reason when all attempts failed, and
    DeliveryStopped as soon as `should_stop` (asked between steps and
    blocks, and while pausing) says the run was cancelled."""
    last_error = ""
    for attempt in range(1, retries + 2):
        try:
            _upload_all(artifacts, destination, log, should_stop)
            return
        # ValueError: what ftplib raises for a line break in the password.
        except (ftplib.Error, OSError, EOFError, ValueError) as exc:
            last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            where = destination.describe()
            log(f"[jobsite] upload attempt {attempt} to {where} failed: {last_error}")
            if attempt <= retries:
                _pause(pause * attempt, should_stop)
    raise DeliveryError(f"Upload to {destination.describe()} failed: {last_error}")


def _pause(seconds: float, should_stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        _check(should_stop)
        time.sleep(min(left, 0.2))


def _check(should_stop: Callable[[], bool]) -> None:
    if should_stop():
        raise DeliveryStopped


def _upload_all(
    artifacts: list[Artifact],
    dest: Destination,
    log: Callable[[str], None],
    should_stop: Callable[[], bool],
) -> None:
    ftp_class = ftplib.FTP_TLS if dest.tls else ftplib.FTP
    ftp = ftp_class(timeout=dest.timeout)
    try:
        _check(should_stop)
        ftp.connect(dest.host, dest.port)
        _check(should_stop)
        ftp.login(dest.user, dest.password)
        if dest.tls:
            ftp.prot_p()
        ftp.set_pasv(dest.passive)
        if dest.directory not in ("", "/"):
            ftp.cwd(dest.directory)
        for artifact in artifacts:
            _check(should_stop)
            with artifact.file.open("rb") as fh:
                ftp.storbinary(
                    f"STOR {posixpath.basename(artifact.name)}",
                    fh,
                    callback=lambda _block: _check(should_stop),
                )
            log(
                f"[jobsite] uploaded {artifact.name} ({artifact.size:,} bytes) to {dest.describe()}"
            )
        ftp.quit()
    finally:
        try:
            ftp.close()
        except OSError:
            pass
