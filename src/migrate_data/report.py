"""Validation results -> JSON, Markdown, HTML (one self-contained file), plain text."""

from __future__ import annotations

import datetime as dt
import html
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


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;padding:0 1.5rem;color:#1d2433;max-width:1100px}
h1{font-size:1.5rem;margin:0 0 .5rem} h2{font-size:1.1rem;margin-top:2rem}
.verdict{display:inline-block;padding:.2rem .7rem;border-radius:4px;color:#fff;font-weight:600}
.ok{background:#1f7a3e}.failed{background:#b42318}
table{border-collapse:collapse;width:100%;margin-top:.5rem} th,td{border-bottom:1px solid #e3e6ec;padding:.35rem .5rem;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap} dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}
dt{color:#5a6478} code{background:#f2f4f7;padding:0 .25rem;border-radius:3px;overflow-wrap:anywhere}
.next{border-left:4px solid #1f7a3e;background:#f0f7f2;padding:.6rem 1rem;margin:1rem 0}
.next.bad{border-color:#b42318;background:#fdf1f0} .next code{background:#fff}
.quarantine{border:2px solid #d98e04;background:#fff7e6;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}
.quarantine h2{margin-top:.3rem;color:#8a4b00}
.legend{margin:.3rem 0;color:#5a6478} .legend span{display:inline-block;width:10px;height:10px;margin:0 .3rem 0 1rem;border-radius:2px}
.rows td{vertical-align:middle} .track{position:relative;height:12px;background:#eef1f6;border-radius:2px;margin:3px 0}
.track .seg{position:absolute;top:0;bottom:0;min-width:3px} .track.src{height:8px}
.src .seg{background:#3b6fd8} .seg.t{background:#2e9e5b} .seg.r{background:#d98e04} .seg.m{background:#b42318}
.seg.d{background:repeating-linear-gradient(45deg,#b42318 0 4px,#f3b8b2 4px 8px)} .seg.x{background:#7a4fd0}
.seg.b{background:#9aa5b8} .zoom{font-size:11px;color:#5a6478;margin-top:4px}
.timeline{display:grid;grid-template-columns:minmax(8rem,16rem) 1fr max-content;gap:3px .75rem;align-items:center;margin-top:.5rem}
.timeline .label{overflow:hidden;text-overflow:ellipsis;white-space:nowrap;font-size:12px}
.timeline .lane{position:relative;height:16px;background:#f5f6f9;border-radius:2px}
.timeline .lane div{position:absolute;top:2px;bottom:2px;min-width:2px;border-radius:2px}
.timeline .took{font-size:12px;color:#5a6478;text-align:right;font-variant-numeric:tabular-nums}
.axis{display:flex;justify-content:space-between;font-size:11px;color:#5a6478}
"""

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


def timeline_html(lanes: list[tuple[str, list[tuple[str, float, float]]]], *, title: str = "") -> str:
    """A timeline that fits any width: a lane per label, a bar per (kind, start, seconds), placed in percent of the
    whole; the seconds of each lane on its right."""
    e = html.escape
    total = max([start + took for _, bars in lanes for _, start, took in bars] + [0.001])
    rows = []
    for label, bars in lanes:
        blocks = "".join(
            f"<div style='left:{100 * start / total:.2f}%;width:{100 * took / total:.2f}%;"
            f"background:{STEP_COLOURS.get(kind, '#3b6fd8')}' title='{e(kind)} {e(label)}: {took:.2f} s'></div>"
            for kind, start, took in bars
        )
        took = sum(t for _, _, t in bars)
        rows.append(
            f"<div class='label' title='{e(label)}'>{e(label)}</div><div class='lane'>{blocks}</div>"
            f"<div class='took'>{took:.1f} s</div>"
        )
    kinds = list(dict.fromkeys(kind for _, bars in lanes for kind, _, _ in bars))
    legend = "".join(f"<span style='background:{STEP_COLOURS.get(k, '#3b6fd8')}'></span>{e(k)}" for k in kinds)
    axis = f"<div></div><div class='axis'><span>0 s</span><span>{total:.1f} s</span></div><div></div>"
    return (
        f"<div class='legend' aria-label='{e(title)}'>{legend}</div>"
        f"<div class='timeline' role='img' aria-label='{e(title or 'timeline')}'>{''.join(rows)}{axis}</div>"
    )


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


def _bars(parts: list[tuple[str, int, str]], source_rows: int, lo: int, hi: int) -> tuple[str, str]:
    """The source track and the target track for rows [lo, hi) of the stacked parts, in percent of that range."""
    span = max(hi - lo, 1)
    segs, at = [], 0
    for kind, n, what in parts:
        a, b = max(at, lo), min(at + n, hi)
        at += n
        if n <= 0 or b <= a:
            continue
        segs.append(
            f"<div class='seg {kind}' style='left:{100 * (a - lo) / span:.3f}%;width:{100 * (b - a) / span:.3f}%' "
            f"title='{n:,} {what}'></div>"
        )
    src_end = min(max(source_rows - lo, 0), span)
    source = (
        f"<div class='seg' style='left:0;width:{100 * src_end / span:.3f}%' title='{source_rows:,} source rows'></div>"
        if src_end
        else ""
    )
    return source, "".join(segs)


def _table_bars(result: ValidationResult) -> str:
    """Per table, the source and what became of it, each table on its own scale.  When what is not simply copied
    is too small to see (2 missing rows of 1,000), a second pair of bars shows the last rows, magnified and
    labelled, so a failed table never shows two bars that look equal."""
    e = html.escape
    out = []
    for t in result.tables:
        parts = _parts(t)
        whole = max(t.source_rows, sum(n for _, n, _ in parts), 1)
        odd = sum(n for kind, n, _ in parts if kind not in ("t", "b"))
        source, target = _bars(parts, t.source_rows, 0, whole)
        zoom = ""
        if odd and (t.status != "ok" or odd / whole < 0.02) and odd / whole < 0.2:
            window = min(whole, max(odd * 8, 20))
            zsource, ztarget = _bars(parts, t.source_rows, whole - window, whole)
            zoom = (
                f"<div class='zoom'>the last {window:,} rows, ×{whole / window:,.0f}:</div>"
                f"<div class='track src'>{zsource}</div><div class='track'>{ztarget}</div>"
            )
        words = [f"{n:,} {what}" for kind, n, what in parts if n and kind != "t"]
        verdict = "ok" if t.status == "ok" else "failed"
        out.append(
            f"<tr><td>{e(t.target)}<br><span class='verdict {verdict}' style='font-size:11px'>{e(t.status.upper())}"
            f"</span></td><td style='width:55%'><div class='track src'>{source}</div><div class='track'>{target}</div>"
            f"{zoom}</td><td class='n'>source {t.source_rows:,}<br>target {t.target_rows:,}"
            + "".join(f"<br>{e(w)}" for w in words)
            + "</td></tr>"
        )
    return "".join(out)


def to_html(
    result: ValidationResult, *, steps: list[tuple[str, float, float]] | None = None, next_step: str | None = None
) -> str:
    """One self-contained page: the verdict and the next step first, then the steps' timeline, the rows per table
    (source against what became of it), the quarantine by cause, differences, checks and the rejected rows."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(t.source)}</td><td>{e(t.target)}</td><td class='n'>{t.source_rows:,}</td>"
        f"<td class='n'>{t.target_rows:,}</td><td class='n'>{t.rejected:,}</td>"
        f"<td><span class='verdict {'ok' if t.status == 'ok' else 'failed'}'>{e(t.status)}</span></td></tr>"
        for t in result.tables
    )
    problems = [(t.target, p) for t in result.tables for p in t.problems] + [
        (c.target, c.message) for c in result.checks if not c.ok
    ]
    diff_items = "".join(f"<li><b>{e(t)}</b>: {e(p)}</li>" for t, p in problems) or "<li>none</li>"
    samples = "".join(
        f"<tr><td>{e(t.target)}</td><td>{e(s['kind'])}</td><td><code>{e(key_text(s['key']))}</code></td>"
        f"<td>{e(', '.join(c['column'] for c in s.get('columns', [])))}</td></tr>"
        for t in result.tables
        for s in t.samples
    )
    rejects = "".join(
        f"<tr><td>{e(r['target'])}</td><td><code>{e(key_text(r['source_key']))}</code></td>"
        f"<td>{e(r['sqlstate'])}</td><td>{e(r['message'])}</td></tr>"
        for r in result.rejects
    )
    checks = "".join(
        f"<tr><td>{e(c.target)}</td><td>{e(c.name)}</td><td>{'✔' if c.ok else '✘'}</td><td>{e(c.message)}</td></tr>"
        for c in result.checks
    )
    causes = "".join(
        f"<tr><td>{e(c['target'])}</td><td class='n'>{c['n']:,}</td><td>{e(c['sqlstate'])}</td>"
        f"<td>{e(c['cause'])}</td><td><code>{e(key_text(c['example_key']))}</code></td></tr>"
        for c in result.reject_causes
    )
    quarantine = (
        f"<div class='quarantine' id='quarantined'><h2>⚠ {result.quarantined:,} rows quarantined, not copied</h2>"
        "<p>These source rows are not in the target; they are in <code>migrate_data.rejects</code>, by cause:</p>"
        "<table><tr><th>target</th><th class='n'>rows</th><th>SQLSTATE</th><th>cause</th><th>example key</th></tr>"
        f"{causes}</table></div>"
        if causes
        else ""
    )
    verdict = "PASSED" if result.ok else "FAILED"
    if next_step is None:
        next_step = (
            "nothing to fix"
            + (f"; look at the {result.quarantined:,} quarantined rows below" if result.quarantined else "")
            if result.ok
            else f"read the differences below; fix the mapping or the data, then <code>migrate-data {e(result.phase)} "
            f"--recheck</code>, or undo it: <code>migrate-data rollback {e(result.phase)}</code>"
        )
    else:
        next_step = re.sub(r"(migrate-data [^\s;,)]+(?: [^\s;,)]+)*)", r"<code>\1</code>", e(next_step))
    timeline = (
        "<h2>Steps</h2>" + timeline_html([(name, [(name, start, took)]) for name, start, took in steps], title="steps")
        if steps
        else ""
    )
    legend = "".join(
        f"<span style='background:{colour}'></span>{what}"
        for colour, what in (
            ("#3b6fd8", "source"),
            ("#2e9e5b", "in the target"),
            ("#d98e04", "quarantined"),
            ("#b42318", "missing or different"),
            ("#7a4fd0", "extra"),
            ("#9aa5b8", "there before the phase"),
        )
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{e(result.phase)} validation: {verdict}</title>
<style>{CSS}</style></head><body>
<h1>Validation of <code>{e(result.phase)}</code> <span class="verdict {"ok" if result.ok else "failed"}">{verdict}</span></h1>
<div class="next{"" if result.ok else " bad"}"><b>{"Passed" if result.ok else "Failed"}.</b> Next: {next_step}</div>
<dl><dt>database</dt><dd><code>{e(result.database)}</code></dd><dt>revision</dt><dd>{e(result.revision or "-")}</dd>
<dt>run by</dt><dd>{e(result.operator or "-")} on {e(result.host or "-")}</dd><dt>when</dt><dd>{e(result.started_at)}</dd>
<dt>took</dt><dd>{f"phase {result.run_seconds:.1f} s, " if result.run_seconds is not None else ""}validation {result.seconds:.1f} s</dd><dt>checksums</dt><dd>{"yes" if result.deep else "no (counts only)"}</dd></dl>
{timeline}
{quarantine}
<h2>Rows per table</h2>
<div class="legend">{legend}</div>
<table class="rows">{_table_bars(result)}</table>
<table><tr><th>source</th><th>target</th><th class='n'>source rows</th><th class='n'>target rows</th><th class='n'>quarantined</th><th>status</th></tr>{rows}</table>
<h2>Differences</h2><ul>{diff_items}</ul>
{f"<table><tr><th>table</th><th>kind</th><th>key</th><th>columns that differ</th></tr>{samples}</table>" if samples else ""}
<h2>Integrity checks</h2><table><tr><th>table</th><th>check</th><th>ok</th><th>result</th></tr>{checks}</table>
<h2>Rejected rows</h2>
{f"<table><tr><th>target</th><th>source key</th><th>SQLSTATE</th><th>message</th></tr>{rejects}</table>" if rejects else "<p>none</p>"}
</body></html>
"""


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
