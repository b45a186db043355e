"""Train a hand-written sigmoid neuron (or a deeper network) tracked in MLflow.

    python train.py                                  # configs/default.yaml
    python train.py --config configs/deep.yaml       # another config, on top of the default
    python train.py --model.learning_rate 0.1 --trainer.max_steps 2000
    python train.py --print_config                   # the resolved config

The steps, in order, are in ``neuron_torch.cli.training.train``: config → seed → data → model → tracking → fit →
test → summary.
"""

import sys

from neuron_torch.cli.commands import train

if __name__ == "__main__":
    sys.exit(train())
