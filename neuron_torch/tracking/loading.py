"""Load a logged model without running any code from the artifact store.

``mlflow.pyfunc.load_model`` executes the model's Python file and puts its copied ``code/`` folder on the
import path (MLflow's design: whoever can write the store can run code where the model is loaded). This
loader reads only three data files of the model (``weights.pt`` with ``torch.load(weights_only=True)``,
``meta.json`` and ``config.yaml`` with a safe YAML parser) and builds the network from the installed
``neuron_torch`` package.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from neuron_torch.data.tables import feature_matrix
from neuron_torch.errors import DataError, ModelLoadError, first_line
from neuron_torch.tracking.uri import fluent_tracking_uri

if TYPE_CHECKING:
    import pandas

# the files log_model writes, relative to the model's root (pyfunc keeps artifacts under artifacts/)
FILES = ("weights.pt", "meta.json", "config.yaml")
SUBFOLDER = "artifacts"


class NeuronPredictor:
    """A trained network with its standardisation and labels: raw features in, probabilities or labels out.

    Parameters
    ----------
    net : HandBackprop
        The network (float64, eval mode), weights already loaded: one sigmoid output unit for two classes,
        k softmax units for k > 2.
    meta : dict
        ``feature_names`` (n), ``classes`` (the label of each class index: for two classes the labels mapped to
        0 and to 1), ``feature_mean`` and ``feature_std`` (n each): what ``meta.json`` holds.
    config : dict, optional
        The training run's resolved config (``config.yaml``), for reference.
    """

    def __init__(self, net: torch.nn.Module, meta: dict, config: Optional[dict] = None):
        self.net = net
        self.features: list[str] = list(meta["feature_names"])
        self.classes: list[str] = list(meta["classes"])
        self.mean = torch.tensor(meta["feature_mean"], dtype=torch.float64)  # (n,)
        self.std = torch.tensor(meta["feature_std"], dtype=torch.float64)  # (n,)
        self.config = config

    @property
    def multiclass(self) -> bool:
        """True for k > 2 classes (softmax output, probabilities (m, k)); False for the two-class sigmoid."""
        return len(self.classes) > 2

    def probability_columns(self) -> list[str]:
        """Names of the probability columns this model's output has: ``probability`` (of ``classes[1]``) for
        two classes, ``probability_<label>`` per class for k."""
        return probability_columns(self.classes)

    def missing_columns(self, frame: "pandas.DataFrame") -> list[str]:
        """The model's feature columns that ``frame`` lacks, in the model's order."""
        return [name for name in self.features if name not in frame.columns]

    def predict_proba(self, frame: "pandas.DataFrame", source: str = "input") -> np.ndarray:
        """Probability of ``classes[1]`` for each row (two classes), or of every class (k classes).

        Parameters
        ----------
        frame : DataFrame, shape (m, c)
            Raw (unstandardised) features, matched by column name; other columns are ignored.
        source : str
            Where the rows came from, for messages (a file name).

        Returns
        -------
        ndarray, float64
            Shape (m,) for two classes; shape (m, k) for k > 2, column j the probability of ``classes[j]``
            (each row sums to 1).

        Raises
        ------
        DataError
            A missing column, or a cell that training would have refused (text, missing, inf, too large,
            nested), named by source, column and row.
        """
        import pandas as pd

        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame(frame)
        if not all(isinstance(c, str) for c in frame.columns):
            frame = frame.rename(columns=str)  # a copy: the caller's frame keeps its names
        missing = self.missing_columns(frame)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"{source}: no column {missing[0]!r}{more}; the model needs "
                            f"{len(self.features)}: {', '.join(self.features)}")
        X = torch.from_numpy(feature_matrix(frame, self.features, source))  # (m, n), the training checks
        with torch.no_grad():
            A = self.net((X - self.mean) / self.std).numpy()  # (m, 1) sigmoid or (m, k) softmax
        probability = A if self.multiclass else A[:, 0]  # binary callers have always had (m,)
        undefined = np.isnan(probability.reshape(len(probability), -1)).any(axis=1)  # (m,)
        if undefined.any():  # finite inputs far outside the training range can still overflow a deep net
            raise DataError(f"{source}: row {int(np.argmax(undefined)) + 1}: the model's output is not a number "
                            "(the row's values are too far outside the training range)")
        return probability

    def predict(self, frame: "pandas.DataFrame", threshold: float = 0.5, source: str = "input") -> np.ndarray:
        """The label of each row: for two classes ``classes[1]`` where its probability is at least
        ``threshold``; for k classes the most probable class (``threshold`` does not apply).

        Returns
        -------
        ndarray, shape (m,), object
            The original label values (as strings, as training recorded them; :func:`label_values` turns
            numeric ones back into numbers).
        """
        probability = self.predict_proba(frame, source)
        if self.multiclass:
            return np.asarray(self.classes, dtype=object)[probability.argmax(axis=1)]
        return np.where(probability >= threshold, self.classes[1], self.classes[0]).astype(object)


def probability_columns(classes: Sequence[str]) -> list[str]:
    """``["probability"]`` (of ``classes[1]``) for two classes; ``probability_<label>`` per class for k > 2."""
    if len(classes) == 2:
        return ["probability"]
    return [f"probability_{label}" for label in classes]


def label_values(classes: Sequence[str]) -> list:
    """The label of each class as the table held it: numbers when every label reads as one (``0``/``1``,
    ``2``/``4``, ``1.5``), so a scored file holds ``4``, not ``"4"``; otherwise the strings.

    Parameters
    ----------
    classes : sequence of str, length k
        The labels as training recorded them (``meta.json``'s ``classes``).

    Returns
    -------
    list, length k
        ``int`` for whole numbers, ``float`` otherwise, or the strings unchanged.
    """
    try:
        numbers = [float(label) for label in classes]
    except ValueError:
        return list(classes)
    if not all(np.isfinite(numbers)):  # "nan" and "inf" read as floats but were text in the table
        return list(classes)
    return [int(v) if v.is_integer() else v for v in numbers]


def load_model(uri: str, tracking_uri: Optional[str] = None) -> NeuronPredictor:
    """Load a model logged by a run, reading tensors, JSON and YAML only; no code from the store runs.

    Parameters
    ----------
    uri : str
        ``runs:/<run id>/model``, ``models:/<name>/<version>``, any MLflow artifact URI of the model, or a
        local folder holding the model (as ``mlflow.artifacts.download_artifacts`` leaves it).
    tracking_uri : str, optional
        The store to resolve ``runs:/`` and ``models:/`` URIs in; default MLflow's own (``MLFLOW_TRACKING_URI``
        or ``sqlite:///mlflow.db``).

    Returns
    -------
    NeuronPredictor
        ``predict_proba(frame)``, (m,) for two classes or (m, k), and ``predict(frame)`` (original labels).

    Raises
    ------
    ModelLoadError
        The URI names nothing, or a file is missing, not plain tensors, or not what this package writes.
    """
    with tempfile.TemporaryDirectory(prefix="neuron_torch-model-") as scratch:
        paths = {name: _fetch(uri, name, Path(scratch), tracking_uri) for name in FILES}
        return _from_files(uri, **{name.split(".")[0]: path for name, path in paths.items()})


def predictor_from_files(weights: str, meta: str, config: Optional[str] = None) -> NeuronPredictor:
    """The predictor from the three files on disk (what the pyfunc model does with its artifacts)."""
    return _from_files(str(Path(meta).parent), Path(weights), Path(meta), Path(config) if config else None)


def network_from_meta(meta: dict) -> torch.nn.Module:
    """An untrained network of the shape ``meta`` describes, built from the installed package: one sigmoid
    unit for two classes, k softmax units for k (:func:`neuron_torch.nn.networks.build_network`)."""
    from neuron_torch.nn.networks import build_network

    n, k = len(meta["feature_names"]), len(meta["classes"])
    hidden = [int(size) for size in meta.get("hidden_sizes") or []]
    # the initialisation does not matter: weights.pt overwrites every parameter
    if hidden:
        return build_network(n, k, hidden, meta["activation"], init="xavier")
    return build_network(n, k)


def _from_files(where: str, weights: Path, meta: Path, config: Optional[Path]) -> NeuronPredictor:
    import yaml

    try:
        description = json.loads(meta.read_text())
        _check_meta(description)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelLoadError(f"{where}: meta.json is not a neuron_torch model description ({first_line(err)})") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on the way to refusing a file
            warnings.simplefilter("ignore")
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything but plain tensors and containers
        raise ModelLoadError(f"{where}: weights.pt is not a plain tensor file (refused by "
                             f"torch.load(weights_only=True): {refusal(err)})") from None
    try:
        with torch.device("meta"):  # shapes only, no memory: a tampered meta.json cannot make this allocate
            expected = {k: tuple(v.shape) for k, v in network_from_meta(description).state_dict().items()}
        given = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        if given != expected or len(state) != len(expected):
            raise ValueError(f"tensors {_shapes(given)}, the network needs {_shapes(expected)}")
        net = network_from_meta(description)
        net.load_state_dict(state)
    except Exception as err:  # wrong keys or shapes, a non-dict, an unknown activation
        raise ModelLoadError(f"{where}: weights.pt does not fit the network meta.json describes "
                             f"({first_line(err)})") from None
    try:
        settings = yaml.safe_load(config.read_text()) if config is not None and config.is_file() else None
    except (OSError, yaml.YAMLError) as err:
        raise ModelLoadError(f"{where}: config.yaml cannot be read ({first_line(err)})") from None
    return NeuronPredictor(net.double().eval(), description, settings)


def _check_meta(meta: Any) -> None:
    """Raise ValueError unless ``meta`` has the fields and lengths log_model writes."""
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    names, classes = meta["feature_names"], meta["classes"]
    if not (isinstance(names, list) and names and all(isinstance(name, str) for name in names)):
        raise ValueError("feature_names must be a non-empty list of strings")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise ValueError("classes must be a list of at least two labels (strings)")
    if len(set(classes)) != len(classes):
        raise ValueError("classes holds a label twice")
    for key in ("feature_mean", "feature_std"):
        values = meta[key]
        if not (isinstance(values, list) and len(values) == len(names)
                and all(isinstance(v, (int, float)) and np.isfinite(v) for v in values)):
            raise ValueError(f"{key} must hold {len(names)} finite numbers")
    if any(v == 0 for v in meta["feature_std"]):
        raise ValueError("feature_std holds a zero")


def _fetch(uri: str, name: str, scratch: Path, tracking_uri: Optional[str]) -> Optional[Path]:
    """One file of the model, as a local path; None for a missing config.yaml (it is for reference)."""
    folder = Path(uri)
    if ":" not in uri and not folder.is_dir():
        raise ModelLoadError(f"{uri}: no such model folder (or give runs:/<run id>/model, models:/<name>/<version>)")
    if folder.is_dir():  # a local folder: read in place
        for candidate in (folder / SUBFOLDER / name, folder / name):
            if candidate.is_file():
                return candidate
        if name == "config.yaml":
            return None
        raise ModelLoadError(f"{uri}: no {name} (not a model logged by neuron_torch)")

    import contextlib
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    store = contextlib.nullcontext()
    if tracking_uri is not None:
        # MLflow resolves runs:/<id>/model to the run's logged model with a client of the default store, whatever
        # tracking_uri says (ModelsArtifactRepository); the fluent URI points that client at the store asked for
        store = fluent_tracking_uri(tracking_uri)
    try:
        with store:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{SUBFOLDER}/{name}",
                                                            dst_path=str(scratch / name.split(".")[0]),
                                                            tracking_uri=tracking_uri))
    except Exception as err:  # MLflow raises several types for a URI or file that is not there
        if name == "config.yaml":  # kept for reference only; the other two files are the model
            return None
        raise ModelLoadError(f"cannot load model {uri}: {first_line(err)}") from None


def refusal(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words (torch's message is a page)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch bolds part of its message with terminal codes
    named = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if named:
        return f"it names {named.group(1)}, which only running code could rebuild"
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if detail:
        return detail.group(1).strip()
    return first_line(err)


def _shapes(shapes: dict[str, tuple]) -> str:
    listed = ", ".join(f"{name} {list(shape)}" for name, shape in list(shapes.items())[:4])
    return listed + (", ..." if len(shapes) > 4 else "")
