"""k classes and weighted rows on the hand-written machinery, against torch autograd and scikit-learn.

scikit-learn's ``LogisticRegression(C=C)`` minimises ``C·Σᵢ sᵢ·lossᵢ + ½‖W‖²`` with ``sᵢ`` the sample weight
times the class weight; dividing by ``C·Σs`` gives ``Σ sᵢ·lossᵢ / Σ s + (λ/2)·‖W‖²`` with ``λ = 1/(C·Σs)``:
the project's weighted-mean objective, so both have the same minimiser. For k classes both use the softmax
over k units (scikit-learn's multinomial loss), whose L2 penalty makes the weights unique; the intercepts,
unpenalised, are unique up to a shift common to all classes, which neither changes any probability nor
happens here (both start at 0 and move only along gradients, whose sum over the classes is 0).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from sklearn import datasets
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from neuron_torch.nn import layers
from neuron_torch.data.labels import class_weights
from neuron_torch.nn.networks import SoftmaxRegression, build_network
from neuron_torch.nn.optim import Newton

F64 = torch.float64


def one_hot(y: np.ndarray, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(y).long(), k).to(F64)


def autograd_reference(net, X, y, k, weight, l2):
    """Loss and gradients of the same objective through torch's own losses and autograd."""
    for p in net.parameters():
        p.grad = None
    with torch.enable_grad():
        Z = net.logits(X)
        if k == 2:
            per_row = torch.nn.functional.binary_cross_entropy_with_logits(Z, y[:, None].to(F64), reduction="none")
        else:
            per_row = torch.nn.functional.cross_entropy(Z, y, reduction="none")[:, None]
        loss = per_row.mean() if weight is None else (per_row * weight).sum() / weight.sum()
        loss = loss + 0.5 * l2 * sum((layer.weight ** 2).sum() for layer in net.linears)
        loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}


@pytest.mark.parametrize("k", range(3, 11))
@pytest.mark.parametrize("hidden", [(), (6,), (5, 4)], ids=["linear", "one-hidden", "two-hidden"])
@pytest.mark.parametrize("l2", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
def test_gradients_equal_autograd(k, hidden, l2, weighted):
    gen = torch.Generator().manual_seed(k * 100 + len(hidden))
    m, n = 41, 7
    net = build_network(n, k, hidden, "tanh", "normal", l2, generator=gen).double()
    X = torch.randn(m, n, dtype=F64, generator=gen) * 2
    y = torch.randint(0, k, (m,), generator=gen)
    weight = torch.rand(m, 1, dtype=F64, generator=gen) * 3 if weighted else None
    bp = net.forward_backward(X, one_hot(y, k), weight)
    loss, grads = autograd_reference(net, X, y, k, weight, l2)
    assert abs(float(bp.loss - loss)) <= 1e-10
    for name, g in grads.items():
        torch.testing.assert_close(bp.gradients[name], g, rtol=0, atol=1e-10)


def test_two_classes_stay_one_sigmoid_unit():
    net = build_network(5, 2)
    assert type(net).__name__ == "SingleNeuron" and net.linear.out_features == 1 and net.output == "sigmoid"
    deep = build_network(5, 4, (3,))
    assert deep.linears[-1].out_features == 4 and deep.output == "softmax"


def test_softmax_loss_finite_for_huge_logits():
    Z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3]], dtype=F64)
    Y = one_hot(np.array([1, 1]), 3)
    loss = layers.cross_entropy_from_logits(Z, Y)
    assert torch.isfinite(loss)
    # row 0 puts all its mass on the wrong class: loss 2e4 (exactly logsumexp − Z_1); row 1 is right: 0
    assert float(loss) == pytest.approx(1e4, rel=1e-12)


@pytest.mark.parametrize("k,weighted", [(3, False), (5, True)])
def test_softmax_hessian_equals_autograd(k, weighted):
    gen = torch.Generator().manual_seed(k)
    m, n = 33, 4
    X = torch.randn(m, n, dtype=F64, generator=gen)
    Y = one_hot(torch.randint(0, k, (m,), generator=gen).numpy(), k)
    W, b = torch.randn(k, n, dtype=F64, generator=gen), torch.randn(k, dtype=F64, generator=gen)
    weight = torch.rand(m, 1, dtype=F64, generator=gen) if weighted else None

    def loss(theta):
        return layers.cross_entropy_from_logits(layers.linear_forward(X, theta[:k * n].view(k, n), theta[k * n:]),
                                                Y, weight)

    expected = torch.autograd.functional.hessian(loss, torch.cat([W.reshape(-1), b]))
    H = layers.softmax_hessian(X, W, b, weight, block_rows=7)  # several blocks, one ragged
    torch.testing.assert_close(H, expected, rtol=0, atol=1e-12)


