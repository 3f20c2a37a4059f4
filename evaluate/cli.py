"""``rankshard-evaluate``: accuracy, rank spectrum, PGD, RIG and weight analysis of checkpoints.

Each subcommand lives in its own module under ``evaluate/commands/`` and exposes ``command`` (a click
command); the group discovers them, so adding an analysis never touches this file.
"""
from __future__ import annotations

import importlib
import pkgutil

import click

from . import commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Evaluate checkpoints on rank-k data: accuracy, spectrum, PGD robustness, RIG saliency, weights."""


for _info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
    main.add_command(importlib.import_module(f"{commands.__name__}.{_info.name}").command)

if __name__ == "__main__":
    main()
