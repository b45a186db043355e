"""The math of one layer: every forward line beside the line that differentiates it.

Plain torch, no autograd, no Lightning. Shapes follow torch's convention: a batch ``A_prev`` of ``m`` rows
and ``n_prev`` features, a weight ``W`` of shape ``(n, n_prev)`` and a bias ``b`` of shape ``(n,)``, as in
``nn.Linear``. A network is these functions in a loop (see :mod:`neuron_torch.networks`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

LEAKY_SLOPE = 0.01  # slope of leaky ReLU for Z < 0, torch's default


# --- activations: A = g(Z) and dZ = dA ⊙ g'(Z), g' written from Z or from A, whichever is cheaper ----------


def sigmoid(Z: Tensor) -> Tensor:
    return torch.sigmoid(Z)


def sigmoid_backward(dA: Tensor, Z: Tensor, A: Tensor) -> Tensor:
    return dA * A * (1 - A)  # σ'(Z) = σ(Z)(1 − σ(Z)) = A(1 − A)


def tanh(Z: Tensor) -> Tensor:
    return torch.tanh(Z)


def tanh_backward(dA: Tensor, Z: Tensor, A: Tensor) -> Tensor:
    return dA * (1 - A * A)  # tanh'(Z) = 1 − tanh²(Z)


def relu(Z: Tensor) -> Tensor:
    return torch.relu(Z)


def relu_backward(dA: Tensor, Z: Tensor, A: Tensor) -> Tensor:
    return dA * (Z > 0)  # 1 where Z > 0, else 0 (0 at Z = 0, as torch does)


def leaky_relu(Z: Tensor) -> Tensor:
    return torch.where(Z > 0, Z, LEAKY_SLOPE * Z)


def leaky_relu_backward(dA: Tensor, Z: Tensor, A: Tensor) -> Tensor:
    return torch.where(Z > 0, dA, LEAKY_SLOPE * dA)


class Activation(NamedTuple):
    """A hidden-layer activation ``g`` and its backward ``dZ = dA ⊙ g'(Z)``."""

    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor, Tensor], Tensor]


ACTIVATIONS = {
    "relu": Activation(relu, relu_backward),
    "tanh": Activation(tanh, tanh_backward),
    "sigmoid": Activation(sigmoid, sigmoid_backward),
    "leaky_relu": Activation(leaky_relu, leaky_relu_backward),
}


# --- the linear map Z = A_prev·Wᵀ + b and its gradients -----------------------------------------------------