def test_newton_step_is_the_identifiable_models():
    """The gauge makes H invertible without moving the step: Δ is the pseudo-inverse's solution."""
    gen = torch.Generator().manual_seed(3)
    k, m, n = 4, 60, 3
    net = SoftmaxRegression(n, k, init="normal", generator=gen).double()
    X = torch.randn(m, n, dtype=F64, generator=gen)
    Y = one_hot(torch.randint(0, k, (m,), generator=gen).numpy(), k)
    with torch.no_grad():  # start from parameters whose class sums are 0, as zero initialisation keeps them
        for p in net.parameters():
            p -= p.mean(0, keepdim=True)
    grads = net.gradients(X, Y)
    g = torch.cat([grads["linear.weight"].reshape(-1), grads["linear.bias"]])
    H = layers.softmax_hessian(X, net.linear.weight, net.linear.bias)
    expected = torch.linalg.pinv(H, hermitian=True) @ g
    Delta = torch.linalg.solve(net.hessian(X), g)
    torch.testing.assert_close(Delta, expected, rtol=0, atol=1e-9)


# --- converged fits against scikit-learn ---------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def table(name: str):
    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return StandardScaler().fit_transform(X), y


def newton_fit(X: np.ndarray, y: np.ndarray, l2: float, weight=None, steps: int = 30):
    """The project's Newton (IRLS) updates to convergence, from zero weights, in float64."""
    k = int(y.max()) + 1
    net = build_network(X.shape[1], k, l2=l2, fused=False).double()
    Xt = torch.from_numpy(X)
    Y = torch.from_numpy(y.astype(np.float64))[:, None] if k == 2 else one_hot(y, k)
    W = None if weight is None else torch.as_tensor(weight, dtype=F64)[:, None]
    rule = Newton(net.parameters(), lr=1.0)
    for _ in range(steps):
        grads = net.gradients(Xt, Y, W)
        for name, p in net.named_parameters():
            p.grad = grads[name]
        rule.step(hessian=net.hessian(Xt, W))
        if torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()])) < 1e-12:
            break
    return net, Xt


def sklearn_fit(X, y, l2, sample_weight=None, class_weight=None):
    s = np.ones(len(y)) if sample_weight is None else sample_weight
    if class_weight is not None:
        k = int(y.max()) + 1
        s = s * class_weights(class_weight, [str(c) for c in range(k)], np.bincount(y, s, minlength=k))[y]
    C = 1.0 / (l2 * s.sum())
    return LogisticRegression(C=C, class_weight=class_weight, tol=1e-12, max_iter=100_000).fit(
        X, y, sample_weight=sample_weight)


def assert_same_fit(net, Xt, clf):
    k = len(clf.classes_)
    W, b = net.linear.weight.detach().numpy(), net.linear.bias.detach().numpy()
    np.testing.assert_allclose(W, clf.coef_, rtol=0, atol=1e-4)
    np.testing.assert_allclose(b, clf.intercept_, rtol=0, atol=1e-4)
    P = net(Xt).detach().numpy()
    P = np.hstack([1 - P, P]) if k == 2 else P
    np.testing.assert_allclose(P, clf.predict_proba(Xt.numpy()), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["iris", "wine"])
def test_multinomial_fit_equals_sklearn(name):
    X, y = table(name)
    l2 = 0.01
    net, Xt = newton_fit(X, y, l2)
    assert_same_fit(net, Xt, sklearn_fit(X, y, l2))


@pytest.mark.parametrize("name,class_weight", [("breast_cancer", "balanced"), ("wine", "balanced"),
                                               ("iris", {"0": 3.0, "2": 0.5})])
def test_weighted_fit_equals_sklearn(name, class_weight):
    X, y = table(name)
    rng = np.random.default_rng(0)
    sample_weight = rng.integers(0, 4, len(y)).astype(np.float64)  # zeros included: those rows drop out
    k = int(y.max()) + 1
    classes = [str(c) for c in range(k)]
    per_class = class_weights(class_weight, classes, np.bincount(y, sample_weight, minlength=k))
    l2 = 0.02
    net, Xt = newton_fit(X, y, l2, sample_weight * per_class[y])
    clf = sklearn_fit(X, y, l2, sample_weight,
                      {int(c): w for c, w in class_weight.items()} if isinstance(class_weight, dict) else class_weight)
    assert_same_fit(net, Xt, clf)


@pytest.mark.parametrize("k", [2, 3])
def test_weight_two_equals_a_duplicated_row(k):
    gen = torch.Generator().manual_seed(k)
    m, n = 30, 5
    net = build_network(n, k, (4,), "relu", "he", 0.1, generator=gen).double()
    X = torch.randn(m, n, dtype=F64, generator=gen)
    y = torch.randint(0, k, (m,), generator=gen)
    Y = y[:, None].to(F64) if k == 2 else one_hot(y, k)
    twice = torch.arange(m) % 3 == 0  # every third row counts twice
    weight = 1.0 + twice.to(F64)[:, None]
    weighted = net.forward_backward(X, Y, weight)
    rows = torch.cat([torch.arange(m), torch.arange(m)[twice]])
    duplicated = net.forward_backward(X[rows], Y[rows])
    eps = torch.finfo(F64).eps
    assert abs(float(weighted.loss - duplicated.loss)) <= 64 * eps
    for name, g in duplicated.gradients.items():
        torch.testing.assert_close(weighted.gradients[name], g, rtol=0, atol=64 * eps)
