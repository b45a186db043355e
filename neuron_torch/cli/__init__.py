"""The commands: ``neuron-torch`` and its subcommands (:mod:`neuron_torch.cli.commands.commands`), the config, its
validation, one training run start to end, sweeps, prediction, sync and the summaries."""
