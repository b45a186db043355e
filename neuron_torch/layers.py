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


# --- the L2 penalty (λ/2)·‖W‖², on weights only -----------------------------------------------------------


def l2_penalty(weights: list[Tensor], l2: float) -> Tensor | float:
    """``(λ/2)·Σ‖W‖²`` over the weight matrices (never the biases)."""
    if l2 == 0:
        return 0.0
    return 0.5 * l2 * sum((W * W).sum() for W in weights)


def l2_backward(dW: Tensor, W: Tensor, l2: float) -> Tensor:
    """``dW + λ·W``: the penalty's gradient added to the data gradient."""
    return dW if l2 == 0 else dW + l2 * W
