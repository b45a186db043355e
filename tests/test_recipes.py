"""The recipes of docs/ARCHITECTURE.md, done as they say: a GELU activation and an RMSprop update rule.

Each recipe writes its code where the recipe puts it (here, in this file) and registers it the way the recipe
says (here with ``monkeypatch``, so the package is left as it is); the test checks the result against torch,
then checks from the source that the registries are the only places that spell out the names, so that the
recipe's places are all there is to touch.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Literal, get_args

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import tol
from neuron_torch.nn import layers, networks, optim
from neuron_torch.nn.networks import DeepNetwork

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "neuron_torch"
DTYPE = torch.float64


def spelled_out(names: set[str], package: Path = PACKAGE) -> set[str]:
    """Where the package's source spells out two or more of ``names`` together: a tuple, list or set of them,
    the keys of a dict, or a ``Literal[...]``. Each place is ``path:NAME``, the variable it is assigned to
    (``nn/layers.py:ACTIVATIONS``), or ``path:line`` where it is not assigned (an ``if name in (...)``)."""
    found = set()
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                items = node.elts
            elif isinstance(node, ast.Dict):
                items = node.keys
            else:
                continue
            strings = {item.value for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str)}
            if len(strings & names) < 2:
                continue
            where, line = node, node.lineno
            while where in parent and not isinstance(where, (ast.Assign, ast.AnnAssign)):
                where = parent[where]
            targets = where.targets if isinstance(where, ast.Assign) else [getattr(where, "target", None)]
            label = next((t.id for t in targets if isinstance(t, ast.Name)), None)
            if label is None and targets and isinstance(targets[0], ast.Attribute):
                label = targets[0].attr
            found.add(f"{path.relative_to(package)}:{label or line}")
    return found


def test_the_source_check_finds_a_list_of_names(tmp_path):
    # the checks below must be able to fail: a tuple in a condition and a set in an assignment are both found
    source = tmp_path / "neuron_torch" / "probe.py"
    source.parent.mkdir()
    source.write_text('CHOICES = {"relu", "tanh"}\n\n\ndef f(name):\n    return name in ("relu", "tanh")\n')
    assert spelled_out({"relu", "tanh"}, source.parent) == {"probe.py:CHOICES", "probe.py:5"}


# --- recipe: a new activation --------------------------------------------------------------------------------
# The recipe's code, as it goes into nn/layers.py beside the other activations: the forward line, then its
# derivative.


def gelu(Z: Tensor) -> Tensor:
    return Z * (0.5 * (1 + torch.erf(Z / math.sqrt(2))))  # GELU(Z) = Z·Φ(Z), Φ the standard normal CDF


def gelu_backward(dA: Tensor, Z: Tensor, A: Tensor) -> Tensor:
    Phi = 0.5 * (1 + torch.erf(Z / math.sqrt(2)))  # Φ(Z)
    phi = torch.exp(-0.5 * Z * Z) / math.sqrt(2 * math.pi)  # φ(Z) = Φ'(Z), the normal density
    return dA * (Phi + Z * phi)  # GELU'(Z) = Φ(Z) + Z·φ(Z)


@pytest.fixture
def with_gelu(monkeypatch):
    """The recipe's registration: one entry in nn/layers.py's ACTIVATIONS, the name in nn/networks.py's
    ActivationName."""
    monkeypatch.setitem(layers.ACTIVATIONS, "gelu", layers.Activation(gelu, gelu_backward))
    monkeypatch.setattr(networks, "ActivationName", Literal[(*get_args(networks.ActivationName), "gelu")])


def autograd_reference(net: DeepNetwork, X: Tensor, Y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss and its gradients by torch autograd, the forward pass from torch's own GELU and losses."""
    params = {name: p.detach().clone().requires_grad_(True) for name, p in net.named_parameters()}
    weights, biases = list(params.values())[::2], list(params.values())[1::2]
    A = X
    for W, b in zip(weights[:-1], biases[:-1]):
        A = F.gelu(F.linear(A, W, b))  # (m, n_l)
    Z = F.linear(A, weights[-1], biases[-1])  # (m, 1) or (m, k)
    data = (F.binary_cross_entropy_with_logits(Z, Y) if Z.shape[1] == 1 else F.cross_entropy(Z, Y.argmax(1)))
    loss = data + net.l2 / 2 * sum((W * W).sum() for W in weights)
    return loss.detach(), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.parametrize("n_outputs", [1, 3], ids=["sigmoid", "softmax"])
