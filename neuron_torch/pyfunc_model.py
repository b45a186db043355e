"""A trained network as an MLflow pyfunc model, defined from code: loading it unpickles nothing.

MLflow copies this file (and the package, as ``code/``) into the model and executes it at load time
("models from code"): whoever can write the artifact store can change what runs here. The weights are a
tensor file read with ``torch.load(weights_only=True)``, everything else is JSON and YAML.
:func:`neuron_torch.load_model` reads the same files without running anything from the store.
``mlflow.pyfunc.load_model("runs:/<id>/model").predict(frame)`` takes raw features by column name (integer
or float columns) and returns the probability of label 1.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd


class NeuronModel(mlflow.pyfunc.PythonModel):
    """Standardise raw features with the training split's statistics, then run the network."""

    def load_context(self, context) -> None:
        from neuron_torch.loading import predictor_from_files

        self.predictor = predictor_from_files(context.artifacts["weights"], context.artifacts["meta"],
                                              context.artifacts.get("config"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        """Probability of label 1 (``classes[1]``) for each row, shape (m,).

        Rows are checked as training checks them: a missing, non-finite, non-numeric or too large value
        raises ``DataError`` naming the column and row, rather than scoring NaN.
        """
        return self.predictor.predict_proba(model_input)


mlflow.models.set_model(NeuronModel())
