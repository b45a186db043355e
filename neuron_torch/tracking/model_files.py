"""What a finished run leaves in MLflow besides metrics and figures: the weight table and the model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from neuron_torch.nn.coefficients import linear_table
from neuron_torch.nn.networks import LinearModel
from neuron_torch.tracking.loading import probability_columns
from neuron_torch.tracking.uri import fluent_tracking_uri

if TYPE_CHECKING:
    import pandas

# MLflow copies this file into the model and runs it where the model is loaded (a model from code)
PYFUNC_MODEL = Path(__file__).with_name("pyfunc_model.py")


def weight_table(module) -> "pandas.DataFrame":
    """The trained parameters as a table, on the scale the network saw (standardised features).

    Parameters
    ----------
    module : LightningModule
        Holds ``net`` (a network of :mod:`neuron_torch.nn.networks`), ``feature_names`` and ``classes``.

    Returns
    -------
    DataFrame
        Single neuron: ``feature, weight, bias``, one row per feature (n rows). Multinomial regression (k
        classes, no hidden layer): ``class, feature, weight, bias``, one row per class and feature (k·n rows,
        class by class), ``bias`` the class's. Deeper networks: one row per entry, ``parameter, row, column,
        value``.
    """
    import pandas as pd

    net = module.net
    if isinstance(net, LinearModel):
        W = net.linear.weight.detach().double().cpu().numpy()  # (k_out, n), k_out = 1 for the sigmoid unit
        b = net.linear.bias.detach().double().cpu().numpy()  # (k_out,)
        labels = module.classes[-1:] if len(W) == 1 else module.classes  # the sigmoid unit: label 1's log-odds
        table = linear_table(W, b, module.feature_names, labels, intercept="column")
        return table.drop(columns="class") if len(W) == 1 else table
    rows = []
    for name, p in net.named_parameters():
        values = p.detach().double().cpu().numpy().reshape(p.shape[0], -1)
        rows += [(name, i, j, v) for (i, j), v in np.ndenumerate(values)]
    return pd.DataFrame(rows, columns=["parameter", "row", "column", "value"])


def log_model(run, module, X_example: np.ndarray, classes: Sequence[str], config_yaml: str,
              register_as: Optional[str] = None) -> None:
    """Log the trained network to ``run`` as a pyfunc model under ``model``, from code, with no pickle.

    The model's files are written here; the run's writer logs them (:func:`log_model_files`), or keeps them in
    the run's spool while the tracking server does not answer.

    Parameters
    ----------
    run : TrackedRun
    module : NeuronModule
        The trained module: weights, standardisation statistics, feature names and hyperparameters.
    X_example : ndarray, shape (r, n)
        A few raw rows, for the input example and the signature.
    classes : sequence of str, length k
        The label of each class index (for two classes the labels mapped to 0 and to 1).
    config_yaml : str
        The resolved config, kept with the model as ``config.yaml``.
    register_as : str, optional
        Register the model under this name in the Model Registry.
    """
    folder = run.staging_folder("model")
    save_model_files(module, X_example, classes, config_yaml, folder)
    run.log_model_files(folder, register_as)


def save_model_files(module, X_example: np.ndarray, classes: Sequence[str], config_yaml: str,
                     folder: Path) -> None:
    """Write what :func:`log_model_files` logs: ``weights.pt``, ``meta.json``, ``config.yaml``,
    ``input_example.parquet`` and ``signature.json``, all plain data.

    The signature's output is what the pyfunc model returns: the probability of label 1, shape (r,), for two
    classes; the columns ``probability_<label>``, shape (r, k), for k classes.
    """
    import json

    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    hp = module.hparams
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in module.net.state_dict().items()}, folder / "weights.pt")
    meta = {"feature_names": module.feature_names, "classes": list(classes),
            "feature_mean": module.feature_mean.double().cpu().tolist(),
            "feature_std": module.feature_std.double().cpu().tolist(),
            "hidden_sizes": list(hp.hidden_sizes), "activation": hp.activation}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    (folder / "config.yaml").write_text(config_yaml)
    example = pd.DataFrame(X_example, columns=module.feature_names)
    with torch.no_grad():
        X = (torch.from_numpy(X_example).to(module.feature_mean) - module.feature_mean) / module.feature_std
        A = module.net(X.to(next(module.net.parameters()).dtype)).double().cpu().numpy()  # (r, 1) or (r, k)
    columns = probability_columns(classes)
    probability = A[:, 0] if len(classes) == 2 else pd.DataFrame(A, columns=columns)
    example.to_parquet(folder / "input_example.parquet", index=False)  # exact floats, column order kept
    # inputs typed "any": MLflow refuses an int64 column against a double spec before the model sees it
    # (and passes NaN through); the model checks every value itself, as training does (tables.feature_matrix)
    signature = infer_signature(example, probability)
    signature.inputs = Schema([ColSpec(AnyType(), name) for name in module.feature_names])
    (folder / "signature.json").write_text(json.dumps(signature.to_dict()))


def log_model_files(tracking_uri: str, run_id: str, folder: Path, register_as: Optional[str] = None) -> None:
    """Log the files of :func:`save_model_files` to the run as the pyfunc model ``model`` (also at sync)."""
    import json

    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature

    import neuron_torch

    folder = Path(folder)
    with fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        # start_run resumes our run; its final status is set again after the model
        mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_MODEL),
            artifacts={"weights": str(folder / "weights.pt"), "meta": str(folder / "meta.json"),
                       "config": str(folder / "config.yaml")},
            registered_model_name=register_as,
            code_paths=[str(Path(neuron_torch.__file__).parent)],
            signature=ModelSignature.from_dict(json.loads((folder / "signature.json").read_text())),
            input_example=pd.read_parquet(folder / "input_example.parquet"),
            pip_requirements=["torch", "pandas", "numpy", "mlflow"],
        )
