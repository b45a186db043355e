"""Update rules written by hand, as ``torch.optim.Optimizer`` subclasses.

Each rule reads the hand-made gradient from ``p.grad`` and writes its update equations in full; no
``torch.optim`` algorithm is called. Being ``Optimizer`` subclasses lets Lightning count their ``step()``
calls (``global_step``), checkpoint their state and drive ``torch.optim.lr_scheduler`` schedules.

L2 is part of the model's loss and gradients (``model.l2``), so every rule here sees it already; this is the
same as ``weight_decay`` in ``torch.optim.SGD`` and ``torch.optim.Adam``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


class GradientDescent(torch.optim.Optimizer):
    """Gradient descent, optionally with heavy-ball or Nesterov momentum.

    Per parameter ``p`` with gradient ``g`` (``v`` starts as ``g`` on the first step)::

        plain:     p ← p − α·g
        momentum:  v ← μ·v + g;       p ← p − α·v
        nesterov:  v ← μ·v + g;       p ← p − α·(g + μ·v)

    Parameters
    ----------
    params : iterable of Tensor
    lr : float
        Learning rate ``α``.
    momentum : float
        ``μ``; 0 is plain gradient descent.
    nesterov : bool
        Look-ahead form of momentum.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.0, nesterov: bool = False):
        if lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if mu == 0:
                    p.sub_(g, alpha=lr)  # p ← p − α·g
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = g.clone()  # v₁ = g₁
                else:
                    state["velocity"].mul_(mu).add_(g)  # v ← μ·v + g
                v = state["velocity"]
                p.sub_(g + mu * v if group["nesterov"] else v, alpha=lr)
        return None


class Adam(torch.optim.Optimizer):
    """Adam: moment estimates with bias correction.

    Per parameter, at step ``t`` with gradient ``g``::

        m ← β₁·m + (1 − β₁)·g
        v ← β₂·v + (1 − β₂)·g²
        m̂ = m / (1 − β₁ᵗ);  v̂ = v / (1 − β₂ᵗ)
        p ← p − α·m̂ / (√v̂ + ε)

    Parameters
    ----------
    params : iterable of Tensor
    lr : float
        Learning rate ``α``.
    betas : tuple of float
        ``(β₁, β₂)``, decay rates of the first and second moments.
    eps : float
        ``ε``, keeps the division finite.
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["t"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["t"] += 1
                t, m, v = state["t"], state["m"], state["v"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)  # m ← β₁·m + (1 − β₁)·g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v ← β₂·v + (1 − β₂)·g²
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + eps))  # p ← p − α·m̂ / (√v̂ + ε)
        return None


UPDATE_RULES = ("gd", "momentum", "nesterov", "adam")


def make_update_rule(name: str, params: Iterable[Tensor], lr: float, momentum: float = 0.9,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """The update rule called ``name`` (one of :data:`UPDATE_RULES`) over ``params``."""
    if name == "gd":
        return GradientDescent(params, lr)
    if name in ("momentum", "nesterov"):
        return GradientDescent(params, lr, momentum=momentum, nesterov=name == "nesterov")
    if name == "adam":
        return Adam(params, lr, betas=betas, eps=eps)
    raise ValueError(f"update_rule must be one of {', '.join(UPDATE_RULES)}; got {name!r}")
