"""``rankshard-evaluate report``: one HTML page and a Markdown summary of every result and training run."""
from __future__ import annotations

from pathlib import Path

import click

from rankshard.evaluate.errors import EvaluationError, friendly_errors
from rankshard.evaluate.options import out_option
from rankshard.evaluate.report import build_report
from rankshard.preprocess.configfile import config_option


@click.command("report")
@config_option
@click.argument("results", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--runs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A rankshard-train run folder (config.json, metrics.jsonl, curves.png); repeat for several.")
@out_option("report.html (self-contained), report.md and figures/")
@friendly_errors
def command(results, runs, out):
    """Render every result in RESULTS (JSON files, or folders searched recursively) of every kind (accuracy,
    spectrum, pgd, robustness, rig, weights, svd-profile) and the training curves of --runs into OUT/report.html and
    OUT/report.md. Files that are not rendered are listed with the reason, on the page and on stderr."""
    if not results and not runs:
        raise EvaluationError("nothing to report: give result files or folders, and/or --runs RUN_DIR")
    report = build_report(results, out, runs)
    for s in report.skipped:
        click.echo(f"report: skipped {s.path}: {s.reason}", err=True)
    click.echo(f"wrote {report.html} and {report.markdown}")
