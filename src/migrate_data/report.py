"""Validation results -> JSON, Markdown, HTML (one self-contained file), plain text."""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from pathlib import Path
from typing import Any

from . import files
from .validate import ValidationResult


def to_json(result: ValidationResult) -> str:
    return json.dumps(result.to_dict(), indent=2, default=str, ensure_ascii=False)


def to_text(result: ValidationResult) -> str:
    counts = ("source rows", "target rows", "rejected")
    rows: list[dict[str, Any]] = [
        {
            "source": t.source,
            "target": t.target,
            "source rows": f"{t.source_rows:,}",
            "target rows": f"{t.target_rows:,}",
            "rejected": f"{t.rejected:,}",
            "status": t.status.upper(),
        }
        for t in result.tables
    ]
    lines = summary(rows, right=counts).splitlines() if rows else []
    lines += problem_lines(result)
    if result.reject_causes:
        lines += quarantine_lines(result)
    lines.append(verdict_line(result))
    return "\n".join(lines)


def problem_lines(result: ValidationResult) -> list[str]:
    """Each difference the validation found, with its sample keys, and each failed integrity check."""
    lines: list[str] = []
    for t in result.tables:
        lines += [f"  {t.target}: {p}" for p in t.problems]
        for s in t.samples:
            cols = ", ".join(c["column"] for c in s.get("columns", []))
            lines.append(f"    {s['kind']} key {key_text(s['key'])}" + (f" (column {cols})" if cols else ""))
    lines += [f"  {c.target}: {c.message}" for c in result.checks if not c.ok]
    return lines


def verdict_line(result: ValidationResult) -> str:
    failed = [c for c in result.checks if not c.ok]
    return (
        f"validation of {result.phase} {'PASSED' if result.ok else 'FAILED'}"
        + (" (deep)" if result.deep else "")
        + f": {len(result.tables)} tables, {len(result.checks)} integrity checks, {len(failed)} failed"
        + (f"; {result.quarantined:,} rows QUARANTINED, not copied" if result.quarantined else "")
    )


def key_text(key: list[str | None] | tuple[str | None, ...]) -> str:
    """A key for people: its parts joined, NULL shown as NULL."""
    return ", ".join("NULL" if v is None else str(v) for v in key)


def quarantine_lines(result: ValidationResult) -> list[str]:
    """The quarantined rows counted by cause (SQLSTATE and message), with an example key each."""
    causes = result.reject_causes
    tables = len({c["target"] for c in causes})
    rows = [
        {
            "target": c["target"],
            "rows": f"{c['n']:,}",
            "SQLSTATE": c["sqlstate"],
            "cause": _clip(c["cause"], 100),
            "example key": _clip(key_text(c["example_key"]), 40),
        }
        for c in causes
    ]
    head = (
        f"QUARANTINED: {result.quarantined:,} source rows of {tables} table{'s' if tables > 1 else ''} are not in "
        f"the target but in migrate_data.rejects, by cause:"
    )
    return ["", head, *("  " + line for line in summary(rows, right=("rows",)).splitlines()), ""]


def to_markdown(result: ValidationResult) -> str:
    out = [
        f"# Validation of `{result.phase}`: {'PASSED' if result.ok else 'FAILED'}",
        "",
        f"- database: `{result.database}`",
        f"- revision: `{result.revision or '-'}`",
        f"- run by: {result.operator or '-'} on {result.host or '-'}, {result.started_at}; "
        + (f"phase {result.run_seconds:.1f} s, " if result.run_seconds is not None else "")
        + f"validation {result.seconds:.1f} s",
        f"- checksums: {'yes' if result.deep else 'no (counts only)'}",
        "",
        "| source | target | source rows | target rows | rejected | status |",
        "|---|---|--:|--:|--:|---|",
    ]
    out += [
        f"| {t.source} | {t.target} | {t.source_rows:,} | {t.target_rows:,} | {t.rejected:,} | {t.status} |"
        for t in result.tables
    ]
    problems = [(t.target, p) for t in result.tables for p in t.problems]
    problems += [(c.target, c.message) for c in result.checks if not c.ok]
    if problems:
        out += ["", "## Differences", ""] + [f"- **{t}**: {p}" for t, p in problems]
    if result.reject_causes:
        out += [
            "",
            f"## Quarantined: {result.quarantined:,} rows not copied",
            "",
            "| target | rows | SQLSTATE | cause | example key |",
            "|---|--:|---|---|---|",
        ]
        out += [
            f"| {c['target']} | {c['n']:,} | {c['sqlstate']} | {_md(c['cause'])} | {_md(key_text(c['example_key']))} |"
            for c in result.reject_causes
        ]
    if result.rejects:
        out += ["", "## Rejected rows", "", "| target | source key | SQLSTATE | message |", "|---|---|---|---|"]
        out += [
            f"| {r['target']} | {_md(key_text(r['source_key']))} | {r['sqlstate']} | {_md(r['message'])} |"
            for r in result.rejects
        ]
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


