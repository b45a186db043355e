"""The math of one layer: every forward line beside the line that differentiates it.

Plain torch, no autograd, no Lightning. Shapes follow torch's convention: a batch ``A_prev`` of ``m`` rows
and ``n_prev`` features, a weight ``W`` of shape ``(n, n_prev)`` and a bias ``b`` of shape ``(n,)``, as in
``nn.Linear``. A network is these functions in a loop (see :mod:`neuron_torch.nn.networks`).
"""

from __future__ import annotations

import math
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


def weighted_mean(rows: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean over the rows of ``rows`` (m, ...), or ``Σ wᵢ·rowsᵢ / Σ wᵢ`` with sample weights ``weight`` (m, 1)."""
    if weight is None:
        return rows.mean()
    return (rows * weight).sum() / weight.sum()


def weight_backward(dZ: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-sample ``dZ`` (m, n) scaled for a weighted mean: ``dZᵢ·wᵢ·m / Σ w``.

    :func:`linear_backward` divides by ``m``, so it then gives ``dW = Σ wᵢ·dZᵢ·a_iᵀ / Σ wᵢ``. Every gradient
    below the output is linear in the output's ``dZ`` (each layer multiplies by ``W`` and by ``g'(Z)``), so
    scaling it once at the output weights every layer's gradient; weights of 2 count a row twice.
    """
    if weight is None:
        return dZ
    return dZ * (weight * (dZ.shape[0] / weight.sum()))


def linear_backward_input(dZ: Tensor, W: Tensor) -> Tensor:
    """``dA_prev = dZ·W``: (m, n)·(n, n_prev) → (m, n_prev), the gradient passed to the layer below."""
    return dZ @ W


# --- the two-class output: sigmoid + mean binary cross-entropy, from logits ------------------------------------


def bce_from_logits(Z: Tensor, Y: Tensor, weight: Tensor | None = None) -> Tensor:
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
    weight : Tensor, shape (m, 1), optional
        Non-negative sample weights: the mean becomes ``Σ wᵢ·lossᵢ / Σ wᵢ``.

    Returns
    -------
    Tensor, shape ()
    """
    softplus = torch.logaddexp(Z, Z.new_zeros(()))  # log(e⁰ + eᶻ), exact and overflow-free for any Z
    return weighted_mean(torch.addcmul(softplus, Y, Z, value=-1), weight)  # mean(softplus(Z) − Y·Z)


def bce_backward(A: Tensor, Y: Tensor) -> Tensor:
    """``dZ = A − Y``: sigmoid and cross-entropy differentiated together, per sample (m, 1)."""
    return A - Y


# --- the k-class output: softmax + mean cross-entropy, from logits ---------------------------------------------
# A_c = e^{Z_c} / Σ_d e^{Z_d} and loss = −Σ_c Y_c·log A_c = logsumexp(Z) − Σ_c Y_c·Z_c for a one-hot row Y. Then
# ∂loss/∂Z_c = e^{Z_c}/Σ_d e^{Z_d} − Y_c = A_c − Y_c (Σ_c Y_c = 1): dZ = A − Y again, as for the sigmoid unit,
# which is this output with k = 2 and Z = Z_1 − Z_0.


def softmax(Z: Tensor) -> Tensor:
    """``A = e^Z / Σ e^Z`` along the classes, (m, k) → (m, k); shifted by max(Z) inside, so it never overflows."""
    return torch.softmax(Z, dim=1)


def cross_entropy_from_logits(Z: Tensor, Y: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of ``A = softmax(Z)`` against one-hot labels ``Y``, from the logits.

    ``−Σ_c Y_c log A_c = logsumexp(Z) − Σ_c Y_c·Z_c``; ``logsumexp`` subtracts max(Z) first, so the loss is
    finite for any finite ``Z``.

    Parameters
    ----------
    Z : Tensor, shape (m, k)
        Logits of the output layer.
    Y : Tensor, shape (m, k)
        One-hot labels, same dtype as ``Z``.
    weight : Tensor, shape (m, 1), optional
        Non-negative sample weights.

    Returns
    -------
    Tensor, shape ()
    """
    per_row = torch.logsumexp(Z, dim=1, keepdim=True) - (Y * Z).sum(1, keepdim=True)  # (m, 1)
    return weighted_mean(per_row, weight)


def cross_entropy_backward(A: Tensor, Y: Tensor) -> Tensor:
    """``dZ = A − Y``: softmax and cross-entropy differentiated together, per sample (m, k)."""
    return A - Y


class Output(NamedTuple):
    """An output head: ``A = f(Z)``, the mean loss from the logits, and ``dZ`` of the two together."""

    forward: Callable[[Tensor], Tensor]
    loss: Callable[..., Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]


OUTPUTS = {
    "sigmoid": Output(sigmoid, bce_from_logits, bce_backward),  # one unit, labels in {0, 1}
    "softmax": Output(softmax, cross_entropy_from_logits, cross_entropy_backward),  # k units, one-hot labels
}


# --- the output unit's second derivative: Hessian of the mean BCE with respect to θ = (w, b) -------------------
# One sigmoid unit Z = X·wᵀ + b has per-sample gradient dZ_i·(x_i, 1) with dZ = A − Y (above). Differentiating
# dZ_i = σ(Z_i) − Y_i once more gives σ'(Z_i) = A_i(1 − A_i) =: S_i, so the Hessian of the mean loss is
#     H = (1/m)·Σᵢ S_i·(x_i, 1)ᵀ(x_i, 1) = [XᵀSX/m, XᵀS/m; SᵀX/m, mean(S)],   S = diag(A(1 − A)).
# XᵀSX is a weighted Gram matrix, n² multiply-adds per row: it is summed over row blocks that stay in cache,
# never formed as S·X in one piece (an m×n temporary the size of X itself).

HESSIAN_BLOCK_BYTES = 1 << 20  # one row block of X, 4,096 rows at n = 64 float32: it and S·X_b fill a 2 MiB L2


def bce_hessian(X: Tensor, w: Tensor, b: Tensor, weight: Tensor | None = None,
                block_rows: int | None = None) -> Tensor:
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
    weight : Tensor, shape (m, 1), optional
        Sample weights: ``H = Σᵢ wᵢ·Sᵢ·(xᵢ, 1)ᵀ(xᵢ, 1) / Σᵢ wᵢ``, the Hessian of the weighted mean.
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
    S = weight_backward(A * (1 - A), weight)  # σ'(Z) = A(1 − A): ∂dZ/∂Z per sample (weighted), (m, 1)
    XtSX = X.new_zeros(n, n)  # Σ_blocks X_bᵀ·S_b·X_b, (n, n)
    for start in range(0, m, block_rows):
        Xb = X[start:start + block_rows]  # (m_b, n), a view
        XtSX.addmm_(Xb.T, Xb * S[start:start + block_rows])  # += X_bᵀ·(S_b X_b), (n, m_b)·(m_b, n)
    H = X.new_empty(n + 1, n + 1)
    H[:n, :n] = (XtSX + XtSX.T) / (2 * m)  # ∂²L/∂w∂wᵀ; the GEMM rounds (i, j) and (j, i) apart: symmetrise
    H[:n, n] = H[n, :n] = (X.T @ S)[:, 0] / m  # ∂²L/∂w∂b = XᵀS/m, (n,)
    H[n, n] = S.mean()  # ∂²L/∂b²
    return H


# --- the k-class output's second derivative: Hessian of the mean cross-entropy w.r.t. θ = (W, b) ----------------
# With x̃ = (x, 1) and dZ_c = A_c − Y_c, ∂A_c/∂Z_d = A_c(δ_cd − A_d), so one row contributes
#     H_i = (diag(A_i) − A_i·A_iᵀ) ⊗ x̃_i·x̃_iᵀ,     block (c, d) = A_ic(δ_cd − A_id)·x̃_i·x̃_iᵀ,
# k² blocks of (n + 1)², again without the labels. It is singular: adding one vector to every class's
# (w_c, b_c) leaves the softmax unchanged, so those k-fold shifts are flat directions (see softmax_gauge).


def softmax_hessian(X: Tensor, W: Tensor, b: Tensor, weight: Tensor | None = None,
                    block_rows: int | None = None) -> Tensor:
    """Hessian of the mean cross-entropy of a softmax layer ``A = softmax(X·Wᵀ + b)`` w.r.t. ``θ = (W, b)``.

    Summed over row blocks: per block, ``A ⊗ x̃`` (m_b, k·(n + 1)) gives the ``A·Aᵀ`` part in one GEMM and a
    batched GEMM gives the k diagonal blocks ``X̃ᵀ·diag(A_c)·X̃``. The cost is ``m·k²·(n + 1)²`` multiply-adds.

    Parameters
    ----------
    X : Tensor, shape (m, n)
        The layer's input.
    W : Tensor, shape (k, n)
        The layer's weights, same dtype as ``X``.
    b : Tensor, shape (k,)
        The layer's biases.
    weight : Tensor, shape (m, 1), optional
        Sample weights: the Hessian of the weighted mean.
    block_rows : int, optional
        Rows per block; by default as many as keep a block's ``A ⊗ x̃`` within :data:`HESSIAN_BLOCK_BYTES`.

    Returns
    -------
    H : Tensor, shape (k·(n + 1), k·(n + 1))
        Symmetric, ordered like the flattened parameters: ``W`` row by row (class 0's n weights, then class
        1's, ...), then ``b``. Add the L2 term with :func:`l2_hessian` (``n_biases=k``).
    """
    m, n = X.shape
    k = W.shape[0]
    if block_rows is None:
        block_rows = max(1, HESSIAN_BLOCK_BYTES // (k * (n + 1) * X.element_size()))
    A = softmax(linear_forward(X, W, b))  # (m, k)
    wA = weight_backward(A, weight)  # A scaled by wᵢ·m/Σw, (m, k)
    outer = X.new_zeros(k * (n + 1), k * (n + 1))  # Σᵢ wᵢ·(A_i ⊗ x̃_i)(A_i ⊗ x̃_i)ᵀ
    diagonal = X.new_zeros(k, n + 1, n + 1)  # Σᵢ wᵢ·A_ic·x̃_i·x̃_iᵀ, per class c
    for start in range(0, m, block_rows):
        Xb = torch.nn.functional.pad(X[start:start + block_rows], (0, 1), value=1.0)  # x̃ = (x, 1), (m_b, n + 1)
        Ab, wAb = A[start:start + block_rows], wA[start:start + block_rows]
        AX = (Ab[:, :, None] * Xb[:, None, :]).reshape(len(Xb), -1)  # A ⊗ x̃, (m_b, k·(n + 1))
        wAX = wAb[:, :, None] * Xb[:, None, :]  # (m_b, k, n + 1)
        outer.addmm_(wAX.reshape(len(Xb), -1).T, AX)
        diagonal.baddbmm_(wAX.permute(1, 2, 0), Xb.expand(k, -1, -1))  # (k, n + 1, m_b)·(k, m_b, n + 1)
    H = torch.block_diag(*diagonal) - outer  # in (class, feature-then-bias) order
    H = (H + H.T) / (2 * m)  # the GEMMs round (i, j) and (j, i) apart: symmetrise
    c, j = torch.meshgrid(torch.arange(k), torch.arange(n), indexing="ij")
    order = torch.cat([(c * (n + 1) + j).reshape(-1), torch.arange(k) * (n + 1) + n]).to(X.device)
    return H[order][:, order]  # to (W row by row, then b)


def softmax_gauge(H: Tensor, k: int, n: int, weights_flat: bool) -> Tensor:
    """``H`` plus ``c·uuᵀ`` for each direction ``u`` that shifts every class alike, so a Newton solve works.

    Adding one vector to every class's biases (and, without L2, to every class's weights of one feature) changes
    no prediction, so ``H`` is singular along those shifts; the gradient has no part along them either (its
    sum over the classes is ``Σ_c (A_c − Y_c) = 0``). ``H`` maps that subspace to itself, so adding ``c·uuᵀ``
    there leaves ``H·Δ = g`` with the same solution on the rest and ``Δ = 0`` along the shifts: the Newton
    step of the identifiable model, with the classes' sum kept where it was. ``c`` is H's mean diagonal, to keep
    the scale.

    Parameters
    ----------
    H : Tensor, shape (k·(n + 1), k·(n + 1))
        From :func:`softmax_hessian` (with the L2 term or not).
    k, n : int
        Classes and inputs of the layer.
    weights_flat : bool
        Whether the weights' shifts are flat too (no L2 penalty on them).
    """
    u = H.new_zeros(n + 1, k * (n + 1))  # one shift per row: per feature j (if flat), then the bias
    scale = 1 / math.sqrt(k)
    for j in range(n):
        if weights_flat:
            u[j, j:k * n:n] = scale  # W_{c, j} sits at c·n + j
    u[n, k * n:] = scale
    c = float(H.diagonal().mean()) or 1.0
    return H + c * (u.T @ u)


# --- the L2 penalty (λ/2)·‖W‖², on weights only -----------------------------------------------------------


def l2_penalty(weights: list[Tensor], l2: float) -> Tensor | float:
    """``(λ/2)·Σ‖W‖²`` over the weight matrices (never the biases)."""
    if l2 == 0:
        return 0.0
    return 0.5 * l2 * sum((W * W).sum() for W in weights)


def l2_backward(dW: Tensor, W: Tensor, l2: float) -> Tensor:
    """``dW + λ·W``: the penalty's gradient added to the data gradient."""
    return dW if l2 == 0 else dW + l2 * W


def l2_hessian(H: Tensor, l2: float, n_biases: int = 1) -> Tensor:
    """``H + λ·I`` on the weight block of a ``(W, b)`` Hessian whose last ``n_biases`` entries are the biases;
    the bias block is left alone, as the penalty never touches ``b``."""
    if l2 == 0:
        return H
    H = H.clone()
    H.diagonal()[:-n_biases] += l2  # ∂²[(λ/2)·‖W‖²]/∂W∂Wᵀ = λ·I
    return H
