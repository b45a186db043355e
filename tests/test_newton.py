"""The hand-written Hessian of the single neuron's loss and the Newton update rule.

The Hessian is checked against ``torch.autograd.functional.hessian`` in float64; one Newton step against
``torch.linalg.solve`` on autograd's Hessian and gradient; a few steps from zeros against scikit-learn's
optimum on breast cancer, with the gradient norm falling quadratically as Newton's method promises.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from neuron_torch import SingleNeuron
from neuron_torch.nn import layers
from neuron_torch.data.datamodule import breast_cancer
from neuron_torch.nn.optim import Newton

DTYPE = torch.float64


def problem(m: int = 60, n: int = 5, seed: int = 0):
    """Random features, labels from a noisy linear rule and a random (w, b), all float64."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n, generator=gen, dtype=DTYPE)
    Y = (X @ torch.randn(n, 1, generator=gen, dtype=DTYPE) + torch.randn(m, 1, generator=gen, dtype=DTYPE)
         > 0).to(DTYPE)
    theta = 0.5 * torch.randn(n + 1, generator=gen, dtype=DTYPE)  # (w₁, …, wₙ, b)
    return X, Y, theta


def loss_of_theta(X, Y, l2: float):
    """Mean BCE + (λ/2)·‖w‖² as a function of θ = (w, b), written with torch ops for autograd."""
    n = X.shape[1]

    def loss(theta):
        Z = X @ theta[:n, None] + theta[n]  # (m, 1)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(Z, Y)
        return bce + 0.5 * l2 * (theta[:n] ** 2).sum()
    return loss


def neuron_at(theta: torch.Tensor, l2: float) -> SingleNeuron:
    n = theta.numel() - 1
    net = SingleNeuron(n, l2=l2).to(DTYPE)
    with torch.no_grad():
        net.linear.weight.copy_(theta[:n].view(1, n))
        net.linear.bias.copy_(theta[n:])
    return net


@torch.no_grad()
def newton_step(net: SingleNeuron, opt: Newton, X, Y) -> float:
    """One update as a training step does it: gradients and loss, Hessian from X and A, then the rule.

    Returns the gradient norm at the point the step started from."""
    bp = net.forward_backward(X, Y)
    for name, p in net.named_parameters():
        p.grad = bp.gradients[name]
    H = layers.bce_hessian(X, net.linear.weight, net.linear.bias)  # (n + 1, n + 1), at the same (w, b)
    H = layers.l2_hessian(H, net.l2)
    opt.step(hessian=H)
    return torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in bp.gradients.values()])).item()


# --- the Hessian -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_rows", [None, 1, 7, 60, 1000])
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_hessian_matches_autograd(l2, block_rows):
    X, Y, theta = problem()
    expected = torch.autograd.functional.hessian(loss_of_theta(X, Y, l2), theta)  # (n + 1, n + 1)

    n = X.shape[1]
    H = layers.bce_hessian(X, theta[:n].view(1, n), theta[n:], block_rows=block_rows)
    H = layers.l2_hessian(H, l2)

    assert H.shape == (n + 1, n + 1) and H.dtype == DTYPE
    assert (H - expected).abs().max().item() <= 1e-10
    assert torch.equal(H, H.T)  # exact: bce_hessian symmetrises, (a + b)/2 = (b + a)/2 in IEEE arithmetic


def test_l2_hessian_leaves_bias_and_input_alone():
    H = torch.zeros(4, 4, dtype=DTYPE)
    H_l2 = layers.l2_hessian(H, 0.5)
    assert torch.equal(H_l2, torch.diag(torch.tensor([0.5, 0.5, 0.5, 0.0], dtype=DTYPE)))  # 0 + 0.5: no rounding
    assert torch.equal(H, torch.zeros(4, 4, dtype=DTYPE))


def test_hessian_makes_no_m_by_n_temporary():
    """Every allocation while building H is (m, 1) vectors or one row block (m_b, n), never X's size."""
    from torch.profiler import ProfilerActivity, profile

    m, n = 100_000, 16
    X = torch.randn(m, n, dtype=DTYPE)
    w, b = torch.randn(1, n, dtype=DTYPE), torch.randn(1, dtype=DTYPE)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        layers.bce_hessian(X, w, b)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest <= max(2 * m * X.element_size(), layers.HESSIAN_BLOCK_BYTES)  # X itself: 16·m·8 bytes


# --- one Newton step ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [1.0, 0.3])
@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_one_newton_step_matches_float64_solve(l2, lr):
    X, Y, theta = problem(seed=1)
    f = loss_of_theta(X, Y, l2)
    g = torch.autograd.functional.jacobian(f, theta)  # (n + 1,)
    H = torch.autograd.functional.hessian(f, theta)  # (n + 1, n + 1)
    expected = theta - lr * torch.linalg.solve(H, g)

    net = neuron_at(theta, l2)
    newton_step(net, Newton(net.parameters(), lr=lr), X, Y)
    got = torch.cat([net.linear.weight.detach().reshape(-1), net.linear.bias.detach()])

    assert (got - theta).abs().max().item() > 1e-2  # the step moved: the match is not trivial
    assert (got - expected).abs().max().item() <= 1e-12


def test_float32_parameters_step_in_their_dtype():
    X, Y, theta = problem(seed=2)
    net = neuron_at(theta, 0.1).float()
    newton_step(net, Newton(net.parameters()), X.float(), Y.float())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())


# --- converging to scikit-learn's optimum ------------------------------------------------------------------


def standardised_cancer():
    table = breast_cancer()
    X = (table.X - table.X.mean(0)) / table.X.std(0)  # as StandardScaler: population std
    return X, table.y


