"""``rankshard-evaluate report``: one HTML page and a Markdown summary of every result in some folders."""
from __future__ import annotations

from pathlib import Path

import click

from rankshard.evaluate.errors import friendly_errors
from rankshard.evaluate.report import build_report


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for report.html, report.md and figures/.")
@friendly_errors
def command(runs, out):
    """Collect every accuracy/spectrum/PGD result under RUN... into OUT/report.html (self-contained) and
    OUT/report.md."""
    html_path, md_path = build_report(runs, out)
    click.echo(f"wrote {html_path} and {md_path}")
