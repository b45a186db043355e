"""Figures logged with a run (matplotlib, drawn off-screen), and the call that logs them."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def decision_boundary(module, X_raw: np.ndarray, y: np.ndarray, feature_names: list[str],
                      classes: Sequence[str] = ("0", "1")):
    """Predicted probability (two classes) or predicted class (k classes) over the plane of a two-feature
    table, with the points on top.

    Parameters
    ----------
    module : NeuronModule
        A trained module; its standardisation statistics map raw features to the network's input.
    X_raw : ndarray, shape (m, 2)
        Raw (unstandardised) features.
    y : ndarray, shape (m,)
        Class indices: in {0, 1} for two classes, {0, …, k − 1} for k.
    feature_names : list of str
        The two feature names, for the axes.
    classes : sequence of str, length k
        The label of each class index, for the legend.

    Returns
    -------
    matplotlib.figure.Figure
    """
    pad = 0.1 * (X_raw.max(0) - X_raw.min(0))
    lo, hi = X_raw.min(0) - pad, X_raw.max(0) + pad
    g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    grid = torch.from_numpy(np.column_stack([g0.ravel(), g1.ravel()]))
    P = module.predict_proba(grid.to(module.feature_mean.device)).double().cpu().numpy()  # (200², 1) or (200², k)

    fig, ax = _figure(5.5, 4.5)
    if P.shape[1] == 1:
        P = P.reshape(g0.shape)
        filled = ax.contourf(g0, g1, P, levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.75)
        ax.contour(g0, g1, P, levels=[0.5], colors="k", linewidths=1.5)
        ax.scatter(X_raw[:, 0], X_raw[:, 1], c=y, cmap="RdBu_r", edgecolors="k", linewidths=0.4, s=14)
        fig.colorbar(filled, ax=ax, label="P(label 1)")
        ax.set_title("decision boundary (A = 0.5)")
    else:
        from matplotlib.colors import ListedColormap

        k = P.shape[1]
        colours = ListedColormap([_CLASS_COLOURS[j % len(_CLASS_COLOURS)] for j in range(k)])
        predicted = P.argmax(axis=1).reshape(g0.shape)  # the most probable class at each grid point
        # one filled band per class index: levels at the half-integers put each index in its own band
        ax.contourf(g0, g1, predicted, levels=np.arange(k + 1) - 0.5, cmap=colours, alpha=0.35)
        ax.contour(g0, g1, predicted, levels=np.arange(k - 1) + 0.5, colors="k", linewidths=1.0)
        for j, label in enumerate(classes):
            mine = y == j
            ax.scatter(X_raw[mine, 0], X_raw[mine, 1], color=colours(j), edgecolors="k", linewidths=0.4, s=14,
                       label=str(label))
        ax.legend(fontsize=7, title="label", title_fontsize=7)
        ax.set_title(f"decision regions (most probable of {k} classes)")
    ax.set_xlabel(feature_names[0])
    ax.set_ylabel(feature_names[1])
    fig.tight_layout()
    return fig


# distinct colours for class indices (matplotlib's tab10), reused cyclically past ten classes
_CLASS_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _figure(width: float = 6.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def loss_curves(history, validation):
    """Training loss at every logged update and validation loss at each validation, against the step.

    Parameters
    ----------
    history : pandas.DataFrame
        Columns ``step``, ``train/loss`` (and the other tracked values).
    validation : pandas.DataFrame
        Columns ``step``, ``val/loss`` (may be empty).
    """
    fig, ax = _figure()
    ax.plot(history["step"], history["train/loss"], label="train")
    if len(validation) and "val/loss" in validation:
        ax.plot(validation["step"], validation["val/loss"], "o-", label="validation")
    ax.set_xlabel("update")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("loss")
    fig.tight_layout()
    return fig


def trajectories(history, top: int = 12):
    """The biases and the ``top`` weights of largest final magnitude (networks without hidden layer), or
    per-layer weight norms.

    Parameters
    ----------
    history : pandas.DataFrame
        Column ``step`` and the tracked values: ``b`` and ``w/<feature>`` (single neuron), ``b/<class>`` and
        ``w/<class>/<feature>`` (k classes), or ``layer<l>/weight_norm`` (hidden layers).
    top : int
        How many weights to draw (a 30-feature, 10-class table has 300), and at most how many biases.
    """
    fig, ax = _figure(7.0, 4.5)
    weights = [c for c in history.columns if c.startswith("w/")]
    biases = [c for c in history.columns if c == "b" or c.startswith("b/")]
    if weights:
        last = history[weights].iloc[-1].abs().sort_values(ascending=False)
        for name in list(last.index[:top]):
            ax.plot(history["step"], history[name], lw=1, label=name[2:])
        if len(biases) > top:  # k biases for k classes: the largest at the end, as for the weights
            biases = list(history[biases].iloc[-1].abs().sort_values(ascending=False).index[:top])
        for name in biases:
            ax.plot(history["step"], history[name], "--", lw=1.5, label=name,
                    **({"color": "k"} if name == "b" else {}))
        shown = "b" if biases == ["b"] else f"{len(biases)} biases"
        ax.set_title(f"{shown} and the {min(top, len(weights))} of {len(weights)} weights largest at the end")
    else:
        for name in [c for c in history.columns if c.endswith("/weight_norm")]:
            ax.plot(history["step"], history[name], label=name)
        ax.set_title("weight norm per layer")
    ax.set_xlabel("update")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def roc_curve(y, probability, classes: Sequence[str] = ("0", "1")):
    """ROC curve of the test split, with its area: of label 1 for two classes, one-vs-rest per class for k.

    Parameters
    ----------
    y : ndarray, shape (m,)
        Class indices.
    probability : ndarray, shape (m,) or (m, k)
        The probability of label 1 (two classes), or of each class.
    classes : sequence of str, length k
        The label of each class index, for the legend.
    """
    from sklearn import metrics

    fig, ax = _figure(4.5, 4.5)
    if probability.ndim == 1:
        fpr, tpr, _ = metrics.roc_curve(y, probability)
        ax.plot(fpr, tpr, label=f"AUROC {metrics.auc(fpr, tpr):.4f}")
        ax.set_title("ROC (test)")
    else:
        for j, label in enumerate(classes):
            positive = y == j
            if positive.all() or not positive.any():  # no curve without both sides of "this class or not"
                continue
            fpr, tpr, _ = metrics.roc_curve(positive, probability[:, j])
            ax.plot(fpr, tpr, lw=1, label=f"{label}: AUROC {metrics.auc(fpr, tpr):.4f}")
        ax.set_title("ROC, one class against the rest (test)")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def confusion_matrix(y, probability, classes: Sequence[str], threshold: float = 0.5):
    """Counts of true against predicted labels on the test split, with the labels' names.

    Parameters
    ----------
    y : ndarray, shape (m,)
        Class indices.
    probability : ndarray, shape (m,) or (m, k)
        The probability of label 1 (two classes: predicted where at least ``threshold``), or of each class
        (k classes: the most probable is predicted).
    classes : sequence of str, length k
        The label of each class index.
    threshold : float
        Two classes only.
    """
    from sklearn import metrics

    k = len(classes)
    if probability.ndim == 1:
        predicted = probability >= threshold
        title = f"confusion matrix (test, threshold {threshold:g})"
    else:
        predicted = probability.argmax(axis=1)
        title = "confusion matrix (test, most probable class)"
    counts = metrics.confusion_matrix(y, predicted, labels=list(range(k)))  # (k, k), rows true
    side = min(4.0 + 0.45 * max(k - 2, 0), 16.0)  # room for k names without crowding the cells
    fig, ax = _figure(side + 0.5, side)
    ax.imshow(counts, cmap="Blues")
    if k <= 30:  # past that the numbers no longer fit their cells; the colours still show the pattern
        for (i, j), count in np.ndenumerate(counts):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8 if k > 10 else 10,
                    color="white" if count > counts.max() / 2 else "black")
    names = [str(c) for c in classes]
    ax.set_xticks(range(k), [f"pred {c}" for c in names], rotation=45 if k > 2 else 0,
                  ha="right" if k > 2 else "center", fontsize=8 if k > 10 else 10)
    ax.set_yticks(range(k), [f"true {c}" for c in names], fontsize=8 if k > 10 else 10)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def sweep_overlay(curves: dict):
    """The classic comparison: each child's training loss against the step, one line per grid point."""
    fig, ax = _figure(7.0, 4.5)
    for name, (steps, loss) in curves.items():
        ax.plot(steps, loss, label=name)
    ax.set_xlabel("update")
    ax.set_ylabel("train/loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("training loss per run")
    fig.tight_layout()
    return fig


def log_figures(run, tracker, module, datamodule) -> None:
    """Loss curves, w/b trajectories, ROC and confusion matrix of the test split, and the decision boundary
    for two-feature data, as PNG artifacts under ``plots/``.

    Two classes: one ROC curve of label 1, a 2×2 confusion matrix at threshold 0.5. k classes: one-vs-rest ROC
    curves (one per class present among the test rows with some rows of other classes), a k×k confusion
    matrix of the most probable class.

    Parameters
    ----------
    run : TrackedRun
        Where the figures go (``log_figure``).
    tracker : MLflowTracking
        The run's callback: ``history()`` and ``validation`` give the curves.
    module : LightningModule
        The trained module: ``predict_proba`` of raw features, ``feature_names``.
    datamodule : LightningDataModule
        ``raw_split("test")``, ``raw_split("train")`` (raw features, class indices) and ``classes``.
    """
    import pandas as pd

    history = tracker.history()
    if len(history):
        run.log_figure(loss_curves(history, pd.DataFrame(tracker.validation)), "plots/loss_curves.png")
        run.log_figure(trajectories(history), "plots/trajectories.png")
    X_raw, y = datamodule.raw_split("test")
    probability = module.predict_proba(torch.from_numpy(X_raw)).double().cpu().numpy()  # (m, 1) or (m, k)
    classes = list(datamodule.classes)
    if len(classes) == 2:
        probability = probability[:, 0]  # (m,) of label 1
    if len(np.unique(y)) >= 2:  # a ROC curve needs positives and negatives among the test rows
        run.log_figure(roc_curve(y, probability, classes), "plots/roc.png")
    run.log_figure(confusion_matrix(y, probability, classes), "plots/confusion_matrix.png")
    if len(module.feature_names) == 2:
        run.log_figure(decision_boundary(module, *datamodule.raw_split("train"), module.feature_names, classes),
                       "plots/decision_boundary.png")
