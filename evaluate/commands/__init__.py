"""One module per ``rankshard-evaluate`` subcommand, each exposing ``command``."""
