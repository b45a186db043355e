"""SingleNeuron's hand-written loss and gradients against independent references.

The references are torch autograd on the textbook formula, central finite differences of ``net.loss`` and the
exact value ``softplus(Z) − Y·Z`` written out by hand; all in float64 so that agreement can be asked to ~1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tol
from neuron_torch import SingleNeuron

DTYPE = torch.float64

# (m samples, n features); m = 1 and n = 1 are the shapes where a wrong reduction axis or a lost dimension shows.
SHAPES = [(1, 1), (1, 6), (9, 1), (25, 4), (128, 30)]
L2S = [0.0, 0.37]


def make_problem(m: int, n: int, l2: float, seed: int = 0):
    """A float64 neuron with random non-zero weight and bias, and random data with both labels."""
    gen = torch.Generator().manual_seed(seed + 1000 * m + n)
    net = SingleNeuron(n, l2=l2).to(DTYPE)
    with torch.no_grad():
        net.linear.weight.copy_(torch.randn(1, n, generator=gen, dtype=DTYPE))
        net.linear.bias.copy_(torch.randn(1, generator=gen, dtype=DTYPE))
    X = torch.randn(m, n, generator=gen, dtype=DTYPE)
    Y = torch.randint(0, 2, (m, 1), generator=gen).to(DTYPE)
    return net, X, Y


def autograd_reference(net: SingleNeuron, X, Y, l2: float):
    """Loss and gradients by autograd on ``BCEWithLogits(X·wᵀ + b, Y) + (λ/2)‖w‖²``, written independently of
    the product's forward code."""
    w = net.linear.weight.detach().clone().requires_grad_(True)
    b = net.linear.bias.detach().clone().requires_grad_(True)
    Z = X @ w.T + b
    loss = F.binary_cross_entropy_with_logits(Z, Y) + (l2 / 2) * (w * w).sum()
    dw, db = torch.autograd.grad(loss, [w, b])
    return loss.detach(), {"linear.weight": dw, "linear.bias": db}


@pytest.mark.parametrize("l2", L2S)
@pytest.mark.parametrize("m,n", SHAPES)
def test_gradients_match_autograd(m, n, l2):
    net, X, Y = make_problem(m, n, l2)
    ref_loss, ref_grads = autograd_reference(net, X, Y, l2)
    grads = net.gradients(X, Y)
    assert list(grads) == list(ref_grads)
    for name, g in grads.items():
        assert g.shape == ref_grads[name].shape, name
        assert g.dtype == DTYPE
        assert (g - ref_grads[name]).abs().max().item() <= 1e-10, name
    # the loss returned with the gradients, and the stand-alone loss, are the same number
    assert abs(net.forward_backward(X, Y).loss.item() - ref_loss.item()) <= 1e-12
    assert abs(net.loss(X, Y).item() - ref_loss.item()) <= 1e-12


@pytest.mark.parametrize("l2", L2S)
@pytest.mark.parametrize("m,n", [(1, 1), (1, 3), (7, 1), (20, 5)])
def test_gradients_match_finite_differences(m, n, l2):
    """Central differences of ``net.loss``: truncation error ~eps² and round-off ~1e-16/eps, both ≪ 1e-7."""
    net, X, Y = make_problem(m, n, l2, seed=1)
    grads = net.gradients(X, Y)
    eps = 1e-6
    for name, p in net.named_parameters():
        fd = torch.empty_like(p)
        flat_p, flat_fd = p.data.view(-1), fd.view(-1)
        for i in range(flat_p.numel()):
            orig = flat_p[i].item()
            flat_p[i] = orig + eps
            up = net.loss(X, Y).item()
            flat_p[i] = orig - eps
            down = net.loss(X, Y).item()
            flat_p[i] = orig
            flat_fd[i] = (up - down) / (2 * eps)
        err = (grads[name] - fd).abs()
        assert (err <= 1e-7 * fd.abs().clamp_min(1.0)).all(), (name, err.max().item())


