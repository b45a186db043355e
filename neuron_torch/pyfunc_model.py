"""A trained network as an MLflow pyfunc model, defined from code: loading it runs no pickle.

MLflow copies this file into the model and executes it at load time ("models from code"); the weights are
a tensor file read with ``torch.load(weights_only=True)`` and everything else is JSON.
``mlflow.pyfunc.load_model("runs:/<id>/model").predict(frame)`` takes raw features by column name and
returns the probability of label 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch


class NeuronModel(mlflow.pyfunc.PythonModel):
    """Standardise raw features with the training split's statistics, then run the network."""

    def load_context(self, context) -> None:
        from neuron_torch.networks import DeepNetwork, SingleNeuron

        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.features = meta["feature_names"]
        self.classes = meta["classes"]
        self.mean = torch.tensor(meta["feature_mean"], dtype=torch.float64)
        self.std = torch.tensor(meta["feature_std"], dtype=torch.float64)
        n = len(self.features)
        if meta["hidden_sizes"]:
            self.net = DeepNetwork(n, meta["hidden_sizes"], meta["activation"], init="xavier")
        else:
            self.net = SingleNeuron(n)
        self.net.load_state_dict(torch.load(context.artifacts["weights"], weights_only=True))
        self.net.double().eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        """Probability of label 1 (``classes[1]``) for each row, shape (m,)."""
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        missing = [c for c in self.features if c not in model_input.columns]
        if missing:
            raise ValueError(f"input lacks feature column(s) {', '.join(map(repr, missing))}; the model needs "
                             f"{len(self.features)}: {', '.join(self.features)}")
        X = torch.tensor(model_input[self.features].to_numpy(dtype=np.float64))
        with torch.no_grad():
            return self.net((X - self.mean) / self.std)[:, 0].numpy()


mlflow.models.set_model(NeuronModel())
