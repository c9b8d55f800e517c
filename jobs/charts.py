"""Charts as inline SVG, drawn on the server.

Pure functions: data in, an SVG string out (no queries, no clock). Every
text and attribute value that reaches the markup goes through `escape`, so
a job name or an error summary cannot inject markup. Each mark carries a
<title>, which browsers show on hover and screen readers read: the picture
needs no JavaScript. Colours are attributes, not CSS, so the SVG reads the
same wherever it is pasted; a viewBox with width 100% scales it to its column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from html import escape
from typing import Protocol

from django.utils.safestring import SafeString, mark_safe

from jobs.templatetags.jobs_tags import duration as in_words

WIDTH, HEIGHT = 520, 190
LEFT, RIGHT, TOP = 70, 8, 14  # LEFT leaves room for the y axis labels
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, 120
BASE = TOP + PLOT_H  # y of the x axis

# The stylesheet's tones (jobs/static/jobs/jobsite.css), plus one for timeouts.
COLOURS = {
    "ok": "#1a7f37",
    "fail": "#cf222e",
    "timeout": "#8250df",
    "axis": "#8c959f",
    "grid": "#d0d7de",
    "text": "#57606a",
}
TIMED_OUT = "timed_out"
FAILED = ("failed", "lost")


class Counts(Protocol):
    """What a day needs: stats.Rate fits."""

    succeeded: int
    failures: int


@dataclass(frozen=True)
class RunPoint:
    """One finished run for the duration chart."""

    run_id: int
    status: str  # a Run.Status value
    seconds: float
    started_at: datetime | None = None
    href: str = ""


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _tag(name: str, **attrs: object) -> str:
    """<name a="..."/>: floats rounded, every value escaped, `class_` -> class,
    `data_x` -> data-x."""
    parts = [name]
    for key, value in attrs.items():
        if value is None:
            continue
        text = _num(value) if isinstance(value, float) else str(value)
        parts.append(f'{key.rstrip("_").replace("_", "-")}="{escape(text)}"')
    return "<" + " ".join(parts) + "/>"


def _open(tag: str) -> str:
    return tag[:-2] + ">"


def _text(x: float, y: float, text: str, *, anchor: str = "start") -> str:
    tag = _tag(
        "text", x=float(x), y=float(y), text_anchor=anchor, font_size=12, fill=COLOURS["text"]
    )
    return f"{_open(tag)}{escape(text)}</text>"


def _svg(label: str, body: list[str], css_class: str) -> SafeString:
    head = _tag(
        "svg",
        xmlns="http://www.w3.org/2000/svg",
        class_=css_class,
        viewBox=f"0 0 {WIDTH} {HEIGHT}",
        width="100%",
        role="img",
        aria_label=label,
        font_family="system-ui, sans-serif",
    )
    return mark_safe(f"{_open(head)}<title>{escape(label)}</title>{''.join(body)}</svg>")  # noqa: S308


def _axes(top_label: str, bottom_label: str) -> list[str]:
    line = dict(stroke=COLOURS["axis"], stroke_width=1)
    return [
        _tag(
            "line",
            class_="grid",
            x1=LEFT,
            y1=TOP,
            x2=LEFT + PLOT_W,
            y2=TOP,
            stroke=COLOURS["grid"],
            stroke_dasharray="3 3",
        ),
        _tag("line", class_="axis", x1=LEFT, y1=TOP, x2=LEFT, y2=BASE, **line),
        _tag("line", class_="axis", x1=LEFT, y1=BASE, x2=LEFT + PLOT_W, y2=BASE, **line),
        _text(LEFT - 6, TOP + 4, top_label, anchor="end"),
        _text(LEFT - 6, BASE, bottom_label, anchor="end"),
    ]


def _group(title: str, marks: str, **attrs: object) -> str:
    return f"{_open(_tag('g', **attrs))}<title>{escape(title)}</title>{marks}</g>"


def percent(part: int, whole: int) -> str:
    """'25%', '0.4%' (a rare failure is not rounded away), '100%'."""
    value = 100.0 * part / whole
    return f"{value:.1f}%" if 0 < value < 1 else f"{value:.0f}%"


# --- Daily failure rate ----------------------------------------------------------


def failure_rate_chart(days: Sequence[tuple[date, Counts]]) -> SafeString:
    """One slot per day, oldest on the left; the bar's height is the share of
    that day's finished runs that failed.

    A day whose runs all succeeded gets a thin green line on the axis; a day
    without runs stays empty (its hover title says "no runs").
    """
    label = f"Failed runs per day, last {len(days)} days"
    body = _axes("100%", "0%")
    if not days:
        body.append(_text(LEFT + PLOT_W / 2, TOP + PLOT_H / 2, "No data yet", anchor="middle"))
        return _svg(label, body, "chart failure-chart")
    slot = PLOT_W / len(days)
    bar_w = max(1.0, slot * 0.7)
    for i, (day, counts) in enumerate(days):
        body.append(_day(day, counts, x=LEFT + i * slot, slot=slot, bar_w=bar_w))
    body += [
        _text(LEFT, BASE + 16, f"{days[0][0]:%b %d}"),
        _text(
            LEFT + PLOT_W / 2, BASE + 16, "failed runs per day, % of finished runs", anchor="middle"
        ),
        _text(LEFT + PLOT_W, BASE + 16, f"{days[-1][0]:%b %d}", anchor="end"),
    ]
    return _svg(label, body, "chart failure-chart")


def _day(day: date, counts: Counts, *, x: float, slot: float, bar_w: float) -> str:
    total = counts.succeeded + counts.failures
    left = x + (slot - bar_w) / 2
    if not total:
        title, mark = f"{day:%a %Y-%m-%d}: no runs", ""
    else:
        plural = "run" if total == 1 else "runs"
        title = (
            f"{day:%a %Y-%m-%d}: {counts.failures} of {total} {plural} failed "
            f"({percent(counts.failures, total)})"
        )
        if counts.failures:
            height = PLOT_H * counts.failures / total
            mark = _tag(
                "rect",
                class_="bar fail",
                x=left,
                y=BASE - height,
                width=bar_w,
                height=height,
                fill=COLOURS["fail"],
            )
        else:
            mark = _tag(
                "rect",
                class_="bar clean",
                x=left,
                y=BASE - 2.0,
                width=bar_w,
                height=2,
                fill=COLOURS["ok"],
            )
    # A transparent full-height target: the title shows wherever one hovers.
    target = _tag("rect", class_="hover", x=x, y=TOP, width=slot, height=PLOT_H, fill="transparent")
    return _group(
        title,
        target + mark,
        class_="day",
        data_day=day.isoformat(),
        data_failures=counts.failures,
        data_total=total,
    )


# --- Durations -----------------------------------------------------------------------


def duration_chart(points: Sequence[RunPoint]) -> SafeString:
    """One bar per run, oldest on the left; its height is the run's duration
    against the longest one, which labels the y axis.

    Timed-out runs are drawn in their own colour with a triangle on top, so
    they stand out without relying on colour; a legend says what is what.
    """
    count = len(points)
    label = (
        f"Duration of the last {count} run{'' if count == 1 else 's'}"
        if count
        else "Duration of runs"
    )
    longest = max((p.seconds for p in points), default=0.0)
    body = _axes(in_words(timedelta(seconds=longest)) if points else "", "0 s")
    if not points:
        body.append(
            _text(LEFT + PLOT_W / 2, TOP + PLOT_H / 2, "No finished runs yet", anchor="middle")
        )
        return _svg(label, body, "chart duration-chart")
    slot = PLOT_W / max(len(points), 20)  # a handful of runs does not make giant bars
    bar_w = max(1.0, slot * 0.75)
    for i, point in enumerate(points):
        body.append(
            _run_bar(point, left=LEFT + i * slot + (slot - bar_w) / 2, bar_w=bar_w, longest=longest)
        )
    body += [
        _text(LEFT, BASE + 16, "oldest"),
        _text(LEFT + PLOT_W, BASE + 16, "newest", anchor="end"),
        *_legend(BASE + 40),
    ]
    return _svg(label, body, "chart duration-chart")


def _run_bar(point: RunPoint, *, left: float, bar_w: float, longest: float) -> str:
    height = max(1.0, PLOT_H * point.seconds / longest) if longest > 0 else 1.0
    top = BASE - height
    tone = "timeout" if point.status == TIMED_OUT else "fail" if point.status in FAILED else "ok"
    mark = _tag(
        "rect", class_=f"bar {tone}", x=left, y=top, width=bar_w, height=height, fill=COLOURS[tone]
    )
    if tone == "timeout":
        mark += _triangle(
            left + bar_w / 2, top - 2, min(5.0, max(3.0, bar_w / 2)), "marker timeout"
        )
    when = f" · started {point.started_at:%Y-%m-%d %H:%M}" if point.started_at else ""
    title = (
        f"#{point.run_id} {point.status.replace('_', ' ')} · "
        f"{in_words(timedelta(seconds=point.seconds))}{when}"
    )
    inner = f"<title>{escape(title)}</title>{mark}"
    if point.href:
        inner = f"{_open(_tag('a', href=point.href))}{inner}</a>"
    group = _tag("g", class_="run", data_status=point.status, data_run=point.run_id)
    return f"{_open(group)}{inner}</g>"


def _triangle(cx: float, bottom: float, half: float, css_class: str | None = None) -> str:
    """A downward triangle whose tip touches (cx, bottom)."""
    d = (
        f"M{_num(cx - half)} {_num(bottom - 1.6 * half)} "
        f"L{_num(cx + half)} {_num(bottom - 1.6 * half)} L{_num(cx)} {_num(bottom)} Z"
    )
    return _tag("path", class_=css_class, d=d, fill=COLOURS["timeout"])


def _legend(y: float) -> list[str]:
    items = [("ok", "succeeded"), ("fail", "failed or lost"), ("timeout", "timed out")]
    parts, x = [], float(LEFT)
    for tone, text in items:
        swatch = _tag("rect", x=x, y=y - 9, width=10, height=10, fill=COLOURS[tone])
        if tone == "timeout":
            swatch += _triangle(x + 5, y - 11, 5.0)
        parts.append(f'<g class="legend">{swatch}{_text(x + 14, y, text)}</g>')
        x += 30 + 7 * len(text)
    return parts
