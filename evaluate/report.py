"""``rankshard-evaluate report``: every result under some folders as one self-contained HTML page (figures
embedded as base64 PNG) and a Markdown summary (figures as PNG files next to it)."""
from __future__ import annotations

import base64
import html
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rankshard.evaluate.errors import EvaluationError
from rankshard.evaluate.plots import curve_from_rows, plot_gaps, plot_spectra
from rankshard.evaluate.results import read_results, safe_name
from rankshard.evaluate.tables import accuracy_table_rows, markdown_table, pgd_table_rows, spectrum_table_rows


@dataclass
class Section:
    """A titled part of the report: prose, tables (row dicts) and figure files."""

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[list[dict]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def _accuracy_section(results: list[dict]) -> Section | None:
    rows = [row for r in results if r["kind"] == "accuracy" for row in r["rows"]]
    return Section("Accuracy", tables=[accuracy_table_rows(rows)]) if rows else None


def _spectrum_sections(results: list[dict], figures: Path) -> list[Section]:
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in results:
        if r["kind"] == "spectrum":
            groups.setdefault((r["data"], r["mode"]), {})[r["checkpoint"]] = r["rows"]
    sections = []
    for (data, mode), series in sorted(groups.items()):
        stem = figures / f"spectrum-{safe_name(data)}-{mode}"
        curves = [curve_from_rows(name, rows) for name, rows in series.items()]
        sec = Section(f"Rank spectrum ({mode} rank) on {data}",
                      [f"Algorithm 1: top-1 of each checkpoint on rank-k inputs ({len(curves)} checkpoints, "
                       f"{next(iter(series.values()))[0]['count']} images)."])
        sec.figures.append(plot_spectra(curves, mode, f"{mode}-rank spectrum on {data}", stem.with_suffix(".png")))
        if len(curves) > 1:
            sec.figures.append(plot_gaps(curves, mode, f"top-1 gap vs {curves[0].name} on {data}",
                                         stem.with_name(stem.name + "-gap.png")))
        n_ranks = len(next(iter(series.values())))
        sec.tables.append(spectrum_table_rows(series, every=max(1, n_ranks // 12)))
        sections.append(sec)
    return sections


def _pgd_sections(results: list[dict]) -> list[Section]:
    sections = []
    for r in results:
        if r["kind"] == "pgd":
            a = r["attack"]
            what = (f"{'targeted' if a['targeted'] else 'untargeted'} PGD-{a['steps']}, {a['norm']} eps={a['eps']:.5g}, "
                    f"step {a['alpha']:.5g}, {a['restarts']} restart(s), seed {a['seed']} ({r['path']})")
            sections.append(Section("PGD robustness", [what], [pgd_table_rows(r["rows"])]))
    return sections


def collect_sections(folders: Sequence[str | os.PathLike], figures: Path) -> tuple[list[dict], list[Section]]:
    """All result JSONs under ``folders`` and the report sections built from them."""
    results = read_results(folders)
    sections = [s for s in [_accuracy_section(results)] if s]
    sections += _spectrum_sections(results, figures) + _pgd_sections(results)
    return results, sections


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p><em>no results</em></p>"
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}"></figure>'


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}img{max-width:100%}.meta{color:#666}")


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


def render_markdown(sections: list[Section], sources: list[str], base: Path) -> str:
    """The same content as Markdown; figures linked relative to ``base`` (the summary's folder)."""
    parts = ["# rankshard evaluation report", "", f"{len(sources)} result files."]
    for sec in sections:
        parts += ["", f"## {sec.title}", ""] + sec.text
        parts += [f"![{f.stem}]({f.relative_to(base)})" for f in sec.figures]
        parts += ["\n" + markdown_table(t) for t in sec.tables]
    parts += ["", "## Sources", ""] + [f"- {s}" for s in sources]
    return "\n".join(parts) + "\n"


def build_report(folders: Sequence[str | os.PathLike], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``OUT/report.html`` and ``OUT/report.md`` (+ ``OUT/figures/``); returns both paths."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    results, sections = collect_sections(folders, out / "figures")
    if not results:
        raise EvaluationError(f"no evaluation results (JSON with format rankshard-eval/1) under "
                              f"{', '.join(map(str, folders))}; run accuracy/spectrum/pgd with --out there first")
    sources = [r["path"] for r in results]
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(render_html(sections, sources))
    md_path.write_text(render_markdown(sections, sources, out))
    return html_path, md_path
