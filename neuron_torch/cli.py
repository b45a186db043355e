"""The ``neuron-torch`` command: ``train`` (the default, as ``python train.py``) and ``predict``."""

from __future__ import annotations

import sys

from neuron_torch.config import build_cli  # noqa: F401  (tests and benchmarks build the CLI through here)
from neuron_torch.predict import predict
from neuron_torch.training import train

__all__ = ["main", "predict", "train"]


def main() -> None:
    """The ``neuron-torch`` console script: ``neuron-torch train [options]`` or ``neuron-torch predict ...``."""
    argv = sys.argv[1:]
    if argv and argv[0] == "predict":
        sys.exit(predict(argv[1:]))
    if argv and argv[0] == "train":
        argv = argv[1:]
    sys.exit(train(argv))
