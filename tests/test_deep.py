"""DeepNetwork's hand-written backprop against torch autograd and finite differences, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tol
from neuron_torch import DeepNetwork, SingleNeuron
from neuron_torch.nn.layers import LEAKY_SLOPE
from neuron_torch.nn.optim import make_update_rule

DTYPE = torch.float64
ACTIVATIONS = ["relu", "tanh", "sigmoid", "leaky_relu"]
# hidden_sizes of length 0..3: networks of 1 to 4 linear layers, with widths of 1 among them
HIDDEN = [[], [4], [5, 1], [6, 3, 2]]
SHAPES = [(1, 1), (1, 5), (17, 3)]  # (m, n_features)

# An activation written with torch's own functions, independently of neuron_torch.nn.layers, for the reference.
TORCH_ACT = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": lambda Z: F.leaky_relu(Z, LEAKY_SLOPE),
}


def make_problem(n, hidden, activation, m, l2, init="he", seed=0):
    """A float64 net with random (He or Xavier) weights and random biases, and random data."""
    gen = torch.Generator().manual_seed(seed)
    net = DeepNetwork(n, hidden, activation, init=init, l2=l2, generator=gen).to(DTYPE)
    with torch.no_grad():
        for layer in net.layers:  # non-zero biases, so that their gradients are exercised away from b = 0
            layer.bias.copy_(0.5 * torch.randn(layer.bias.shape, generator=gen, dtype=DTYPE))
    X = torch.randn(m, n, generator=gen, dtype=DTYPE)
    Y = torch.randint(0, 2, (m, 1), generator=gen).to(DTYPE)
    return net, X, Y


def reference_logits(params, activation, X):
    """Forward pass from F.linear and torch activations; ``params`` is [W1, b1, W2, b2, ...]."""
    g = TORCH_ACT[activation]
    A = X
    pairs = list(zip(params[::2], params[1::2]))
    for W, b in pairs[:-1]:
        A = g(F.linear(A, W, b))
    W, b = pairs[-1]
    return F.linear(A, W, b)


def autograd_reference(net, X, Y, l2):
    names = [name for name, _ in net.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    Z = reference_logits(params, net.activation, X)
    penalty = sum((W * W).sum() for W in params[::2])  # weights only, never biases
    loss = F.binary_cross_entropy_with_logits(Z, Y) + l2 / 2 * penalty
    grads = torch.autograd.grad(loss, params)
    return Z.detach(), loss.detach(), dict(zip(names, grads))


@pytest.mark.parametrize("l2", [0.0, 0.25])
@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("hidden", HIDDEN, ids=lambda h: f"hidden{h}")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backprop_matches_autograd(activation, hidden, m, n, l2):
    init = "xavier" if activation in ("tanh", "sigmoid") else "he"
    net, X, Y = make_problem(n, hidden, activation, m, l2, init=init, seed=len(hidden) * 100 + m + n)
    ref_Z, ref_loss, ref_grads = autograd_reference(net, X, Y, l2)

    # the product's forward agrees with the independent one, so the autograd reference is of the same function
    assert (net.logits(X) - ref_Z).abs().max().item() <= 1e-12

    bp = net.forward_backward(X, Y)
    assert list(bp.gradients) == [name for name, _ in net.named_parameters()]
    assert abs(bp.loss.item() - ref_loss.item()) <= 1e-12
    assert abs(net.loss(X, Y).item() - ref_loss.item()) <= 1e-12
    for name, g in bp.gradients.items():
        assert g.shape == ref_grads[name].shape, name
        assert (g - ref_grads[name]).abs().max().item() <= 1e-9, name
    # one pre-activation per layer, the last one the logits
    assert len(bp.Z) == len(hidden) + 1
    assert (bp.Z[-1] - ref_Z).abs().max().item() <= 1e-12


@pytest.mark.parametrize("l2", [0.0, 0.1])
def test_backprop_matches_finite_differences_tanh(l2):
    """Central differences of ``net.loss`` on a small tanh net: error ~eps² + 1e-16/eps ≪ 1e-7."""
    net, X, Y = make_problem(3, [4, 2], "tanh", 6, l2, init="xavier", seed=11)
    grads = net.gradients(X, Y)
    eps = 1e-6
    for name, p in net.named_parameters():
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            orig = flat[i].item()
            flat[i] = orig + eps
            up = net.loss(X, Y).item()
            flat[i] = orig - eps
            down = net.loss(X, Y).item()
            flat[i] = orig
            fd = (up - down) / (2 * eps)
            analytic = grads[name].view(-1)[i].item()
            assert abs(analytic - fd) <= 1e-7 * max(1.0, abs(fd)), (name, i, analytic, fd)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_gradient_step_lowers_loss(activation):
    """For small α the loss falls by ≈ α·‖∇‖² (first order); the second-order term is O(α²)."""
    net, X, Y = make_problem(4, [8, 4], activation, 32, 0.01, seed=5)
    bp = net.forward_backward(X, Y)
    sq_norm = sum((g * g).sum() for g in bp.gradients.values()).item()
    assert sq_norm > 1e-6
    lr = 1e-3
    opt = make_update_rule("gd", net.parameters(), lr)
    for name, p in net.named_parameters():
        p.grad = bp.gradients[name]
    opt.step()
    after = net.loss(X, Y).item()
    decrease = bp.loss.item() - after
    assert decrease > 0
    assert decrease == pytest.approx(lr * sq_norm, rel=1e-2)


@pytest.mark.parametrize("hidden", [[4], [3, 2]])
def test_zero_init_refused_with_hidden_layers(hidden):
    with pytest.raises(ValueError, match="zeros"):
        DeepNetwork(5, hidden, init="zeros")


def test_zero_init_allowed_without_hidden_layers():
    net = DeepNetwork(5, [], init="zeros")
    assert all(torch.count_nonzero(p) == 0 for p in net.parameters())


@pytest.mark.parametrize("l2", [0.0, 0.3])
@pytest.mark.parametrize("m", [1, 20])
def test_no_hidden_layer_equals_single_neuron(m, l2):
    """``hidden_sizes=[]`` is the single neuron: same logits, loss and gradients for the same weights."""
    gen = torch.Generator().manual_seed(m)
    n = 4
    deep = DeepNetwork(n, [], "relu", l2=l2).to(DTYPE)
    single = SingleNeuron(n, l2=l2).to(DTYPE)
    with torch.no_grad():
        W = torch.randn(1, n, generator=gen, dtype=DTYPE)
        b = torch.randn(1, generator=gen, dtype=DTYPE)
        deep.layers[0].weight.copy_(W), deep.layers[0].bias.copy_(b)
        single.linear.weight.copy_(W), single.linear.bias.copy_(b)
    X = torch.randn(m, n, generator=gen, dtype=DTYPE)
    Y = torch.randint(0, 2, (m, 1), generator=gen).to(DTYPE)

    # exact: logits and loss are the one shared code (HandBackprop) on the same tensors, in this process
    torch.testing.assert_close(deep.logits(X), single.logits(X), rtol=0, atol=0)
    torch.testing.assert_close(deep(X), single(X), rtol=0, atol=0)
    assert deep.loss(X, Y).item() == single.loss(X, Y).item()
    gd, gs = deep.gradients(X, Y), single.gradients(X, Y)
    assert list(gd) == ["layers.0.weight", "layers.0.bias"]
    # the single neuron takes the fused kernel, which sums each z's n + 1 terms and each gradient's m terms in its
    # own order: at most (n + 1 + m)·ε times the largest term, here ≤ max|x|·(Σ|w| + |b|) or max|x| (|dz| ≤ 1)
    scale = X.abs().max().item() * max(1.0, W.abs().sum().item() + b.abs().item())
    atol = tol(DTYPE, (n + 1 + m) * scale)
    torch.testing.assert_close(gd["layers.0.weight"], gs["linear.weight"], rtol=0, atol=atol)
    torch.testing.assert_close(gd["layers.0.bias"], gs["linear.bias"], rtol=0, atol=atol)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("hidden", [[], [5], [4, 3]], ids=lambda h: f"hidden{h}")
def test_tracked_values(activation, hidden):
    """Names and values line up; norms are the weights' and the autograd gradients' norms; dead_relu ∈ [0, 1]."""
    net, X, Y = make_problem(3, hidden, activation, 10, 0.05, seed=3)
    bp = net.forward_backward(X, Y)
    names = net.tracked_names(["a", "b", "c"])
    values = net.tracked_values(bp)
    assert values.shape == (len(names),)
    _, _, ref_grads = autograd_reference(net, X, Y, 0.05)
    by_name = dict(zip(names, values.tolist()))
    for i, layer in enumerate(net.layers):
        assert by_name[f"layer{i + 1}/weight_norm"] == pytest.approx(layer.weight.norm().item(), rel=1e-12)
        ref_norm = ref_grads[f"layers.{i}.weight"].norm().item()
        assert by_name[f"layer{i + 1}/grad_norm"] == pytest.approx(ref_norm, rel=1e-9)
    dead = [v for name, v in by_name.items() if name.endswith("dead_relu")]
    assert len(dead) == (len(hidden) if activation == "relu" else 0)
    assert all(0.0 <= v <= 1.0 for v in dead)


def test_dead_relu_fraction_is_exact():
    """Two of four hidden ReLU units pushed to Z ≤ 0 on every sample: dead_relu = 0.5 exactly.

    A third unit is negative on some samples only: it is alive (dead means Z ≤ 0 on *every* sample).
    """
    net, X, Y = make_problem(3, [4], "relu", 16, 0.0, seed=4)
    with torch.no_grad():
        net.layers[0].weight[:2].zero_()
        net.layers[0].bias[:2] = -1.0  # Z = −1 for units 0 and 1 on every sample
        net.layers[0].weight[2] = torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE)
        net.layers[0].bias[2] = 0.0  # Z = x₀ for unit 2: of both signs over the batch
        net.layers[0].bias[3] = 100.0  # Z > 0 for unit 3 on every sample (|W·x| ≪ 100 here)
    assert (X[:, 0] > 0).any() and (X[:, 0] < 0).any()
    bp = net.forward_backward(X, Y)
    by_name = dict(zip(net.tracked_names(["a", "b", "c"]), net.tracked_values(bp).tolist()))
    assert by_name["layer1/dead_relu"] == 0.5  # 2 of 4 units: a ratio of small integers, exact in any order
    # a dead unit passes no gradient back: its incoming weights get exactly zero data gradient
    assert torch.count_nonzero(bp.gradients["layers.0.weight"][:2]) == 0
