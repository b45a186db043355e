"""neuron_torch: logistic regression as one sigmoid neuron with hand-written gradients, and deeper networks
on the same machinery, trained in PyTorch Lightning and tracked in MLflow."""

from neuron_torch.loading import NeuronPredictor, load_model
from neuron_torch.networks import BackwardPass, DeepNetwork, HandBackprop, SingleNeuron

__all__ = ["BackwardPass", "DeepNetwork", "HandBackprop", "NeuronPredictor", "SingleNeuron", "load_model"]
__version__ = "0.1.0"
