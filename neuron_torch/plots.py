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
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    pad = 0.1 * (X_raw.max(0) - X_raw.min(0))
    lo, hi = X_raw.min(0) - pad, X_raw.max(0) + pad
    g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    grid = torch.from_numpy(np.column_stack([g0.ravel(), g1.ravel()]))
    P = module.predict_proba(grid.to(module.feature_mean.device)).double().cpu().numpy().reshape(g0.shape)

    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    filled = ax.contourf(g0, g1, P, levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.75)
    ax.contour(g0, g1, P, levels=[0.5], colors="k", linewidths=1.5)
    ax.scatter(X_raw[:, 0], X_raw[:, 1], c=y, cmap="RdBu_r", edgecolors="k", linewidths=0.4, s=14)
    fig.colorbar(filled, ax=ax, label="P(label 1)")
    ax.set_xlabel(feature_names[0])
    ax.set_ylabel(feature_names[1])
    ax.set_title("decision boundary (A = 0.5)")
    fig.tight_layout()
    return fig
