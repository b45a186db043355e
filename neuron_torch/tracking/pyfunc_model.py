"""A trained network as an MLflow pyfunc model, defined from code: loading it unpickles nothing.

MLflow copies this file (and the package, as ``code/``) into the model and executes it at load time
("models from code"): whoever can write the artifact store can change what runs here. The weights are a
tensor file read with ``torch.load(weights_only=True)``, everything else is JSON and YAML.
:func:`neuron_torch.load_model` reads the same files without running anything from the store.
``mlflow.pyfunc.load_model("runs:/<id>/model").predict(frame)`` takes raw features by column name (integer
or float columns) and returns, for two classes, the probability of label 1 (an array); for k classes a frame of
``probability_<label>`` columns, one per class.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd


class NeuronModel(mlflow.pyfunc.PythonModel):
    """Standardise raw features with the training split's statistics, then run the network."""

    def load_context(self, context) -> None:
        from neuron_torch.tracking.loading import predictor_from_files

        self.predictor = predictor_from_files(context.artifacts["weights"], context.artifacts["meta"],
                                              context.artifacts.get("config"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray | pd.DataFrame:
        """Predicted probabilities of each row.

        Returns
        -------
        ndarray, shape (m,), or DataFrame, shape (m, k)
            Two classes: the probability of label 1 (``classes[1]``). k classes: column ``probability_<label>``
            holds the probability of that class (each row sums to 1), in the order of ``classes``; the index
            is the input's.

        Rows are checked as training checks them: a missing, non-finite, non-numeric or too large value
        raises ``DataError`` naming the column and row, rather than scoring NaN.
        """
        probability = self.predictor.predict_proba(model_input)
        if not self.predictor.multiclass:
            return probability
        # named columns: a bare (m, k) array would leave the caller to know the class order
        index = model_input.index if isinstance(model_input, pd.DataFrame) else None
        return pd.DataFrame(probability, columns=self.predictor.probability_columns(), index=index)


mlflow.models.set_model(NeuronModel())
