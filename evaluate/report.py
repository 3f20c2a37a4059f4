"""``rankshard-evaluate report``: every result (any kind, see ``evaluate.results``) and training run as one
self-contained HTML page (figures embedded as base64 PNG) and a Markdown summary (figures as PNG files in
``OUT/figures/``). Whatever is not rendered is listed with its reason, on the page and to the caller."""
from __future__ import annotations

import base64
import html
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rankshard.evaluate.errors import EvaluationError
from rankshard.evaluate.renderers import RENDERERS, Figures, Section, run_section
from rankshard.evaluate.results import Skipped, read_results
from rankshard.evaluate.tables import Table, markdown_table

# Kinds in page order; a kind missing here but present in RENDERERS still renders, after these.
ORDER = ("accuracy", "spectrum", "pgd", "robustness", "rig", "weights", "svd-profile")


@dataclass
class Report:
    """What ``build_report`` wrote, and what it did not render (and why)."""

    html: Path
    markdown: Path
    skipped: list[Skipped] = field(default_factory=list)


def _by_kind(results: list[dict], skipped: list[Skipped]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r.get("kind") in RENDERERS:
            groups.setdefault(r["kind"], []).append(r)
        else:
            skipped.append(Skipped(r["path"], f"unknown kind {r.get('kind')!r} (known: {', '.join(RENDERERS)})"))
    return groups


# What a hand-edited, truncated or older result raises when a renderer reads a field it lacks or of another type.
MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError)


def _malformed(kind: str, result: dict, exc: Exception) -> Skipped:
    return Skipped(result["path"], f"malformed {kind} result ({type(exc).__name__}: {exc})")


# What makes two evaluations "the same checkpoint" where a kind merges its results into one table, curve set and
# paired test: per row (accuracy, pgd) or per result (spectrum: one checkpoint a file). Two result files giving one
# key -- `best.pt` of two runs, each evaluated alone -- would otherwise show as one checkpoint, the later silently
# replacing the earlier. Kinds not named here render each result on its own and cannot clash.
ROW_KEYS = {
    "accuracy": lambda r, row: (row["data"], row["checkpoint"]),
    "pgd": lambda r, row: (row["data"], json.dumps(r["attack"], sort_keys=True), row["checkpoint"]),
}
RESULT_KEYS = {"spectrum": lambda r: (r["data"], r["mode"], r["checkpoint"])}


def _clash(name: str, where: str, first: str) -> str:
    return (f"checkpoint name {name!r} ({where}) is also in {first}: left out, since two checkpoints of one name "
            "would show as one; evaluate with distinct labels (NAME=PATH)")


def _first_of_each_name(kind: str, results: list[dict], skipped: list[Skipped]) -> list[dict]:
    """``results`` without a checkpoint name already given by an earlier file (listed in ``skipped``)."""
    seen: dict[tuple, str] = {}
    kept = []
    for r in results:
        try:
            r = _without_seen_rows(kind, r, seen, skipped)
        except MALFORMED:
            pass  # the renderer names what is malformed
        if r is not None:
            kept.append(r)
    return kept


def _without_seen_rows(kind: str, r: dict, seen: dict[tuple, str], skipped: list[Skipped]) -> dict | None:
    if kind in RESULT_KEYS:
        key = RESULT_KEYS[kind](r)
        if key in seen:
            skipped.append(Skipped(r["path"], _clash(key[-1], f"{key[1]} rank on {key[0]}", seen[key])))
            return None
        seen[key] = r["path"]
        return r
    if kind not in ROW_KEYS:
        return r
    rows = []
    for row in r["rows"]:
        key = ROW_KEYS[kind](r, row)
        if key in seen:
            skipped.append(Skipped(r["path"], _clash(key[-1], f"{kind} on {key[0]}", seen[key])))
            continue
        seen[key] = r["path"]
        rows.append(row)
    return {**r, "rows": rows} if rows else None


def _render(kind: str, results: list[dict], figs: Figures) -> list[Section]:
    """The kind's sections; a malformed result is skipped by name without taking the others down with it."""
    noted, drawn = len(figs.skipped), set(figs.folder.iterdir())
    try:
        return RENDERERS[kind](results, figs)
    except MALFORMED as exc:
        group_error = exc
        del figs.skipped[noted:]  # what the failed attempt noted is noted again by the next one
        for leftover in set(figs.folder.iterdir()) - drawn:  # and what it drew is drawn again
            leftover.unlink()
    # Renderers merge every result of a kind (accuracy, spectrum, pgd), so one bad file fails the group: find
    # the bad ones by rendering each alone (into a scratch folder), then render the rest together.
    good = []
    for r in results:
        with tempfile.TemporaryDirectory() as scratch:
            try:
                RENDERERS[kind]([r], Figures(Path(scratch)))
                good.append(r)
            except MALFORMED as exc:
                figs.skipped.append(_malformed(kind, r, exc))
    if good and len(good) < len(results):
        return _render(kind, good, figs)
    # every one failed alone, or each renders alone but not together: nothing here can be trusted
    figs.skipped.extend(_malformed(kind, r, group_error) for r in good)
    return []


