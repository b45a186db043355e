"""Update rules written by hand, as ``torch.optim.Optimizer`` subclasses.

Each rule reads the hand-made gradient from ``p.grad`` and writes its update equations in full; no
``torch.optim`` algorithm is called. Being ``Optimizer`` subclasses lets Lightning count their ``step()``
calls (``global_step``), checkpoint their state and drive ``torch.optim.lr_scheduler`` schedules.

L2 is part of the model's loss and gradients (``model.l2``), so every rule here sees it already; this is the
same as ``weight_decay`` in ``torch.optim.SGD`` and ``torch.optim.Adam``. :class:`Newton` also needs the
Hessian, passed to its ``step(hessian=H)``; for L2 add it with :func:`neuron_torch.nn.layers.l2_hessian`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


class StepFailed(ArithmeticError):
    """No update can be computed from the current state (Newton: a non-finite Hessian, or one that damping
    cannot make positive definite). The parameters are left as they were; training has diverged."""


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


class Newton(torch.optim.Optimizer):
    """Newton's method (IRLS for logistic regression): the gradient scaled by the inverse Hessian.

    All parameters, in the order given (for :class:`~neuron_torch.SingleNeuron`: ``w`` of shape (1, n), then
    ``b`` of shape (1,)), are flattened into one ``θ`` of ``N`` entries. Each step takes the gradient ``g``
    from ``p.grad`` and the Hessian ``H`` (N, N) passed to it, and solves::

        H·Δ = g                      (Cholesky: H = LLᵀ, then two triangular solves)
        θ ← θ − α·Δ

    ``α = 1`` is the pure Newton step; for the single neuron's mean cross-entropy plus ``(λ/2)·‖w‖²`` this
    is iteratively reweighted least squares, and near the optimum the error squares each step. Get ``H``
    from :func:`neuron_torch.nn.layers.bce_hessian` and :func:`neuron_torch.nn.layers.l2_hessian`, evaluated at
    the same parameters as the gradient.

    The (N, N) solve runs in float64 whatever the parameters' dtype: it costs O(N³), nothing next to the
    pass over X that built H, and a float32 Cholesky would lose digits on a badly conditioned ``H``.

    When ``H`` is not positive definite in float64 — separable data where ``A(1 − A)`` underflows to 0 and
    ``λ = 0``, a constant or duplicated feature with ``λ = 0``, or float32 rounding in ``H`` — the step is
    damped as in Levenberg–Marquardt: ``(H + δ·I)·Δ = g`` with the smallest ``δ = 10ᵏ·ε·max(1, max diag H)``
    (``ε`` float64's machine epsilon, ``k = 0, 1, …``) for which the Cholesky factorisation succeeds. The
    ``δ`` of the last step is kept in :attr:`damping` (0 when ``H`` was positive definite).

    Parameters
    ----------
    params : iterable of Tensor
        The parameters ``H`` is taken with respect to, in ``H``'s order.
    lr : float
        Step size ``α``; 1 is the full Newton step. With several parameter groups each group's ``lr``
        scales its own part of ``Δ``.

    Examples
    --------
    >>> import torch
    >>> from neuron_torch import SingleNeuron
    >>> from neuron_torch.nn import layers
    >>> from neuron_torch.nn.optim import Newton
    >>> X, Y = torch.randn(100, 3, dtype=torch.float64), torch.rand(100, 1, dtype=torch.float64).round()
    >>> net = SingleNeuron(3, l2=0.01).double()
    >>> opt = Newton(net.parameters())
    >>> bp = net.forward_backward(X, Y)
    >>> for name, p in net.named_parameters():
    ...     p.grad = bp.gradients[name]
    >>> with torch.no_grad():  # as in a training step: no autograd graph
    ...     H = layers.l2_hessian(layers.bce_hessian(X, net.linear.weight, net.linear.bias), net.l2)
    >>> opt.step(hessian=H)
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 1.0):
        if lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr))
        self.damping = 0.0

    @torch.no_grad()
    def step(self, closure=None, *, hessian: Tensor | None = None):
        """One Newton step.

        Parameters
        ----------
        closure : None
            Accepted for the ``Optimizer`` interface (Lightning passes one) and not called, as in the other
            rules here: the gradient is already in ``p.grad``.
        hessian : Tensor, shape (N, N)
            Hessian of the loss with respect to all parameters flattened in order, at the point where
            ``p.grad`` was computed. Required, unless no parameter has a gradient: the step then leaves every
            parameter as it is, as torch's rules leave a parameter without one (how a training step has
            Lightning count updates it applied already). Through Lightning:
            ``self.optimizers().step(hessian=H)`` (keyword arguments are passed on to this method).
        """
        params = [p for group in self.param_groups for p in group["params"]]
        if all(p.grad is None for p in params):
            return None
        N = sum(p.numel() for p in params)
        if hessian is None:
            raise ValueError("Newton.step needs the Hessian: call step(hessian=H) with H of shape "
                             f"({N}, {N}), e.g. from neuron_torch.nn.layers.bce_hessian")
        if hessian.shape != (N, N):
            raise ValueError(f"hessian must have shape ({N}, {N}) to match the {N} parameter entries, "
                             f"got {tuple(hessian.shape)}")
        if any(p.grad is None for p in params):
            raise ValueError("Newton.step needs p.grad set on every parameter: Δ couples all of them")

        g = torch.cat([p.grad.reshape(-1) for p in params]).to(torch.float64)  # (N,)
        H = hessian.to(torch.float64)  # (N, N)
        L, info = torch.linalg.cholesky_ex(H)  # H = LLᵀ when H is positive definite (info == 0)
        self.damping = 0.0
        if info.item() != 0:  # not positive definite: damp until it is (see the class docstring)
            eps = torch.finfo(torch.float64).eps
            scale = max(1.0, H.diagonal().abs().max().item())
            if not torch.isfinite(H).all():
                raise StepFailed("the Hessian has non-finite entries")
            I = torch.eye(N, dtype=H.dtype, device=H.device)
            for k in range(20):  # δ up to ~2e3·max diag H, where Δ ≈ g/δ is a short gradient step
                self.damping = 10.0**k * eps * scale
                L, info = torch.linalg.cholesky_ex(H + self.damping * I)
                if info.item() == 0:
                    break
            else:
                raise StepFailed("the Hessian could not be made positive definite by damping")
        Delta = torch.cholesky_solve(g[:, None], L)[:, 0]  # H·Δ = g, (N,)

        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                k = p.numel()
                p.sub_(Delta[offset:offset + k].view_as(p).to(p.dtype), alpha=group["lr"])  # θ ← θ − α·Δ
                offset += k
        return None


