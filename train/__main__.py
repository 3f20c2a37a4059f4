"""``python -m train`` == ``rankshard-train`` (also what ``torchrun ... -m train`` launches)."""
from train.cli import main

main()
