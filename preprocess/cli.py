"""``rankshard-preprocess``: materialize rank-k datasets into WebDataset shards, verify, list, preview, demo.

This module only holds the click group and registers the commands explicitly; each command lives in its
own module (``cli_cifar``, ``cli_images``, ``cli_tools``) and the options they share in ``options``.
"""
from __future__ import annotations

import click

from rankshard.preprocess.cli_cifar import cifar10_command
from rankshard.preprocess.cli_images import folder_command, imagenet_command, wds_command
from rankshard.preprocess.cli_tools import demo_command, ls_command, preview_command, verify_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Materialize rank-k (per-channel truncated SVD) datasets into WebDataset shards."""


for _command in (cifar10_command, imagenet_command, folder_command, wds_command, verify_command, ls_command,
                 preview_command, demo_command):
    main.add_command(_command)


if __name__ == "__main__":
    main()