@pytest.mark.parametrize("m", [1, 50])
def test_loss_matches_probability_form(m):
    """On moderate logits the stable form equals ``−[Y log σ(Z) + (1−Y) log(1−σ(Z))]``."""
    gen = torch.Generator().manual_seed(3)
    net = SingleNeuron(4).to(DTYPE)
    with torch.no_grad():
        net.linear.weight.copy_(torch.randn(1, 4, generator=gen, dtype=DTYPE))
        net.linear.bias.fill_(0.3)
    X = torch.randn(m, 4, generator=gen, dtype=DTYPE)
    Y = torch.randint(0, 2, (m, 1), generator=gen).to(DTYPE)
    Z = X @ net.linear.weight.detach().T + net.linear.bias.detach()
    assert Z.abs().max() < 10  # moderate: σ(Z) is far from 0 and 1, so the probability form is accurate
    expected = F.binary_cross_entropy(torch.sigmoid(Z), Y)
    assert abs(net.loss(X, Y).item() - expected.item()) <= 1e-12
    # forward() returns the probabilities themselves. It takes Z by addmm (b first in the sum), this test by X·wᵀ + b:
    # the n + 1 terms of each z are summed in another order, |δz| ≤ (n + 1)·ε·(Σ|x·w| + |b|); σ′ ≤ ¼ passes a quarter
    # of that on, and σ rounds once more
    terms = X.abs() @ net.linear.weight.detach().abs().T + net.linear.bias.detach().abs()  # (m, 1)
    atol = tol(DTYPE, 1 + (X.shape[1] + 1) * terms.max().item() / 4)
    torch.testing.assert_close(net(X), torch.sigmoid(Z), rtol=0, atol=atol)


@pytest.mark.parametrize("z,y", [(1e4, 0.0), (1e4, 1.0), (-1e4, 0.0), (-1e4, 1.0), (800.0, 0.0), (-800.0, 1.0)])
def test_loss_finite_for_huge_logits(z, y):
    """``softplus(Z) − Y·Z`` by hand: for Z = 1e4, Y = 0 the loss is 1e4; for Z = 1e4, Y = 1 it is 0.

    |Z| = 800 already overflows ``exp`` in float64, so the naive ``log(1 + e^Z)`` would be ``inf``.
    """
    net = SingleNeuron(1).to(DTYPE)
    with torch.no_grad():
        net.linear.weight.fill_(1.0)
    X = torch.tensor([[z]], dtype=DTYPE)  # Z = 1·z + 0 = z exactly
    Y = torch.tensor([[y]], dtype=DTYPE)
    # softplus(z) = max(z, 0) + log1p(exp(−|z|)); exp(−800) underflows to 0, so this is exact in float64
    expected = max(z, 0.0) + math.log1p(math.exp(-abs(z))) - y * z
    loss = net.loss(X, Y)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-15, abs=1e-300)
    bp = net.forward_backward(X, Y)
    assert bp.loss.item() == pytest.approx(expected, rel=1e-15, abs=1e-300)
    # dZ = σ(z) − y is 0 or ±1 here, so dw = dZ·z, db = dZ: finite, and exact on any path (a product by 0 or ±1
    # and a mean of one term round nothing)
    dZ = (1.0 if z > 0 else 0.0) - y
    assert bp.gradients["linear.weight"].item() == dZ * z
    assert bp.gradients["linear.bias"].item() == dZ


def test_loss_huge_logits_batch_mean():
    """A batch mixing the four saturated cases: the mean of 1e4, 0, 0, 1e4."""
    net = SingleNeuron(1).to(DTYPE)
    with torch.no_grad():
        net.linear.weight.fill_(1.0)
    X = torch.tensor([[1e4], [1e4], [-1e4], [-1e4]], dtype=DTYPE)
    Y = torch.tensor([[0.0], [1.0], [0.0], [1.0]], dtype=DTYPE)
    assert net.loss(X, Y).item() == 5e3  # exact in any order: every term and partial sum is an integer below 2⁵³


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
def test_gradients_under_no_grad_contexts(context):
    net, X, Y = make_problem(12, 3, 0.1, seed=2)
    _, ref = autograd_reference(net, X, Y, 0.1)
    with context():
        grads = net.gradients(X, Y)
    params = dict(net.named_parameters())
    assert list(grads) == list(params) == ["linear.weight", "linear.bias"]
    for name, g in grads.items():
        assert g.shape == params[name].shape
        assert not g.requires_grad
        assert (g - ref[name]).abs().max().item() <= 1e-10


def test_gradients_build_no_graph():
    """Even with parameters requiring grad and grad mode on, the hand-written gradients carry no graph."""
    net, X, Y = make_problem(8, 3, 0.0)
    assert torch.is_grad_enabled()
    grads = net.gradients(X, Y)
    assert all(g.grad_fn is None and not g.requires_grad for g in grads.values())


@pytest.mark.parametrize("n", [1, 7])
def test_zero_init_is_default(n):
    net = SingleNeuron(n)
    assert net.linear.weight.shape == (1, n) and net.linear.bias.shape == (1,)
    assert torch.count_nonzero(net.linear.weight) == 0
    assert torch.count_nonzero(net.linear.bias) == 0
    # at w = 0, b = 0 every probability is ½, so the loss is log 2 whatever the data
    X = torch.randn(5, n, dtype=torch.float64)
    Y = torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0]], dtype=torch.float64)
    assert net.to(DTYPE).loss(X, Y).item() == pytest.approx(math.log(2), rel=1e-15)
