"""The ``neuron-torch`` command and its subcommands; ``python train.py`` is ``neuron-torch train``.

Nothing heavy is imported here: ``neuron-torch --help`` answers at once, and each subcommand imports what it
needs (Lightning takes seconds) only when it runs.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional

# name → (module, function, one line for --help); each function takes its arguments and returns an exit code
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("neuron_torch.cli.training", "train",
              "train a neuron (or a deeper network) from a config, tracked in MLflow; as python train.py"),
    "predict": ("neuron_torch.cli.predict", "predict",
                "score a CSV or Parquet table with a model logged by a run"),
    "sync": ("neuron_torch.cli.sync", "sync",
             "send what runs kept on disk while the tracking server was away; mark dead runs KILLED"),
}

USAGE = "usage: neuron-torch {" + ",".join(SUBCOMMANDS) + "} [options]   (neuron-torch COMMAND --help for its options)"


def _subcommand(name: str) -> Callable[[Optional[list[str]]], int]:
    module, function, _ = SUBCOMMANDS[name]
    return getattr(importlib.import_module(module), function)


def train(args: Optional[list[str]] = None) -> int:
    """``neuron-torch train``: see :func:`neuron_torch.cli.training.train`."""
    return _subcommand("train")(args)


def predict(args: Optional[list[str]] = None) -> int:
    """``neuron-torch predict``: see :func:`neuron_torch.cli.predict.predict`."""
    return _subcommand("predict")(args)


def build_cli(args: Optional[list[str]] = None):
    """The parsed config with data, model and Trainer built: see :func:`neuron_torch.cli.config.build_cli`."""
    from neuron_torch.cli import config

    return config.build_cli(args)


def help_text() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [USAGE, "", "Logistic regression as one sigmoid neuron with hand-written gradients, and deeper networks,",
             "trained in PyTorch Lightning and tracked in MLflow.", "", "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, (_, _, line) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """The ``neuron-torch`` console script. Returns (and, as a script, exits with) the command's exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0
    if argv[0] == "--version":
        from neuron_torch import __version__

        print(f"neuron-torch {__version__}")
        return 0
    name = argv[0]
    if name.startswith("-"):  # options without a command are training options, as python train.py takes them
        name, argv = "train", ["train", *argv]
    if name not in SUBCOMMANDS:
        print(f"error: unknown command {name!r}; the commands are {', '.join(SUBCOMMANDS)} "
              "(neuron-torch --help)", file=sys.stderr)
        return 2
    if name == "train":
        # LightningCLI reads sys.argv itself when given no arguments; handing it both warns on every call
        sys.argv = [f"{sys.argv[0]} train", *argv[1:]]
        return _subcommand(name)(None)
    return _subcommand(name)(argv[1:])


if __name__ == "__main__":  # python -m neuron_torch.cli.commands COMMAND ...
    sys.exit(main())