def linear_forward(A_prev: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``Z = A_prev·Wᵀ + b``: (m, n_prev) · (n_prev, n) + (n,) → (m, n)."""
    return torch.addmm(b, A_prev, W.T)


def linear_backward(dZ: Tensor, A_prev: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of the mean loss with respect to the layer's parameters.

    Parameters
    ----------
    dZ : Tensor, shape (m, n)
        Per-sample gradient of the loss with respect to ``Z`` (not yet divided by ``m``).
    A_prev : Tensor, shape (m, n_prev)
        The layer's input, cached on the way forward.

    Returns
    -------
    dW : Tensor, shape (n, n_prev)
        ``dZᵀ·A_prev / m``.
    db : Tensor, shape (n,)
        ``mean(dZ)`` over the samples.
    """
    m = dZ.shape[0]
    dW = dZ.T @ A_prev / m  # (n, m)·(m, n_prev) → (n, n_prev)
    db = dZ.mean(0)  # (n,)
    return dW, db


def linear_backward_input(dZ: Tensor, W: Tensor) -> Tensor:
    """``dA_prev = dZ·W``: (m, n)·(n, n_prev) → (m, n_prev), the gradient passed to the layer below."""
    return dZ @ W


# --- the output: sigmoid + mean binary cross-entropy, from logits --------------------------------------------


def bce_from_logits(Z: Tensor, Y: Tensor) -> Tensor:
    """Mean binary cross-entropy of ``A = σ(Z)`` against labels ``Y``, computed from the logits.

    ``−[Y log A + (1 − Y) log(1 − A)] = softplus(Z) − Y·Z``, and ``softplus(Z) = log(e⁰ + eᶻ)`` taken by
    ``logaddexp`` (``max(Z, 0) + log1p(e^−|Z|)``) never overflows, so the loss is finite for any ``Z``
    (``|Z| = 1e4`` included).

    Parameters
    ----------
    Z : Tensor, shape (m, 1)
        Logits of the output layer.
    Y : Tensor, shape (m, 1)
        Labels in {0, 1}, same dtype as ``Z``.

    Returns
    -------
    Tensor, shape ()
    """
    softplus = torch.logaddexp(Z, Z.new_zeros(()))  # log(e⁰ + eᶻ), exact and overflow-free for any Z
    return torch.addcmul(softplus, Y, Z, value=-1).mean()  # mean(softplus(Z) − Y·Z)


def bce_backward(A: Tensor, Y: Tensor) -> Tensor:
    """``dZ = A − Y``: sigmoid and cross-entropy differentiated together, per sample (m, 1)."""
    return A - Y


# --- the output unit's second derivative: Hessian of the mean BCE with respect to θ = (w, b) -------------------
# One sigmoid unit Z = X·wᵀ + b has per-sample gradient dZ_i·(x_i, 1) with dZ = A − Y (above). Differentiating
# dZ_i = σ(Z_i) − Y_i once more gives σ'(Z_i) = A_i(1 − A_i) =: S_i, so the Hessian of the mean loss is
#     H = (1/m)·Σᵢ S_i·(x_i, 1)ᵀ(x_i, 1) = [XᵀSX/m, XᵀS/m; SᵀX/m, mean(S)],   S = diag(A(1 − A)).
# XᵀSX is a weighted Gram matrix, n² multiply-adds per row: it is summed over row blocks that stay in cache,
# never formed as S·X in one piece (an m×n temporary the size of X itself).

HESSIAN_BLOCK_BYTES = 1 << 20  # one row block of X, 4,096 rows at n = 64 float32: it and S·X_b fill a 2 MiB L2


def bce_hessian(X: Tensor, w: Tensor, b: Tensor, block_rows: int | None = None) -> Tensor:
    """Hessian of the mean binary cross-entropy of one sigmoid unit with respect to ``θ = (w, b)``.

    ``H = (1/m)·Σᵢ Sᵢ·(xᵢ, 1)ᵀ(xᵢ, 1)`` with ``S = A(1 − A)``, ``A = σ(X·wᵀ + b)``: the derivative of
    ``dZ = A − Y`` with respect to ``Z``, so the labels drop out. ``Z`` is recomputed here from ``(w, b)``
    (the fused gradient pass does not keep it). The temporaries are ``Z``, ``A``, ``S`` of shape (m, 1) and one
    row block scaled by its ``S`` (m_b, n); nothing of X's size. The cost is the GEMM ``X_bᵀ·(S_b X_b)`` over
    the blocks, ``m·n²`` multiply-adds, plus two matrix–vector products with X (``Z`` and ``XᵀS``). Blocks are
    few and large, two ops each, so the loop's per-op overhead stays small next to the arithmetic.

    Parameters
    ----------
    X : Tensor, shape (m, n)
        The unit's input (``A_prev``; the features for the single neuron).
    w : Tensor, shape (1, n)
        The unit's weights, same dtype as ``X``.
    b : Tensor, shape (1,)
        The unit's bias.
    block_rows : int, optional
        Rows per block ``m_b``; by default as many as fit in :data:`HESSIAN_BLOCK_BYTES`.

    Returns
    -------
    H : Tensor, shape (n + 1, n + 1)
        Symmetric, ordered like ``(w₁, …, wₙ, b)``: ``H[:n, :n] = XᵀSX/m``, ``H[:n, n] = H[n, :n] = XᵀS/m``,
        ``H[n, n] = mean(S)``. Add the L2 term with :func:`l2_hessian`.
    """
    m, n = X.shape
    if block_rows is None:
        block_rows = max(1, HESSIAN_BLOCK_BYTES // (n * X.element_size()))
    A = sigmoid(linear_forward(X, w, b))  # A = σ(X·wᵀ + b), (m, 1)
    S = A * (1 - A)  # σ'(Z) = A(1 − A): ∂dZ/∂Z per sample, (m, 1)
    XtSX = X.new_zeros(n, n)  # Σ_blocks X_bᵀ·S_b·X_b, (n, n)
    for start in range(0, m, block_rows):
        Xb = X[start:start + block_rows]  # (m_b, n), a view
        XtSX.addmm_(Xb.T, Xb * S[start:start + block_rows])  # += X_bᵀ·(S_b X_b), (n, m_b)·(m_b, n)
    H = X.new_empty(n + 1, n + 1)
    H[:n, :n] = (XtSX + XtSX.T) / (2 * m)  # ∂²L/∂w∂wᵀ; the GEMM rounds (i, j) and (j, i) apart: symmetrise
    H[:n, n] = H[n, :n] = (X.T @ S)[:, 0] / m  # ∂²L/∂w∂b = XᵀS/m, (n,)
    H[n, n] = S.mean()  # ∂²L/∂b²
    return H


# --- the L2 penalty (λ/2)·‖W‖², on weights only -----------------------------------------------------------


def l2_penalty(weights: list[Tensor], l2: float) -> Tensor | float:
    """``(λ/2)·Σ‖W‖²`` over the weight matrices (never the biases)."""
    if l2 == 0:
        return 0.0
    return 0.5 * l2 * sum((W * W).sum() for W in weights)


def l2_backward(dW: Tensor, W: Tensor, l2: float) -> Tensor:
    """``dW + λ·W``: the penalty's gradient added to the data gradient."""
    return dW if l2 == 0 else dW + l2 * W


def l2_hessian(H: Tensor, l2: float) -> Tensor:
    """``H + λ·I`` on the weight block of a ``(w, b)`` Hessian ((n + 1, n + 1), ``b`` last); the bias block is
    left alone, as the penalty never touches ``b``."""
    if l2 == 0:
        return H
    H = H.clone()
    H.diagonal()[:-1] += l2  # ∂²[(λ/2)·‖w‖²]/∂w∂wᵀ = λ·I
    return H
