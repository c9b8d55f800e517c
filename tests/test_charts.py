"""The server-side SVG charts: pure functions, data in and markup out."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import date, timedelta

from jobs import charts
from jobs.stats import Rate

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    """The chart must be well-formed XML (an unescaped '<' or '&' would fail here)."""
    return ET.fromstring(svg)


def days(*rates: Rate) -> list[tuple[date, Rate]]:
    first = date(2027, 1, 1)
    return [(first + timedelta(days=i), rate) for i, rate in enumerate(rates)]


def bars(root: ET.Element, css_class: str) -> list[ET.Element]:
    return [
        el for el in root.iter(f"{SVG}rect") if css_class in el.get("class", "").split() and
        "bar" in el.get("class", "").split()
    ]  # fmt: skip


def groups(root: ET.Element, css_class: str) -> list[ET.Element]:
    return [el for el in root.iter(f"{SVG}g") if el.get("class") == css_class]


def title_of(el: ET.Element) -> str:
    return el.find(f"{SVG}title").text


# --- Failure rate ----------------------------------------------------------------


def test_failure_bar_height_is_the_failed_share_of_the_day():
    root = parse(charts.failure_rate_chart(days(Rate(3, 1), Rate(0, 4), Rate(1, 1))))

    heights = [float(b.get("height")) for b in bars(root, "fail")]
    assert heights == [charts.PLOT_H * 0.25, charts.PLOT_H, charts.PLOT_H * 0.5]
    # Bars stand on the axis.
    for bar in bars(root, "fail"):
        assert float(bar.get("y")) + float(bar.get("height")) == charts.BASE


def test_failure_chart_has_a_slot_per_day_and_leaves_days_without_runs_empty():
    root = parse(charts.failure_rate_chart(days(Rate(5, 0), Rate(0, 0), Rate(2, 2))))

    slots = groups(root, "day")
    assert len(slots) == 3
    assert [title_of(g) for g in slots] == [
        "Fri 2027-01-01: 0 of 5 runs failed (0%)",
        "Sat 2027-01-02: no runs",
        "Sun 2027-01-03: 2 of 4 runs failed (50%)",
    ]
    # A clean day is a thin green line; an empty day draws no bar at all.
    assert [b.get("class") for b in slots[0].iter(f"{SVG}rect") if b.get("class") != "hover"] == [
        "bar clean"
    ]
    assert [b.get("class") for b in slots[1].iter(f"{SVG}rect")] == ["hover"]


def test_failure_chart_labels_its_axes():
    svg = charts.failure_rate_chart(days(*[Rate(1, 0)] * 30))

    texts = [t.text for t in parse(svg).iter(f"{SVG}text")]
    assert {"100%", "0%", "Jan 01", "Jan 30"} <= set(texts)
    assert any("per day" in t for t in texts)


def test_rare_failure_is_not_rounded_away_in_the_title():
    root = parse(charts.failure_rate_chart(days(Rate(999, 1))))

    assert title_of(groups(root, "day")[0]).endswith("1 of 1000 runs failed (0.1%)")


def test_failure_chart_without_days_says_so():
    root = parse(charts.failure_rate_chart([]))

    assert not groups(root, "day")
    assert "No data yet" in [t.text for t in root.iter(f"{SVG}text")]


# --- Durations ---------------------------------------------------------------------


def point(run_id: int, seconds: float, status: str = "succeeded", **kw) -> charts.RunPoint:
    return charts.RunPoint(run_id=run_id, status=status, seconds=seconds, **kw)


def test_duration_bars_scale_to_the_longest_run_which_labels_the_axis():
    root = parse(charts.duration_chart([point(1, 30), point(2, 184), point(3, 92)]))

    heights = [float(b.get("height")) for b in bars(root, "ok")]
    assert heights == [round(charts.PLOT_H * 30 / 184, 2), charts.PLOT_H, charts.PLOT_H / 2]
    assert "3 min 4 s" in [t.text for t in root.iter(f"{SVG}text")]


def test_timed_out_runs_have_their_own_colour_marker_and_legend():
    root = parse(
        charts.duration_chart([point(1, 5), point(2, 60, "timed_out"), point(3, 7, "failed")])
    )

    runs = groups(root, "run")
    assert [g.get("data-status") for g in runs] == ["succeeded", "timed_out", "failed"]
    timeout_bar = bars(root, "timeout")
    assert len(timeout_bar) == 1
    assert timeout_bar[0].get("fill") not in {b.get("fill") for b in bars(root, "ok")}
    assert timeout_bar[0].get("fill") not in {b.get("fill") for b in bars(root, "fail")}
    markers = [p for p in runs[1].iter(f"{SVG}path") if "marker" in p.get("class", "")]
    assert len(markers) == 1 and not list(runs[0].iter(f"{SVG}path"))
    legend = [t.text for g in groups(root, "legend") for t in g.iter(f"{SVG}text")]
    assert legend == ["succeeded", "failed or lost", "timed out"]


def test_duration_bars_link_to_their_runs_and_say_what_they_show():
    root = parse(charts.duration_chart([point(41, 3.5, href="/runs/41/")]))

    link = next(root.iter(f"{SVG}a"))
    assert link.get("href") == "/runs/41/"
    assert title_of(link) == "#41 succeeded · 3.5 s"


def test_a_zero_second_run_is_still_visible():
    root = parse(charts.duration_chart([point(1, 0.0), point(2, 0.0)]))

    assert [float(b.get("height")) for b in bars(root, "ok")] == [1.0, 1.0]


def test_chart_text_is_escaped():
    evil = '"><script>alert(1)</script>&'
    svg = charts.duration_chart([point(1, 2.0, status=evil, href='/x?a=1&b="2"')])

    assert "<script>" not in svg
    root = parse(svg)
    group = groups(root, "run")[0]
    assert group.get("data-status") == evil
    assert next(root.iter(f"{SVG}a")).get("href") == '/x?a=1&b="2"'


def test_duration_chart_without_runs_says_so():
    svg = charts.duration_chart([])

    root = parse(svg)
    assert not groups(root, "run")
    assert "No finished runs yet" in [t.text for t in root.iter(f"{SVG}text")]
    assert re.search(r'viewBox="0 0 \d+ \d+" width="100%"', svg)
