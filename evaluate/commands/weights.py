"""``rankshard-evaluate weights``: SVD of every conv/linear layer of stored checkpoints."""
from train.checkpoint import model_from_checkpoint

from ..weights_cli import make_weights_command

command = make_weights_command(model_from_checkpoint)
