"""``python -m neuron_torch.cli.commands COMMAND ...``, as the ``neuron-torch`` script."""

import sys

from neuron_torch.cli.commands import main

sys.exit(main())
