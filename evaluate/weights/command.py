"""``rankshard-evaluate weights``: SVD of every conv/linear layer of stored checkpoints."""
from rankshard.train.checkpoint import model_from_checkpoint

from rankshard.evaluate.weights.cli import make_weights_command

command = make_weights_command(model_from_checkpoint)