# λ = 1/(C·m) makes the project's mean-loss objective the one scikit-learn minimises (see test_sklearn_match.py).
# C = 1 is the ill-conditioned case the first-order rules need 10⁴–10⁵ updates for; Newton does not care. There
# the reference is scikit-learn's own Newton solver: lbfgs stops on its relative-decrease test (ftol) with
# ‖∇‖ ≈ 3e-8 whatever tol says, which at λ = 1/569 leaves its w about 1.1e-6 from the optimum (at C = 0.1,
# ‖∇‖ ≈ 4e-8 and λ ten times larger keep it within 1e-6). newton-cholesky ends at ‖∇‖ ≈ 1e-12.
@pytest.mark.parametrize("C,solver", [(0.1, "lbfgs"), (1.0, "newton-cholesky")])
def test_newton_reaches_sklearn_optimum_quadratically(C, solver):
    X, y = standardised_cancer()
    m, n = X.shape
    clf = LogisticRegression(C=C, solver=solver, tol=1e-10, max_iter=10_000).fit(X, y)
    coef, intercept = clf.coef_.ravel(), float(clf.intercept_[0])

    Xt = torch.from_numpy(X)  # (m, n) float64
    Yt = torch.from_numpy(y)[:, None]  # (m, 1)
    net = SingleNeuron(n, init="zeros", l2=1.0 / (C * m)).to(DTYPE)
    opt = Newton(net.parameters())
    norms = []  # ‖∇L‖ at the start of each step
    for _ in range(30):
        norms.append(newton_step(net, opt, Xt, Yt))
        if norms[-1] < 1e-13:
            break
    else:
        pytest.fail(f"Newton did not reach ‖∇‖ < 1e-13 in 30 steps: {norms}")

    assert len(norms) <= 15
    assert opt.damping == 0.0  # λ > 0: H was positive definite at every step
    w = net.linear.weight.detach().numpy().ravel()
    b = net.linear.bias.item()
    assert np.abs(coef).max() > 0.1  # far from the zero start
    assert np.abs(w - coef).max() <= 1e-6
    assert abs(b - intercept) <= 1e-6

    # quadratic convergence: e_{k+1} ≤ c·e_k² over the last three steps whose error is still above float64
    # round-off (‖∇‖ > 1e-14); measured c ≈ 8 at C = 0.1, ≈ 35 at C = 1. A linear rate would make c blow up.
    e = np.array(norms)
    pairs = [(a, b) for a, b in zip(e[:-1], e[1:]) if b > 1e-14][-3:]
    assert len(pairs) == 3, e
    assert max(b / a**2 for a, b in pairs) <= 100, e
    assert pairs[-1][1] <= 1e-3 * pairs[-1][0], e  # the last of them cuts the error by ≥ 10³


# --- what the rule refuses, and what it does when H is singular ---------------------------------------------


def test_step_without_hessian_or_with_the_wrong_shape_raises():
    X, Y, theta = problem()
    net = neuron_at(theta, 0.0)
    opt = Newton(net.parameters())
    for name, p in net.named_parameters():
        p.grad = net.gradients(X, Y)[name]
    with pytest.raises(ValueError, match="needs the Hessian"):
        opt.step()
    with pytest.raises(ValueError, match=r"shape \(6, 6\)"):
        opt.step(hessian=torch.eye(5, dtype=DTYPE))


@pytest.mark.parametrize("lr", [0.0, -1.0])
def test_non_positive_learning_rate_raises(lr):
    with pytest.raises(ValueError, match="learning rate"):
        Newton([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_singular_hessian_is_damped():
    """A zero-curvature direction (e.g. S = 0 on separable data, λ = 0) gets a damped, finite step."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=DTYPE))
    p.grad = torch.tensor([1.0, 1e-3, 2.0], dtype=DTYPE)
    H = torch.diag(torch.tensor([2.0, 0.0, 4.0], dtype=DTYPE))
    opt = Newton([p])
    opt.step(hessian=H)
    assert opt.damping > 0
    Delta = -p.detach()
    torch.testing.assert_close(H @ Delta + opt.damping * Delta, p.grad, rtol=1e-12, atol=0)
    assert Delta[0].item() == pytest.approx(0.5) and Delta[2].item() == pytest.approx(0.5)


def test_separable_data_without_l2_stays_finite():
    """No optimum exists (‖w‖ → ∞); the loss still falls towards 0 and every step stays finite."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(200, 2, generator=gen, dtype=DTYPE)
    Y = (X[:, :1] > 0).to(DTYPE)
    net = SingleNeuron(2).to(DTYPE)
    opt = Newton(net.parameters())
    for _ in range(40):
        newton_step(net, opt, X, Y)
        assert all(torch.isfinite(p).all() for p in net.parameters())
    assert net.loss(X, Y).item() < 1e-3


def test_lightning_counts_newton_steps_and_passes_the_hessian():
    """``self.optimizers().step(hessian=H)`` reaches the rule through Lightning and counts as a global step."""
    import lightning.pytorch as pl

    X, Y, theta = problem(seed=4)
    l2 = 0.05

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = neuron_at(theta, l2)

        def configure_optimizers(self):
            return Newton(self.net.parameters())

        @torch.no_grad()
        def training_step(self, batch, batch_idx):
            newton_step(self.net, self.optimizers(), *batch)

        def train_dataloader(self):  # the whole set as one batch, three epochs of one step
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=len(X))

    module = Module()
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)

    direct = neuron_at(theta, l2)
    opt = Newton(direct.parameters())
    for _ in range(3):
        newton_step(direct, opt, X, Y)
    assert trainer.global_step == 3
    for a, b in zip(module.net.parameters(), direct.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
