"""``python -m rankshard.train`` == ``rankshard-train`` (also what ``torchrun ... -m rankshard.train`` launches)."""
from rankshard.train.cli import main

main()