def _run_sections(runs: Sequence[str | os.PathLike], figs: Figures) -> list[Section]:
    sections = []
    for run in map(Path, runs):
        try:
            sec = run_section(run, figs)
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            figs.skipped.append(Skipped(str(run), f"unreadable training run ({type(exc).__name__}: {exc})"))
            continue
        sections += [sec] if sec else []
    return sections


def collect_sections(sources: Sequence[str | os.PathLike], runs: Sequence[str | os.PathLike], figures: Path
                     ) -> tuple[list[dict], list[Section], list[Skipped]]:
    """Results found in ``sources``, the sections built from them and from ``runs``, and what was skipped."""
    results, skipped = read_results(sources)
    figs = Figures(figures, skipped)
    groups = _by_kind(results, skipped)
    kinds = [k for k in ORDER if k in groups] + [k for k in groups if k not in ORDER]
    groups = {kind: _first_of_each_name(kind, members, skipped) for kind, members in groups.items()}
    sections = [sec for kind in kinds if groups[kind] for sec in _render(kind, groups[kind], figs)]
    return results, sections + _run_sections(runs, figs), skipped


def _skipped_section(skipped: list[Skipped]) -> list[Section]:
    rows = [{"file": s.path, "reason": s.reason} for s in skipped]
    return [Section("Skipped", ["Files found but not rendered, with the reason."], [Table(rows)])] if rows else []


def _html_table(table: Table) -> str:
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    if not table.rows:
        return f"<table>{caption}</table><p><em>no results</em></p>"
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>"
                   for r in table.rows)
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}"></figure>'


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}caption{text-align:left;color:#444;padding:2px 0}img{max-width:100%}.meta{color:#666}")


def render_html(sections: list[Section], sources: list[str]) -> str:
    """The whole page; figures are inlined, so the file can be mailed or attached as is."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>rankshard evaluation report</title>"
             f"<style>{_CSS}</style></head><body><h1>rankshard evaluation report</h1>",
             f"<p class='meta'>generated {time.strftime('%Y-%m-%d %H:%M')} from {len(sources)} result files</p>"]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        parts += [f"<p>{html.escape(t)}</p>" for t in sec.text]
        parts += [_html_figure(f) for f in sec.figures] + [_html_table(t) for t in sec.tables]
    parts.append("<h2>Sources</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in sources) + "</ul></body></html>")
    return "\n".join(parts)


def _markdown_table(table: Table) -> str:
    return (f"\n_{table.caption}_\n\n" if table.caption else "\n") + markdown_table(table.rows)


def render_markdown(sections: list[Section], sources: list[str], base: Path) -> str:
    """The same content as Markdown; figures linked relative to ``base`` (the summary's folder)."""
    parts = ["# rankshard evaluation report", "", f"{len(sources)} result files."]
    for sec in sections:
        parts += ["", f"## {sec.title}", ""] + sec.text
        parts += [f"![{f.stem}]({f.relative_to(base)})" for f in sec.figures]
        parts += [_markdown_table(t) for t in sec.tables]
    parts += ["", "## Sources", ""] + [f"- {s}" for s in sources]
    return "\n".join(parts) + "\n"


def build_report(sources: Sequence[str | os.PathLike], out: str | os.PathLike,
                 runs: Sequence[str | os.PathLike] = ()) -> Report:
    """Write ``OUT/report.html`` and ``OUT/report.md`` (+ ``OUT/figures/``) from result files or folders
    ``sources`` and training run folders ``runs``."""
    out = Path(out)
    figures = out / "figures"
    if figures.is_dir():  # a previous report's figures would be renamed, not replaced: start clean
        for old in figures.glob("*.png"):
            old.unlink()
    figures.mkdir(parents=True, exist_ok=True)
    results, sections, skipped = collect_sections(sources, runs, figures)
    if not sections:
        raise EvaluationError(f"nothing to report in {', '.join(map(str, [*sources, *runs]))}: no "
                              f"rankshard-eval/1 result renders ({len(skipped)} file(s) skipped); run an evaluate "
                              f"subcommand with --out there, or pass a training run with --runs")
    sections += _skipped_section(skipped)
    sources_list = [r["path"] for r in results] + [str(r) for r in runs]
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(render_html(sections, sources_list))
    md_path.write_text(render_markdown(sections, sources_list, out))
    return Report(html_path, md_path, skipped)
