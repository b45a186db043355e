"""The classic numpy logistic-regression recipe, step for step, reproduced by SingleNeuron + GradientDescent.

The recipe stores X as (n, m) (features by samples) and w as (n, 1); the project stores X as (m, n) and the
weight as (1, n), as ``nn.Linear`` does. Same numbers either way: after k steps w and b agree to round-off.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler

from neuron_torch import SingleNeuron
from neuron_torch.nn.optim import GradientDescent, make_update_rule


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_recipe(X_nm: np.ndarray, Y_1m: np.ndarray, lr: float, k: int):
    """The seed recipe, verbatim: X (n, m), Y (1, m), w (n, 1) zeros, b = 0; returns w, b and the costs."""
    n, m = X_nm.shape
    w, b = np.zeros((n, 1)), 0.0
    costs = []
    for _ in range(k):
        A = sigmoid(w.T @ X_nm + b)  # (1, m)
        costs.append(-np.mean(Y_1m * np.log(A) + (1 - Y_1m) * np.log(1 - A)))
        dw = X_nm @ (A - Y_1m).T / m  # (n, 1)
        db = np.mean(A - Y_1m)
        w -= lr * dw
        b -= lr * db
    return w, b, np.array(costs)


@functools.lru_cache(maxsize=1)
def breast_cancer():
    X, y = load_breast_cancer(return_X_y=True)
    return StandardScaler().fit_transform(X), y.astype(np.float64)


def random_data():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(200, 6)) * np.array([1, 2, 0.5, 3, 1, 1]) + 0.3
    y = (X @ rng.normal(size=6) + rng.normal(size=200) > 0).astype(np.float64)
    return X, y


@pytest.mark.parametrize("make_opt", [
    lambda params, lr: GradientDescent(params, lr),
    lambda params, lr: make_update_rule("gd", params, lr),
], ids=["GradientDescent", "make_update_rule"])
@pytest.mark.parametrize("data,lr", [(breast_cancer, 0.5), (breast_cancer, 0.01), (random_data, 0.1)],
                         ids=["cancer-lr0.5", "cancer-lr0.01", "random-lr0.1"])
def test_single_neuron_reproduces_numpy_recipe(data, lr, make_opt):
    X, y = data()  # X (m, n), y (m,)
    k = 50
    w_ref, b_ref, costs_ref = numpy_recipe(X.T.copy(), y[None, :], lr, k)

    net = SingleNeuron(X.shape[1]).to(torch.float64)  # zero init, the recipe's start
    opt = make_opt(net.parameters(), lr)
    Xt = torch.from_numpy(X)  # (m, n)
    Yt = torch.from_numpy(y)[:, None]  # (m, 1)
    costs = []
    for _ in range(k):
        bp = net.forward_backward(Xt, Yt)
        costs.append(bp.loss.item())
        for name, p in net.named_parameters():
            p.grad = bp.gradients[name]
        opt.step()

    w = net.linear.weight.detach().numpy().T  # (n, 1), the recipe's layout
    b = net.linear.bias.item()
    assert np.abs(w - w_ref).max() <= 1e-12
    assert abs(b - b_ref) <= 1e-12
    # the loss the network reports before each step is the recipe's cost
    np.testing.assert_allclose(costs, costs_ref, rtol=0, atol=1e-12)
    # not a trivial agreement: the weights moved and the cost fell
    assert np.abs(w_ref).max() > 1e-2
    assert costs_ref[-1] < costs_ref[0]
