"""``rankshard-evaluate``: accuracy, rank spectrum, PGD, RIG and weight analysis of checkpoints.

Every subcommand is registered here by name, so a reader (or a tool) can follow the CLI to its code. Data
evaluation commands live in ``evaluate/commands/``, the saliency room in ``evaluate/rig/`` and the weight
analyses in ``evaluate/weights/``.
"""
from __future__ import annotations

import click

from rankshard.evaluate.commands.accuracy import command as accuracy
from rankshard.evaluate.commands.pgd import command as pgd
from rankshard.evaluate.commands.report import command as report
from rankshard.evaluate.commands.robustness import command as robustness
from rankshard.evaluate.commands.spectrum import command as spectrum
from rankshard.evaluate.rig.command import command as rig
from rankshard.evaluate.weights.command import command as weights
from rankshard.evaluate.weights.profile_command import command as svd_profile


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Evaluate checkpoints on rank-k data: accuracy, spectrum, PGD robustness, RIG saliency, weights."""


for _command in (accuracy, spectrum, pgd, robustness, rig, weights, svd_profile, report):
    main.add_command(_command)

if __name__ == "__main__":
    main()
