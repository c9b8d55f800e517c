"""A run's captured output: written in bounded chunks, read back with a marker."""

from __future__ import annotations

import codecs
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import F

from jobs.models import SECRET_MASK, Run, RunLogChunk

log = logging.getLogger(__name__)


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _without_nul(text: str) -> str:
    """PostgreSQL stores no NUL in text: shown like an undecodable byte."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _cut_utf8(data: bytes, limit: int) -> int:
    """The largest cut <= limit that does not split a UTF-8 character."""
    cut = min(limit, len(data))
    while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


class RunLogWriter:
    """Buffers a child's output and stores it as RunLogChunk rows.

    Flushes every JOBSITE_LOG_FLUSH_SECONDS or JOBSITE_LOG_FLUSH_BYTES. The
    first `head_cap` bytes are kept; after that only the last `tail_cap`
    bytes are, older tail chunks are deleted and counted as dropped.
    """

    def __init__(
        self,
        run: Run,
        *,
        redact: list[str] | None = None,
        echo: Callable[[str], None] | None = None,
        head_cap: int | None = None,
        tail_cap: int | None = None,
    ) -> None:
        self.run_id = run.pk
        self.head_cap = settings.JOBSITE_LOG_HEAD_BYTES if head_cap is None else head_cap
        self.tail_cap = settings.JOBSITE_LOG_TAIL_BYTES if tail_cap is None else tail_cap
        self.flush_bytes = settings.JOBSITE_LOG_FLUSH_BYTES
        self.flush_seconds = settings.JOBSITE_LOG_FLUSH_SECONDS
        # Longest first, so a secret containing another is masked whole.
        secrets = sorted({s for s in (redact or []) if len(s) >= 3}, key=len, reverse=True)
        self.secrets = secrets
        self.redact = re.compile("|".join(map(re.escape, secrets))) if secrets else None
        # The output's last characters wait for the next read (or the end):
        # a secret read in two pieces is masked whole.
        self.held = ""
        self.hold = len(secrets[0]) - 1 if secrets else 0
        self.echo = echo
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending: list[str] = []
        self.pending_size = 0
        self.produced = 0
        self.saved_produced = 0  # a new run's log_bytes
        self.head_used = 0
        self.seq = 0
        self.tail: deque[tuple[int, int]] = deque()  # (seq, size) of stored tail chunks
        self.tail_size = 0
        self.last_flush = time.monotonic()
        self.unsaved_dropped = 0
        self.closing = False
        # The last pieces of output as stored (masked): references, no copy.
        self.recent: deque[str] = deque(maxlen=3)
        self.output_end: tuple[str, ...] | None = None  # `recent` when the output ended

    def feed(self, data: bytes) -> None:
        self.produced += len(data)
        text = _without_nul(self.decoder.decode(data))
        if text:
            self._add(text)
        if self.head_used < self.head_cap:
            # Filling the head: store in small steps so the page tails it live.
            if self.pending_size >= self.flush_bytes or self._flush_due():
                self.flush()
            return
        # Past the head only the tail is kept: a flood is trimmed in memory
        # and written once a second, not one transaction per pipe read.
        if self.pending_size > 2 * self.tail_cap:
            self._trim_pending()
        if self._flush_due():
            self.flush()

    def _trim_pending(self) -> None:
        """Keep the last tail_cap characters pending. Whole pieces go first,
        so a flood is not joined and re-encoded just to be thrown away (that
        was a third of the capture's CPU)."""
        excess = self.pending_size - self.tail_cap
        gone = 0
        whole = 0  # leading pieces dropped whole
        while whole < len(self.pending) and len(self.pending[whole]) <= excess:
            excess -= len(self.pending[whole])
            gone += _utf8_size(self.pending[whole])
            whole += 1
        rest = self.pending[whole:]
        if excess and rest:
            gone += _utf8_size(rest[0][:excess])
            rest[0] = rest[0][excess:]
        self.unsaved_dropped += gone
        self.pending = rest
        self.pending_size = sum(len(piece) for piece in rest)

    def tick(self) -> None:
        if self.pending and self._flush_due():
            self.flush()

    def close(self, note: str = "") -> None:
        """The output is complete: add the decoder's rest and `note` (once,
        however often this is tried again) and store everything."""
        self.end(note)
        self.flush()

    def end(self, note: str = "") -> None:
        """The output is complete: add the decoder's rest and `note`, once.
        `store_last` (inside the outcome's transaction) or `flush` stores it."""
        if self.closing:
            return
        self.closing = True
        self.output_done()
        if note:
            self._add(note if note.endswith("\n") else note + "\n", final=True)

    def output_done(self) -> None:
        """The job's output is complete: add the decoder's rest and the text
        held back for masking, before Jobsite's own notes. Safe to repeat."""
        text = self.decoder.decode(b"", final=True)
        if text or self.held:
            self._add(text, final=True)
        if self.output_end is None:
            self.output_end = tuple(self.recent)

    def line(self, text: str) -> None:
        """One line of Jobsite's own (a note on the upload, the files) in
        the log, masked like the output."""
        self.feed(f"{text}\n".encode())

    def masked(self, text: str) -> str:
        """`text` (not output: a progress message) as the log would store it:
        every secret masked, a NUL shown as U+FFFD."""
        text = _without_nul(text)
        return self.redact.sub(SECRET_MASK, text) if self.redact else text

    def store_last(self, rows: list[RunLogChunk] | None = None) -> dict:
        """Store what is pending in the caller's transaction, and return the
        run's log counts for the caller to write in its own UPDATE of the run
        (the outcome): the last chunk of a run costs no transaction of its own.
        `rows`: the chunks are added to it for the caller to insert in its own
        statement, instead of being inserted here.
        If the transaction fails, `restore(snapshot())` taken before it."""
        return self._store_pending(rows)

    def snapshot(self) -> tuple:
        return (
            list(self.pending),
            self.pending_size,
            self.head_used,
            self.seq,
            deque(self.tail),
            self.tail_size,
            self.saved_produced,
            self.unsaved_dropped,
        )

    def restore(self, state: tuple) -> None:
        """Back to `snapshot()`: what it stored since was rolled back."""
        (
            pending,
            self.pending_size,
            self.head_used,
            self.seq,
            tail,
            self.tail_size,
            self.saved_produced,
            self.unsaved_dropped,
        ) = state
        self.pending, self.tail = list(pending), deque(tail)

    def _flush_due(self) -> bool:
        return time.monotonic() - self.last_flush >= self.flush_seconds

    def _add(self, text: str, *, final: bool = False) -> None:
        if self.redact:
            text = self._masked(self.held + text, final=final)
            if not text:
                return
        if self.echo:
            self.echo(text)
        self.pending.append(text)
        self.pending_size += len(text)
        self.recent.append(text)

    def last_line(self, limit: int = 200) -> str:
        """The output's last line with text in it, masked (for a failed
        run's summary: the error a script prints last), once the output has
        ended (`output_done`): Jobsite's own notes after it do not count."""
        ended = self.recent if self.output_end is None else self.output_end
        for line in reversed("".join(ended)[-8192:].splitlines()):
            line = " ".join(line.split())
            if line and not line.startswith("[jobsite]"):
                return line if len(line) <= limit else line[: limit - 1] + "…"
        return ""

    def _masked(self, text: str, *, final: bool) -> str:
        """`text` with every secret masked, but for its last `hold`
        characters (kept in `held`), which may begin a secret that the next
        output completes. A secret that begins before them is complete here
        (hold = longest secret - 1) and is masked now, even if it reaches
        into them; one that begins among them is decided next time, with
        what follows (a shorter secret inside a longer one must not be
        masked before the longer one is complete)."""
        boundary = len(text) if final else len(text) - self.hold
        if not any(secret in text for secret in self.secrets):
            # The usual case, and 6x faster than the regex scan below
            # (a flood of a job with secrets: ~1 GB/s against 160 MB/s).
            cut = max(0, boundary)
            self.held = text[cut:]
            return text[:cut]
        shown: list[str] = []
        at = 0
        for match in self.redact.finditer(text):
            if match.start() >= boundary:
                break
            shown += [text[at : match.start()], SECRET_MASK]
            at = match.end()
        cut = max(at, boundary)
        shown.append(text[at:cut])
        self.held = text[cut:]
        return "".join(shown)

    def flush(self) -> None:
        """Store what is pending. If the database is away (a restart), keep
        the output and try again at the next flush; raise only from close()."""
        self.last_flush = time.monotonic()
        saved = self.snapshot()
        try:
            self._flush()
        except DatabaseError:
            self.restore(saved)
            self.saved_produced = -1  # unknown now: save the counts next time
            self._bound_pending()
            if not connection.in_atomic_block:
                connection.close()  # reconnect at the next try
            if self.closing:
                raise
            log.warning("run %s: database unavailable, log kept in memory", self.run_id)

    def _bound_pending(self) -> None:
        """While the database is away, keep at most the tail cap in memory."""
        if self.pending_size > self.tail_cap:
            self._trim_pending()

    def _flush(self) -> None:
        if not self.pending:
            self._write_counts(self._counts(0))  # a count alone needs no transaction
            return
        with transaction.atomic():
            self._write_counts(self._store_pending())

    def _store_pending(self, unsaved: list[RunLogChunk] | None = None) -> dict:
        """Write the pending output as chunks, in the caller's transaction,
        dropping tail chunks past the cap; the run's log counts to write with
        them. `unsaved`: the chunks go there instead, for the caller to insert
        (only this store's tail chunks are among them: together at most the
        tail cap, so trimming, which drops the oldest first, never reaches them)."""
        if not self.pending:
            return self._counts(0)
        data = "".join(self.pending).encode()
        self.pending, self.pending_size = [], 0
        rows = []
        if self.head_used < self.head_cap:
            cut = _cut_utf8(data, self.head_cap - self.head_used)
            if cut:
                rows.append(self._chunk(data[:cut], is_head=True))
                self.head_used += cut
            data = data[cut:]
        dropped = 0
        if data:
            if len(data) > self.tail_cap:
                keep_from = len(data) - self.tail_cap
                while keep_from < len(data) and (data[keep_from] & 0xC0) == 0x80:
                    keep_from += 1  # do not start inside a UTF-8 character
                dropped += keep_from
                data = data[keep_from:]
            # In pieces of at most flush_bytes: the tail is trimmed by whole
            # chunks, so one big chunk would go at once and leave the tail
            # nearly empty (the output just before a failure).
            while data:
                cut = _cut_utf8(data, self.flush_bytes) or len(data)
                rows.append(self._chunk(data[:cut], is_head=False))
                self.tail.append((self.seq, cut))
                self.tail_size += cut
                data = data[cut:]
        if unsaved is None:
            RunLogChunk.objects.bulk_create(rows)
        else:
            unsaved.extend(rows)
        dropped += self._trim_tail()
        return self._counts(dropped)

    def _chunk(self, data: bytes, *, is_head: bool) -> RunLogChunk:
        self.seq += 1
        return RunLogChunk(
            run_id=self.run_id,
            seq=self.seq,
            is_head=is_head,
            data=data.decode(errors="replace"),
            size=len(data),
        )

    def _trim_tail(self) -> int:
        doomed: list[int] = []
        dropped = 0
        while self.tail_size > self.tail_cap and len(self.tail) > 1:
            seq, size = self.tail.popleft()
            self.tail_size -= size
            dropped += size
            doomed.append(seq)
        if doomed:
            RunLogChunk.objects.filter(run_id=self.run_id, seq__in=doomed).delete()
        return dropped

    def _write_counts(self, counts: dict) -> None:
        if counts:
            Run.objects.filter(pk=self.run_id).update(**counts)

    def _counts(self, dropped: int) -> dict:
        """The run's log fields to write now ({}: nothing new to say, as for a
        silent job), counted as written."""
        dropped += self.unsaved_dropped
        if self.produced == self.saved_produced and not dropped:
            return {}
        self.saved_produced = self.produced
        self.unsaved_dropped = 0
        counts: dict = {"log_bytes": self.produced}
        if dropped:
            counts["log_dropped_bytes"] = F("log_dropped_bytes") + dropped
        return counts


def dropped_marker(dropped: int) -> str:
    return f"\n[… {dropped:,} bytes of output dropped here (log cap) …]\n"


def iter_log(run: Run) -> Iterator[tuple[int, str]]:
    """(seq, text) of the stored log in order, with the dropped-bytes marker
    between head and tail. Reads in batches so a large log never sits in memory."""
    for seq, text, _tail_end in _pieces(run.pk, run.log_dropped_bytes, 0, 0):
        yield seq, text


@dataclass(frozen=True, slots=True)
class LogRead:
    """What a reader of the log gets: the text after its last chunk, and
    where it is now (`last_seq`, `tail_end`) to ask for what follows."""

    text: str
    last_seq: int
    tail_end: int  # bytes past the head up to the end of last_seq, dropped ones included
    truncated: bool = False  # text stops at the limit; last_seq is the last chunk all the same


def read_after(
    run: Run, *, after_seq: int = 0, tail_end: int = 0, limit: int | None = None
) -> LogRead:
    """The stored log after chunk `after_seq` (all of it for 0), for a reader
    who has it up to there (`tail_end` from its previous LogRead): with a
    marker wherever output was dropped since, saying how many bytes. At most
    `limit` characters of text.

    The run's dropped count is read again after the chunks, and the read
    repeated if it changed: each flush writes the chunks and the count in one
    transaction, so the two then agree.
    """
    dropped = run.log_dropped_bytes
    for _attempt in range(3):
        parts: list[str] = []
        size, last_seq, end, truncated = 0, after_seq, tail_end, False
        for seq, text, at in _pieces(run.pk, dropped, after_seq, tail_end):
            last_seq, end = seq, at
            if limit is not None and size + len(text) > limit:
                truncated = True
                text = text[: max(0, limit - size)]
            parts.append(text)
            size += len(text)
        now = Run.objects.filter(pk=run.pk).values_list("log_dropped_bytes", flat=True).first()
        if now is None or now == dropped:
            break
        dropped = now
    return LogRead("".join(parts), last_seq, end, truncated)


def _pieces(
    run_id: int, dropped: int, after_seq: int, tail_end: int
) -> Iterator[tuple[int, str, int]]:
    """(seq, text, tail_end) of the log after chunk `after_seq`, markers included.

    Output past the head is stored as one contiguous tail: all `dropped`
    bytes of it that are gone lie before the first stored tail chunk. A
    reader whose last chunk is a head chunk, or a tail chunk dropped since,
    is before the stored tail: what it lacks of the bytes before it is
    `dropped - tail_end`, and a marker says so.
    """
    before_tail = True
    if after_seq:
        # The reader's own chunk: still there (in the head, or the tail)?
        theirs = RunLogChunk.objects.filter(run_id=run_id, seq=after_seq)
        before_tail = theirs.values_list("is_head", flat=True).first() is not False
    last = after_seq
    while True:
        batch = list(
            RunLogChunk.objects.filter(run_id=run_id, seq__gt=last)
            .order_by("seq")
            .values_list("seq", "is_head", "size", "data")[:64]
        )
        if not batch:
            break
        for seq, is_head, size, data in batch:
            last = seq
            if not is_head:
                if before_tail:
                    before_tail = False
                    if dropped > tail_end:
                        yield seq, dropped_marker(dropped - tail_end), dropped
                    tail_end = dropped
                tail_end += size
            yield seq, data, tail_end
    if before_tail and dropped > tail_end:  # nothing past the head is stored
        yield last, dropped_marker(dropped - tail_end), dropped


def read_log(run: Run) -> str:
    return "".join(text for _seq, text in iter_log(run))


def last_lines(run: Run, count: int = 30) -> str:
    """The last `count` lines of the stored log (for emails and summaries)."""
    chunks = list(
        RunLogChunk.objects.filter(run=run).order_by("-seq").values_list("data", flat=True)[:4]
    )
    text = "".join(reversed(chunks))
    return "\n".join(text.rstrip("\n").splitlines()[-count:])