# name → the rule over (params, lr). Each is called with the model's rule settings (momentum, betas, eps) as
# keywords and takes the ones it uses; a new rule is its Optimizer subclass above and one entry here.
RULES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "gd": lambda params, lr, **_: GradientDescent(params, lr),
    "momentum": lambda params, lr, momentum, **_: GradientDescent(params, lr, momentum=momentum),
    "nesterov": lambda params, lr, momentum, **_: GradientDescent(params, lr, momentum=momentum, nesterov=True),
    "adam": lambda params, lr, betas, eps, **_: Adam(params, lr, betas=betas, eps=eps),
    "newton": lambda params, lr, **_: Newton(params, lr),
}
UPDATE_RULES = tuple(RULES)  # the names, in the order messages list them
# Newton solves with the (N × N) Hessian of all N parameters: 8,192 of them make a 512 MiB float64 matrix and
# a Cholesky factorisation of ~2·10¹¹ flops per update. Past that the other rules are the right tool.
NEWTON_MAX_PARAMETERS = 8192


def make_update_rule(name: str, params: Iterable[Tensor], lr: float, momentum: float = 0.9,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """The update rule called ``name`` (a key of :data:`RULES`) over ``params``."""
    if name not in RULES:
        raise ValueError(f"update_rule must be one of {', '.join(RULES)}; got {name!r}")
    return RULES[name](params, lr, momentum=momentum, betas=betas, eps=eps)
