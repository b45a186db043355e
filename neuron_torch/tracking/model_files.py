"""What a finished run leaves in MLflow besides metrics: the weight table, the model and the figures."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from neuron_torch.tracking.run import MLflowTracking, TrackedRun, fluent_tracking_uri

if TYPE_CHECKING:
    import pandas


def weight_table(module) -> "pandas.DataFrame":
    """The trained parameters as a table.

    Returns
    -------
    DataFrame
        Single neuron: ``feature, weight, bias``, one row per feature (n rows). Multinomial regression (k
        classes, no hidden layer): ``class, feature, weight, bias``, one row per class and feature (k·n rows,
        class by class), ``bias`` the class's. Deeper networks: one row per entry, ``parameter, row, column,
        value``.
    """
    import pandas as pd

    from neuron_torch.nn.networks import SingleNeuron, SoftmaxRegression

    net = module.net
    if isinstance(net, SingleNeuron):
        w = net.linear.weight.detach().double().cpu().numpy()[0]
        b = float(net.linear.bias.detach().double().cpu())
        return pd.DataFrame({"feature": module.feature_names, "weight": w, "bias": b})
    if isinstance(net, SoftmaxRegression):
        W = net.linear.weight.detach().double().cpu().numpy()  # (k, n)
        b = net.linear.bias.detach().double().cpu().numpy()  # (k,)
        k, n = W.shape
        return pd.DataFrame({"class": np.repeat(module.classes, n), "feature": np.tile(module.feature_names, k),
                             "weight": W.reshape(-1), "bias": np.repeat(b, n)})
    rows = []
    for name, p in net.named_parameters():
        values = p.detach().double().cpu().numpy().reshape(p.shape[0], -1)
        rows += [(name, i, j, v) for (i, j), v in np.ndenumerate(values)]
    return pd.DataFrame(rows, columns=["parameter", "row", "column", "value"])


def log_model(run: TrackedRun, module, X_example: np.ndarray, classes: Sequence[str], config_yaml: str,
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

    from neuron_torch.tracking.loading import probability_columns

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
    from neuron_torch.tracking import pyfunc_model

    folder = Path(folder)
    with fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        # start_run resumes our run; its final status is set again after the model
        mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc_model.__file__,
            artifacts={"weights": str(folder / "weights.pt"), "meta": str(folder / "meta.json"),
                       "config": str(folder / "config.yaml")},
            registered_model_name=register_as,
            code_paths=[str(Path(neuron_torch.__file__).parent)],
            signature=ModelSignature.from_dict(json.loads((folder / "signature.json").read_text())),
            input_example=pd.read_parquet(folder / "input_example.parquet"),
            pip_requirements=["torch", "pandas", "numpy", "mlflow"],
        )


def log_figures(run: TrackedRun, tracker: MLflowTracking, module, datamodule) -> None:
    """Loss curves, w/b trajectories, ROC and confusion matrix of the test split, and the decision boundary
    for two-feature data, as PNG artifacts under ``plots/``.

    Two classes: one ROC curve of label 1, a 2×2 confusion matrix at threshold 0.5. k classes: one-vs-rest ROC
    curves (one per class present among the test rows with some rows of other classes), a k×k confusion
    matrix of the most probable class.
    """
    import pandas as pd

    from neuron_torch.tracking import figures as plots

    history = tracker.history()
    if len(history):
        run.log_figure(plots.loss_curves(history, pd.DataFrame(tracker.validation)), "plots/loss_curves.png")
        run.log_figure(plots.trajectories(history), "plots/trajectories.png")
    X_raw, y = datamodule.raw_split("test")
    probability = module.predict_proba(torch.from_numpy(X_raw)).double().cpu().numpy()  # (m, 1) or (m, k)
    classes = list(datamodule.classes)
    if len(classes) == 2:
        probability = probability[:, 0]  # (m,) of label 1
    if len(np.unique(y)) >= 2:  # a ROC curve needs positives and negatives among the test rows
        run.log_figure(plots.roc_curve(y, probability, classes), "plots/roc.png")
    run.log_figure(plots.confusion_matrix(y, probability, classes), "plots/confusion_matrix.png")
    if len(module.feature_names) == 2:
        run.log_figure(plots.decision_boundary(module, *datamodule.raw_split("train"), module.feature_names,
                                               classes), "plots/decision_boundary.png")