def test_gelu_recipe_gradients_match_autograd(with_gelu, n_outputs):
    gen = torch.Generator().manual_seed(n_outputs)
    m, n, hidden = 32, 5, [6, 4, 3]  # four linear layers, three of them GELU
    net = DeepNetwork(n, hidden, "gelu", init="xavier", l2=0.1, generator=gen, n_outputs=n_outputs).to(DTYPE)
    with torch.no_grad():
        for layer in net.layers:  # biases away from 0, so that their gradients are exercised
            layer.bias.copy_(0.5 * torch.randn(layer.bias.shape, generator=gen, dtype=DTYPE))
    X = torch.randn(m, n, generator=gen, dtype=DTYPE)
    labels = torch.randint(0, max(n_outputs, 2), (m,), generator=gen)
    Y = labels[:, None].to(DTYPE) if n_outputs == 1 else F.one_hot(labels, n_outputs).to(DTYPE)  # (m, 1) or (m, k)

    bp = net.forward_backward(X, Y)
    loss, expected = autograd_reference(net, X, Y)
    # each value is a sum over the m rows of products through the 4 layers, taken in another order by autograd:
    # m·(layers)·ε relative to the largest term bounds the drift
    rtol = tol(DTYPE, m * len(net.layers))
    assert list(bp.gradients) == list(expected)
    torch.testing.assert_close(bp.loss, loss, rtol=rtol, atol=0)
    for name, dW in bp.gradients.items():
        torch.testing.assert_close(dW, expected[name], rtol=rtol, atol=rtol * expected[name].abs().max().item(),
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_activation_names_are_spelled_out_only_where_the_recipe_registers_them():
    assert set(get_args(networks.ActivationName)) == set(layers.ACTIVATIONS)  # the two places agree
    assert spelled_out(set(layers.ACTIVATIONS)) == {"nn/layers.py:ACTIVATIONS", "nn/networks.py:ActivationName"}


# --- recipe: a new update rule -------------------------------------------------------------------------------
# The recipe's code, as it goes into nn/optim.py beside the other rules, and its one entry in RULES.


class RMSprop(torch.optim.Optimizer):
    """RMSprop: the gradient divided by a running root mean square of its recent values.

    Per parameter ``p`` with gradient ``g`` (``v`` starts at 0)::

        v ← ρ·v + (1 − ρ)·g²
        p ← p − α·g / (√v + ε)

    Parameters
    ----------
    params : iterable of Tensor
    lr : float
        Learning rate ``α``.
    alpha : float
        ``ρ``, the decay of the running mean of ``g²`` (torch's name for it).
    eps : float
        ``ε``, keeps the division finite.
    """

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, rho, eps = group["lr"], group["alpha"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["v"] = torch.zeros_like(p)
                v = state["v"]
                v.mul_(rho).addcmul_(g, g, value=1 - rho)  # v ← ρ·v + (1 − ρ)·g²
                p.sub_(lr * g / (v.sqrt() + eps))  # p ← p − α·g / (√v + ε)
        return None


@pytest.fixture
def with_rmsprop(monkeypatch):
    """The recipe's registration: one entry in nn/optim.py's RULES."""
    monkeypatch.setitem(optim.RULES, "rmsprop", lambda params, lr, eps, **_: RMSprop(params, lr, eps=eps))


def test_rmsprop_recipe_matches_torch(with_rmsprop):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=gen, dtype=DTYPE)
    Y = torch.randint(0, 2, (40, 1), generator=gen).to(DTYPE)
    ours, theirs = (DeepNetwork(3, [4], "tanh", init="xavier", generator=torch.Generator().manual_seed(1)).to(DTYPE)
                    for _ in range(2))
    rules = [optim.make_update_rule("rmsprop", ours.parameters(), 0.01, eps=1e-8),
             torch.optim.RMSprop(theirs.parameters(), lr=0.01, alpha=0.99, eps=1e-8)]
    assert isinstance(rules[0], RMSprop)
    steps = 25
    for _ in range(steps):
        for net, rule in zip((ours, theirs), rules):  # each from its own hand-made gradients, as training does
            gradients = net.forward_backward(X, Y).gradients
            for name, p in net.named_parameters():
                p.grad = gradients[name]
            rule.step()
    # the same equations in the same order as torch's, each rounding by ε/2 per step; the steps add up, and
    # g/(√v + ε) is near ±1 early on, so the parameters move by a few ε of their size per step
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=tol(DTYPE, 4 * steps), atol=tol(DTYPE, 4 * steps), msg=name)


def test_an_unknown_rule_is_refused_in_the_same_words_and_a_registered_one_is_named(with_rmsprop):
    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError) as refused:
        optim.make_update_rule("sgd", params, 0.1)
    assert str(refused.value) == "update_rule must be one of gd, momentum, nesterov, adam, newton, rmsprop; got 'sgd'"


def test_update_rule_names_are_spelled_out_only_in_the_registry():
    assert optim.UPDATE_RULES == tuple(optim.RULES) == ("gd", "momentum", "nesterov", "adam", "newton")
    assert spelled_out(set(optim.RULES)) == {"nn/optim.py:RULES"}
