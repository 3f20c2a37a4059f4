"""The data-evaluation subcommands of ``rankshard-evaluate`` (one module each, exposing ``command``)."""