TEMPLATES = Path(__file__).resolve().parent / "templates" / "html"
CSS = (TEMPLATES / "report.css").read_text()


@functools.lru_cache(maxsize=None)
def template(name: str) -> Any:
    """A report template: Mako, every ``${…}`` HTML-escaped unless it says ``| n``."""
    from mako.lookup import TemplateLookup  # Mako comes with Alembic

    lookup = TemplateLookup(directories=[str(TEMPLATES)], default_filters=["h"], strict_undefined=True)
    return lookup.get_template(name)


STEP_COLOURS = {
    "preflight": "#9aa5b8",
    "backup": "#d98e04",
    "schema": "#7a4fd0",
    "copy": "#3b6fd8",
    "validate": "#2e9e5b",
    "setup": "#9aa5b8",
    "run": "#3b6fd8",
    "rollback": "#d98e04",
    "rerun": "#2e9e5b",
    "recheck": "#7a4fd0",
}


def timeline(lanes: list[tuple[str, list[tuple[str, float, float]]]], *, title: str = "") -> dict[str, Any]:
    """A timeline that fits any width: a lane per label, a bar per (kind, start, seconds), placed in percent of the
    whole; the seconds of each lane on its right (what ``parts.mako``'s ``timeline`` draws)."""
    total = max([start + took for _, bars in lanes for _, start, took in bars] + [0.001])
    out = []
    for label, bars in lanes:
        drawn = [
            {"kind": kind, "left": f"{100 * start / total:.2f}%", "width": f"{100 * took / total:.2f}%",
             "colour": STEP_COLOURS.get(kind, "#3b6fd8"), "took": f"{took:.2f} s"}
            for kind, start, took in bars
        ]  # fmt: skip
        out.append({"label": label, "bars": drawn, "took": f"{sum(t for _, _, t in bars):.1f} s"})
    kinds = list(dict.fromkeys(kind for _, bars in lanes for kind, _, _ in bars))
    return {"title": title, "lanes": out, "total": f"{total:.1f} s",
            "kinds": [(k, STEP_COLOURS.get(k, "#3b6fd8")) for k in kinds]}  # fmt: skip


def timeline_html(lanes: list[tuple[str, list[tuple[str, float, float]]]], *, title: str = "") -> str:
    return str(template("parts.mako").get_def("timeline").render(t=timeline(lanes, title=title)))


def _parts(t: Any) -> list[tuple[str, int, str]]:
    """What became of a table's source rows, in the order the bars draw them: in the target, in it but different,
    beyond the source, there before the phase, quarantined, missing."""
    expected = max(t.source_rows - t.rejected, 0)
    beyond = max(t.target_rows - expected, 0)
    missing = max(expected - t.target_rows, 0)
    differs = min(t.differs, t.target_rows)
    extra = min(t.extra, beyond) if t.status != "ok" else 0
    before = beyond - extra
    if t.status != "ok" and not (missing or differs or extra):
        extra, before = beyond, 0  # a failed table: what is beyond the source is not explained as "there before"
    return [
        ("t", t.target_rows - differs - before - extra, "in the target"),
        ("d", differs, "in the target but different"),
        ("x", extra, "beyond the source (extra)"),
        ("b", before, "there before the phase"),
        ("r", t.rejected, "quarantined"),
        ("m", missing, "missing"),
    ]


def _bars(parts: list[tuple[str, int, str]], source_rows: int, lo: int, hi: int) -> tuple[list[dict], list[dict]]:
    """The source track and the target track for rows [lo, hi) of the stacked parts, in percent of that range."""
    span = max(hi - lo, 1)
    segs, at = [], 0
    for kind, n, what in parts:
        a, b = max(at, lo), min(at + n, hi)
        at += n
        if n <= 0 or b <= a:
            continue
        segs.append({"kind": kind, "left": f"{100 * (a - lo) / span:.3f}%", "width": f"{100 * (b - a) / span:.3f}%",
                     "title": f"{n:,} {what}"})  # fmt: skip
    src_end = min(max(source_rows - lo, 0), span)
    source = [
        {"kind": "", "left": "0", "width": f"{100 * src_end / span:.3f}%", "title": f"{source_rows:,} source rows"}
    ]
    return (source if src_end else []), segs


def _table_bars(result: ValidationResult) -> list[dict[str, Any]]:
    """Per table, the source and what became of it, each table on its own scale.  When what is not simply copied
    is too small to see (2 missing rows of 1,000), a second pair of bars shows the last rows, magnified and
    labelled, so a failed table never shows two bars that look equal."""
    out = []
    for t in result.tables:
        parts = _parts(t)
        whole = max(t.source_rows, sum(n for _, n, _ in parts), 1)
        odd = sum(n for kind, n, _ in parts if kind not in ("t", "b"))
        source, target = _bars(parts, t.source_rows, 0, whole)
        zoom = None
        if odd and (t.status != "ok" or odd / whole < 0.02) and odd / whole < 0.2:
            window = min(whole, max(odd * 8, 20))
            zsource, ztarget = _bars(parts, t.source_rows, whole - window, whole)
            zoom = {"window": f"{window:,}", "factor": f"{whole / window:,.0f}", "source": zsource, "parts": ztarget}
        out.append({
            "target": t.target, "status": t.status.upper(), "verdict": "ok" if t.status == "ok" else "failed",
            "source": source, "parts": target, "zoom": zoom, "source_rows": f"{t.source_rows:,}",
            "target_rows": f"{t.target_rows:,}", "words": [f"{n:,} {what}" for kind, n, what in parts if n and kind != "t"],
        })  # fmt: skip
    return out


