"""Figures logged with a run (matplotlib, drawn off-screen)."""

from __future__ import annotations

import numpy as np
import torch


def decision_boundary(module, X_raw: np.ndarray, y: np.ndarray, feature_names: list[str]):
    """Predicted probability over the plane of a two-feature table, with the points on top.

    Parameters
    ----------
    module : NeuronModule
        A trained module; its standardisation statistics map raw features to the network's input.
    X_raw : ndarray, shape (m, 2)
        Raw (unstandardised) features.
    y : ndarray, shape (m,)
        Labels in {0, 1}.
    feature_names : list of str
        The two feature names, for the axes.

    Returns
    -------
    matplotlib.figure.Figure
    """
    pad = 0.1 * (X_raw.max(0) - X_raw.min(0))
    lo, hi = X_raw.min(0) - pad, X_raw.max(0) + pad
    g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    grid = torch.from_numpy(np.column_stack([g0.ravel(), g1.ravel()]))
    P = module.predict_proba(grid.to(module.feature_mean.device)).double().cpu().numpy().reshape(g0.shape)

    fig, ax = _figure(5.5, 4.5)
    filled = ax.contourf(g0, g1, P, levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.75)
    ax.contour(g0, g1, P, levels=[0.5], colors="k", linewidths=1.5)
    ax.scatter(X_raw[:, 0], X_raw[:, 1], c=y, cmap="RdBu_r", edgecolors="k", linewidths=0.4, s=14)
    fig.colorbar(filled, ax=ax, label="P(label 1)")
    ax.set_xlabel(feature_names[0])
    ax.set_ylabel(feature_names[1])
    ax.set_title("decision boundary (A = 0.5)")
    fig.tight_layout()
    return fig


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
    """``b`` and the ``top`` weights of largest final magnitude (single neuron), or per-layer weight norms."""
    fig, ax = _figure(7.0, 4.5)
    weights = [c for c in history.columns if c.startswith("w/")]
    if weights:
        last = history[weights].iloc[-1].abs().sort_values(ascending=False)
        for name in list(last.index[:top]):
            ax.plot(history["step"], history[name], lw=1, label=name[2:])
        ax.plot(history["step"], history["b"], "k--", lw=1.5, label="b")
        ax.set_title(f"b and the {min(top, len(weights))} of {len(weights)} weights largest at the end")
    else:
        for name in [c for c in history.columns if c.endswith("/weight_norm")]:
            ax.plot(history["step"], history[name], label=name)
        ax.set_title("weight norm per layer")
    ax.set_xlabel("update")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def roc_curve(y, probability):
    """ROC curve of the test split, with its area."""
    from sklearn import metrics

    fpr, tpr, _ = metrics.roc_curve(y, probability)
    fig, ax = _figure(4.5, 4.5)
    ax.plot(fpr, tpr, label=f"AUROC {metrics.auc(fpr, tpr):.4f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (test)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def confusion_matrix(y, probability, classes: tuple[str, str], threshold: float = 0.5):
    """Counts of true against predicted labels on the test split."""
    from sklearn import metrics

    counts = metrics.confusion_matrix(y, probability >= threshold, labels=[0, 1])
    fig, ax = _figure(4.5, 4.0)
    ax.imshow(counts, cmap="Blues")
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > counts.max() / 2 else "black")
    ax.set_xticks([0, 1], [f"pred {c}" for c in classes])
    ax.set_yticks([0, 1], [f"true {c}" for c in classes])
    ax.set_title(f"confusion matrix (test, threshold {threshold:g})")
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
