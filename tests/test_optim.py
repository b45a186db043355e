"""The hand-written update rules against torch.optim's algorithms, fed the same hand-made gradients.

Two identical float64 DeepNetworks are trained side by side for 100 updates: copy A by
``neuron_torch.nn.optim.make_update_rule``, copy B by the matching ``torch.optim`` class. Each copy takes its
gradients from its own ``net.gradients()``, so any difference in an update also shows up in every later
gradient; agreement to 1e-6 after 100 steps means the trajectories are the same.
"""

from __future__ import annotations

import copy

import pytest
import torch

from neuron_torch import DeepNetwork
from neuron_torch.nn.optim import UPDATE_RULES, Adam, GradientDescent, make_update_rule
from neuron_torch.nn import optim
from neuron_torch.nn.networks import SingleNeuron

DTYPE = torch.float64
STEPS = 100
M, N = 32, 4

# rule name → (learning rate, the torch.optim reference built over given param groups)
REFERENCES = {
    "gd": (0.1, lambda groups, lr: torch.optim.SGD(groups, lr=lr)),
    "momentum": (0.05, lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9)),
    "nesterov": (0.05, lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)),
    "adam": (0.01, lambda groups, lr: torch.optim.Adam(groups, lr=lr)),
}
SCHEDULES = {
    None: None,
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
}


def make_net(l2: float) -> DeepNetwork:
    gen = torch.Generator().manual_seed(0)
    return DeepNetwork(N, [5, 3], "tanh", init="xavier", l2=l2, generator=gen).to(DTYPE)


def batches():
    """A fresh random batch per step (the same for both copies), so the gradients keep changing."""
    gen = torch.Generator().manual_seed(1)
    w_true = torch.randn(N, 1, generator=gen, dtype=DTYPE)
    for _ in range(STEPS):
        X = torch.randn(M, N, generator=gen, dtype=DTYPE)
        Y = ((X @ w_true + 0.5 * torch.randn(M, 1, generator=gen, dtype=DTYPE)) > 0).to(DTYPE)
        yield X, Y


def set_grads(net: DeepNetwork, X, Y) -> None:
    grads = net.gradients(X, Y)
    for name, p in net.named_parameters():
        p.grad = grads[name]


def max_param_diff(a: DeepNetwork, b: DeepNetwork) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=lambda s: f"schedule={s}")
@pytest.mark.parametrize("l2", [0.0, 0.05])
@pytest.mark.parametrize("rule", [r for r in UPDATE_RULES if r != "newton"])  # newton: test_newton.py
def test_update_rule_matches_torch_optim(rule, l2, schedule):
    lr, make_reference = REFERENCES[rule]
    net_a = make_net(l2)
    # copy B carries no L2 in its loss: torch.optim adds it as weight_decay, on the weights only
    net_b = copy.deepcopy(net_a)
    net_b.l2 = 0.0
    start = copy.deepcopy(net_a)

    opt_a = make_update_rule(rule, net_a.parameters(), lr)
    weights = [p for name, p in net_b.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in net_b.named_parameters() if name.endswith("bias")]
    opt_b = make_reference([{"params": weights, "weight_decay": l2}, {"params": biases, "weight_decay": 0.0}], lr)

    sched_a = SCHEDULES[schedule](opt_a) if schedule else None
    sched_b = SCHEDULES[schedule](opt_b) if schedule else None

    worst = 0.0
    for X, Y in batches():
        set_grads(net_a, X, Y)
        set_grads(net_b, X, Y)
        opt_a.step()
        opt_b.step()
        if schedule:
            sched_a.step()
            sched_b.step()
            assert opt_a.param_groups[0]["lr"] == pytest.approx(opt_b.param_groups[0]["lr"], rel=1e-15)
        worst = max(worst, max_param_diff(net_a, net_b))

    assert worst <= 1e-6
    # the trajectory went somewhere: the agreement is not two nets that stood still
    assert max_param_diff(net_a, start) > 1e-2
    if schedule == "step":  # halved every 10 of the 100 steps
        assert opt_a.param_groups[0]["lr"] == pytest.approx(lr * 0.5**10, rel=1e-12)
    elif schedule == "cosine":  # annealed to 0 at T_max
        assert opt_a.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


def test_l2_in_loss_equals_weight_decay():
    """The network's L2 adds λ·W to weight gradients and nothing to bias gradients."""
    net_a = make_net(0.3)
    net_b = copy.deepcopy(net_a)
    net_b.l2 = 0.0
    X, Y = next(batches())
    ga, gb = net_a.gradients(X, Y), net_b.gradients(X, Y)
    for name, p in net_a.named_parameters():
        expected = gb[name] + 0.3 * p.detach() if name.endswith("weight") else gb[name]
        torch.testing.assert_close(ga[name], expected, rtol=0, atol=1e-15)


def params():
    return [torch.nn.Parameter(torch.zeros(3, dtype=DTYPE))]


@pytest.mark.parametrize("rule", UPDATE_RULES)
@pytest.mark.parametrize("lr", [0.0, -0.1])
def test_non_positive_learning_rate_raises(rule, lr):
    with pytest.raises(ValueError, match="learning rate"):
        make_update_rule(rule, params(), lr)


def test_nesterov_without_momentum_raises():
    with pytest.raises(ValueError, match="nesterov"):
        make_update_rule("nesterov", params(), 0.1, momentum=0.0)
    with pytest.raises(ValueError, match="nesterov"):
        GradientDescent(params(), 0.1, nesterov=True)


@pytest.mark.parametrize("name", ["sgd", "Adam", "", "lbfgs"])
def test_unknown_rule_raises(name):
    with pytest.raises(ValueError, match="update_rule must be one of"):
        make_update_rule(name, params(), 0.1)


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_momentum_out_of_range_raises(momentum):
    with pytest.raises(ValueError, match="momentum"):
        GradientDescent(params(), 0.1, momentum=momentum)


@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.999)])
def test_adam_betas_out_of_range_raise(betas):
    with pytest.raises(ValueError, match="betas"):
        Adam(params(), 0.1, betas=betas)


@pytest.mark.parametrize("name", sorted(optim.RULES))
def test_a_step_without_any_gradient_changes_nothing(name):
    # Lightning counts an update once per step() of its optimizer wrapper; the update loop counts updates it
    # has already applied with such steps, every p.grad None: each rule must then leave everything as it is
    net = SingleNeuron(3).double()
    with torch.no_grad():
        net.linear.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64))
    rule = optim.make_update_rule(name, net.parameters(), 0.1)
    X, Y = torch.randn(8, 3, dtype=torch.float64), (torch.rand(8, 1) > 0.5).double()
    bp = net.forward_backward(X, Y)
    for pname, p in net.named_parameters():
        p.grad = bp.gradients[pname]
    rule.step(hessian=net.hessian(X)) if name == "newton" else rule.step()  # state worth keeping
    before = [p.detach().clone() for p in net.parameters()]
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in rule.state.items()}
    for p in net.parameters():
        p.grad = None
    rule.step()
    for p, saved in zip(net.parameters(), before):
        assert torch.equal(p, saved)
    for p, s in rule.state.items():
        assert s.keys() == state[id(p)].keys()
        for key, value in s.items():
            saved = state[id(p)][key]
            assert torch.equal(value, saved) if torch.is_tensor(value) else value == saved