LEGEND = (
    ("#3b6fd8", "source"),
    ("#2e9e5b", "in the target"),
    ("#d98e04", "quarantined"),
    ("#b42318", "missing or different"),
    ("#7a4fd0", "extra"),
    ("#9aa5b8", "there before the phase"),
)


def _next_step(result: ValidationResult, next_step: str | None) -> list[tuple[str, bool]]:
    """The next step as text pieces, each ``migrate-data …`` command marked to be shown as code."""
    if next_step is None:
        if result.ok:
            q = f"; look at the {result.quarantined:,} quarantined rows below" if result.quarantined else ""
            return [("nothing to fix" + q, False)]
        return [("read the differences below; fix the mapping or the data, then ", False),
                (f"migrate-data {result.phase} --recheck", True), (", or undo it: ", False),
                (f"migrate-data rollback {result.phase}", True)]  # fmt: skip
    pieces = re.split(r"(migrate-data [^\s;,)]+(?: [^\s;,)]+)*)", next_step)
    return [(p, i % 2 == 1) for i, p in enumerate(pieces) if p]


def to_html(
    result: ValidationResult, *, steps: list[tuple[str, float, float]] | None = None, next_step: str | None = None
) -> str:
    """One self-contained page: the verdict and the next step first, then the steps' timeline, the rows per table
    (source against what became of it), the quarantine by cause, differences, checks and the rejected rows."""
    r = result
    took = (f"phase {r.run_seconds:.1f} s, " if r.run_seconds is not None else "") + f"validation {r.seconds:.1f} s"
    return str(
        template("validation.html").render(
            r=r,
            css=CSS,
            verdict="PASSED" if r.ok else "FAILED",
            next_step=_next_step(r, next_step),
            took=took,
            timeline=timeline([(n, [(n, start, t)]) for n, start, t in steps], title="steps") if steps else None,
            legend=LEGEND,
            bars=_table_bars(r),
            key_text=key_text,
            problems=[(t.target, p) for t in r.tables for p in t.problems]
            + [(c.target, c.message) for c in r.checks if not c.ok],
            samples=[(t.target, s) for t in r.tables for s in t.samples],
        )  # fmt: skip
    )


RENDERERS = {"json": to_json, "markdown": to_markdown, "html": to_html, "text": to_text}


def render(result: ValidationResult, fmt: str) -> str:
    return RENDERERS[fmt](result)


def stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def save(result: ValidationResult, directory: Path) -> dict[str, Path]:
    """Write ``<phase>-<UTC timestamp>.json`` and ``.html`` under ``directory``; return their paths."""
    files.private_dir(directory)  # the reports list rejected rows: customer data, owner-only
    when = stamp()
    out: dict[str, Path] = {}
    for fmt, ext in (("json", "json"), ("html", "html")):
        out[fmt] = files.write_private(directory / f"{result.phase}-{when}.{ext}", render(result, fmt))
    return out


def add_run_details(
    paths: dict[str, str], result: ValidationResult, *, steps: list[tuple[str, float, float]], next_step: str
) -> None:
    """Put the run's step timeline and its next step into the reports ``save`` wrote (the steps are known only to
    whoever watched the run's events)."""
    if paths.get("html"):
        files.write_private(Path(paths["html"]), to_html(result, steps=steps, next_step=next_step), replace=True)
    if paths.get("json"):
        data = {
            **result.to_dict(),
            "steps": [{"step": n, "start": round(a, 3), "seconds": round(b, 3)} for n, a, b in steps],
            "next": next_step,
        }
        files.write_private(
            Path(paths["json"]), json.dumps(data, indent=2, default=str, ensure_ascii=False), replace=True
        )


def summary(rows: list[dict[str, Any]], *, right: tuple[str, ...] = ()) -> str:
    """A plain table of dict rows (validation, status, history); the columns named in ``right`` are right-aligned."""
    if not rows:
        return "(nothing)"
    cols = list(rows[0])
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if c in right else v.ljust(w) for c, v, w in zip(cols, values, widths, strict=True)
        ).rstrip()

    return "\n".join([line(cols), "  ".join("-" * w for w in widths), *(line(row) for row in cells)])


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _cell(v: Any) -> str:
    """A value in a text table: numbers with thousands separators, nothing for None."""
    if v is None:
        return ""
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)
