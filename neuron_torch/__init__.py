"""neuron_torch: logistic regression as one sigmoid neuron with hand-written gradients, and deeper networks
on the same machinery, trained in PyTorch Lightning and tracked in MLflow.

The public names are imported when first used, so ``neuron-torch --help`` does not wait for torch.
"""

from __future__ import annotations

import importlib

# public name → the module that defines it
_PUBLIC = {"BackwardPass": "neuron_torch.nn.networks", "DeepNetwork": "neuron_torch.nn.networks",
           "HandBackprop": "neuron_torch.nn.networks", "SingleNeuron": "neuron_torch.nn.networks",
           "SoftmaxRegression": "neuron_torch.nn.networks", "build_network": "neuron_torch.nn.networks",
           "NeuronPredictor": "neuron_torch.tracking.loading", "load_model": "neuron_torch.tracking.loading",
           "NeuronClassifier": "neuron_torch.sklearn"}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'neuron_torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
