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


def deliver(
    artifacts: list[Artifact],
    destination: Destination,
    *,
    retries: int,
    log: Callable[[str], None],
    pause: float = 1.0,
) -> None:
    """Upload every artifact, each attempt on a fresh connection; raise
    DeliveryError with the last reason when all attempts failed."""
    last_error = ""
    for attempt in range(1, retries + 2):
        try:
            _upload_all(artifacts, destination, log)
            return
        except (ftplib.Error, OSError, EOFError) as exc:
            last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            where = destination.describe()
            log(f"[jobsite] upload attempt {attempt} to {where} failed: {last_error}")
            if attempt <= retries:
                time.sleep(pause * attempt)
    raise DeliveryError(f"Upload to {destination.describe()} failed: {last_error}")


def _upload_all(artifacts: list[Artifact], dest: Destination, log: Callable[[str], None]) -> None:
    ftp_class = ftplib.FTP_TLS if dest.tls else ftplib.FTP
    ftp = ftp_class(timeout=dest.timeout)
    try:
        ftp.connect(dest.host, dest.port)
        ftp.login(dest.user, dest.password)
        if dest.tls:
            ftp.prot_p()
        ftp.set_pasv(dest.passive)
        if dest.directory not in ("", "/"):
            ftp.cwd(dest.directory)
        for artifact in artifacts:
            with artifact.file.open("rb") as fh:
                ftp.storbinary(f"STOR {posixpath.basename(artifact.name)}", fh)
            log(
                f"[jobsite] uploaded {artifact.name} ({artifact.size:,} bytes) to {dest.describe()}"
            )
        ftp.quit()
    finally:
        try:
            ftp.close()
        except OSError:
            pass
