"""The fused one-pass CPU kernel against the plain reference path and torch autograd.

``SingleNeuron(fused=True)`` (the default) takes :func:`neuron_torch.kernels.fused.neuron_pass` where it applies; on the
fused path ``BackwardPass.Z`` is empty, which is how these tests see which path ran. The reference path is
``fused=False``; the independent check is autograd on ``BCEWithLogits(X·wᵀ + b, Y) + (λ/2)‖w‖²`` in float64.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from conftest import compiler_skip_reason, tol
from neuron_torch import SingleNeuron
from neuron_torch.kernels import fused

# (m, n): one row, one feature, n not a multiple of any vector width, breast-cancer size, and one large
# enough (m·n above fused.SERIAL_BELOW) to run on several threads
SHAPES = [(1, 1), (1, 7), (5, 1), (37, 17), (455, 30), (100_000, 33)]
L2S = [0.0, 0.37]
# float32 results against float64 autograd on the same inputs, absolute on values of order 1. float32's
# ε is 1.2e-7: each z_i is a float32 dot product of n ≤ 33 terms (rounding grows like √n·ε·|z|, |z| ≲ 10 here),
# σ′ ≤ 1/4 and softplus′ ≤ 1 pass that on to dz_i and the loss, and the means over m add one float32 rounding
# per block of rows (the blocks are summed in double). That is ≲ 1e-6 in practice; 1e-5 leaves a margin
# and still fails on any real mistake (a lost row, a wrong sign, a wrong divisor).
FLOAT32_ATOL = 1e-5
FLOAT64_ATOL = 1e-12

needs_compiler = pytest.mark.skipif(compiler_skip_reason() is not None, reason=str(compiler_skip_reason()))
# tests that assert the kernel ran: they skip, saying why, where it is switched off (NEURON_TORCH_FUSED=0) or cannot
# be built; the conftest fixture reads the switch when the test runs
needs_fused = pytest.mark.usefixtures("needs_fused")


def make_problem(m: int, n: int, dtype: torch.dtype, l2: float = 0.0, scale: float = 1.0, seed: int = 0):
    """A neuron with random weight and bias, random data with both labels (unless m is tiny)."""
    gen = torch.Generator().manual_seed(seed + 1000 * m + n)
    nets = [SingleNeuron(n, l2=l2, fused=f).to(torch.float64) for f in (True, False)]
    w = torch.randn(1, n, generator=gen, dtype=torch.float64) * scale / n**0.5
    b = torch.randn(1, generator=gen, dtype=torch.float64)
    for net in nets:
        with torch.no_grad():
            net.linear.weight.copy_(w)
            net.linear.bias.copy_(b)
        net.to(dtype)
    X = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    Y = torch.randint(0, 2, (m, 1), generator=gen).to(dtype)
    return nets[0], nets[1], X, Y


def autograd_reference(net: SingleNeuron, X, Y, l2: float):
    """Loss and gradients in float64 by autograd, from the same (possibly float32) values."""
    w = net.linear.weight.detach().double().clone().requires_grad_(True)
    b = net.linear.bias.detach().double().clone().requires_grad_(True)
    Z = X.double() @ w.T + b
    loss = F.binary_cross_entropy_with_logits(Z, Y.double()) + (l2 / 2) * (w * w).sum()
    dw, db = torch.autograd.grad(loss, [w, b])
    return loss.detach(), {"linear.weight": dw, "linear.bias": db}


def max_error(bp, ref_loss, ref_grads) -> float:
    errors = [(bp.loss.double() - ref_loss).abs().item()]
    errors += [(g.double() - ref_grads[name]).abs().max().item() for name, g in bp.gradients.items()]
    return max(errors)


def check_like_reference(bp, ref_bp):
    """Same keys, shapes and dtypes as the reference path's result."""
    assert list(bp.gradients) == list(ref_bp.gradients)
    assert bp.loss.shape == ref_bp.loss.shape == ()
    assert bp.loss.dtype == ref_bp.loss.dtype
    for name, g in bp.gradients.items():
        assert g.shape == ref_bp.gradients[name].shape, name
        assert g.dtype == ref_bp.gradients[name].dtype, name


@needs_fused
def test_kernel_builds_and_is_taken():
    assert fused.is_available(), fused._failure
    net, _, X, Y = make_problem(455, 30, torch.float32)
    assert net.forward_backward(X, Y).Z == []  # the fused path ran


@needs_fused
@pytest.mark.parametrize("dtype,atol", [(torch.float64, FLOAT64_ATOL), (torch.float32, FLOAT32_ATOL)])
@pytest.mark.parametrize("l2", L2S)
@pytest.mark.parametrize("m,n", SHAPES)
def test_matches_reference_and_autograd(m, n, l2, dtype, atol):
    net, ref_net, X, Y = make_problem(m, n, dtype, l2)
    bp, ref_bp = net.forward_backward(X, Y), ref_net.forward_backward(X, Y)
    assert bp.Z == [] and len(ref_bp.Z) == 1
    check_like_reference(bp, ref_bp)
    ref_loss, ref_grads = autograd_reference(net, X, Y, l2)
    assert max_error(bp, ref_loss, ref_grads) <= atol
    assert max_error(ref_bp, ref_loss, ref_grads) <= atol  # the reference path is held to the same bar
    assert net.gradients(X, Y).keys() == ref_grads.keys()


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits_give_the_reference_loss(dtype):
    """|z| ≈ 1e4: exp(z) overflows, exp(−|z|) does not; the loss is finite and every dz is exactly 0 or ±1."""
    net, ref_net, X, Y = make_problem(64, 5, dtype, scale=1.0)
    X = torch.sign(X) * 1e4 / 5  # z = x·w + b with |w_k| ~ 1 puts |z| in the thousands, up to 1e4
    for module in (net, ref_net):
        with torch.no_grad():
            module.linear.weight.fill_(1.0)
    bp, ref_bp = net.forward_backward(X, Y), ref_net.forward_backward(X, Y)
    assert bp.Z == []
    assert torch.isfinite(bp.loss) and bp.loss.item() > 100
    # a mean of m = 64 non-negative terms summed in another order: at most m·ε apart, relative to the loss; the
    # gradients are means of dz·x with dz ∈ {0, ±1} and x = ±2000, exact in any order, held to the same bar
    rtol = tol(dtype, len(X))
    torch.testing.assert_close(bp.loss, ref_bp.loss, rtol=rtol, atol=0)
    for name, g in bp.gradients.items():
        torch.testing.assert_close(g, ref_bp.gradients[name], rtol=rtol, atol=rtol)


@needs_fused
@pytest.mark.parametrize("label", [0.0, 1.0])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, FLOAT64_ATOL), (torch.float32, FLOAT32_ATOL)])
def test_one_class_only(label, dtype, atol):
    net, _, X, _ = make_problem(300, 9, dtype)
    Y = torch.full((300, 1), label, dtype=dtype)
    bp = net.forward_backward(X, Y)
    assert bp.Z == []
    assert max_error(bp, *autograd_reference(net, X, Y, 0.0)) <= atol


def test_switched_off_by_argument_and_environment(monkeypatch):
    net, ref_net, X, Y = make_problem(37, 17, torch.float64)
    assert len(ref_net.forward_backward(X, Y).Z) == 1  # fused=False
    monkeypatch.setenv("NEURON_TORCH_FUSED", "0")
    bp, ref_bp = net.forward_backward(X, Y), ref_net.forward_backward(X, Y)
    assert len(bp.Z) == 1
    # exact: both nets run the reference path's operations on the same tensors, in this process
    assert torch.equal(bp.loss, ref_bp.loss)
    assert all(torch.equal(g, ref_bp.gradients[k]) for k, g in bp.gradients.items())


@needs_fused
def test_layouts_and_dtypes_it_does_not_take_fall_back():
    """A column-major X, float16 and bfloat16 take the reference path; a row slice of a wider X is read in place
    by the kernel (rows are still contiguous)."""
    net, ref_net, X, Y = make_problem(200, 12, torch.float32)
    column_major = X.T.contiguous().T
    assert not column_major.is_contiguous()
    bp, ref_bp = net.forward_backward(column_major, Y), ref_net.forward_backward(X, Y)
    assert len(bp.Z) == 1
    # The same operations, but BLAS blocks a column-major X otherwise than a row-major one (MKL on AVX-512 gives
    # 1.2291565 against 1.2291564): the n-term sums z_i = x_i·w move by |δz_i| ≤ n·ε·Σ_k|x_ik·w_k|, the loss by at
    # most that (|softplus′(z) − y| ≤ 1), a gradient by max|x|·|δz|/4 (σ′ ≤ ¼) plus dZᵀ·X's m-term sums in
    # another order, ≤ m·ε·max|x| (|dz_i| ≤ 1).
    m, n = X.shape
    w = net.linear.weight.detach()
    dz = tol(torch.float32, n * (X.abs() @ w.abs().T).max().item())
    x_max = max(1.0, X.abs().max().item())
    torch.testing.assert_close(bp.loss, ref_bp.loss, rtol=tol(torch.float32), atol=dz)
    for k, g in bp.gradients.items():
        torch.testing.assert_close(g, ref_bp.gradients[k], rtol=tol(torch.float32),
                                   atol=x_max * (dz / 4 + tol(torch.float32, m)), msg=k)

    wide = torch.cat([X, torch.full_like(X, float("nan"))], dim=1)[:, :12]  # NaN where the kernel must not read
    bp = net.forward_backward(wide, Y)
    assert bp.Z == []
    assert max_error(bp, *autograd_reference(net, X, Y, 0.0)) <= FLOAT32_ATOL

    for dtype in (torch.float16, torch.bfloat16):
        low, ref_low = net.to(dtype), ref_net.to(dtype)
        X_low, Y_low = X.to(dtype), Y.to(dtype)
        bp, ref_bp = low.forward_backward(X_low, Y_low), ref_low.forward_backward(X_low, Y_low)
        assert len(bp.Z) == 1 and bp.loss.dtype == dtype
        # exact: the kernel takes neither dtype, so both nets run the same reference operations on the same
        # tensors, in this process
        assert torch.equal(bp.loss, ref_bp.loss)
        assert all(torch.equal(g, ref_bp.gradients[k]) for k, g in bp.gradients.items())


@needs_compiler
def test_compiles_once_into_the_cache(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(fused, "_failure", None)
    with caplog.at_level(logging.INFO, logger="neuron_torch"):
        assert fused.is_available() and fused.is_available()
        built = list((tmp_path / "neuron_torch").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left behind
        monkeypatch.setattr(fused, "_kernels", None)  # a new process: finds the file, compiles nothing
        assert fused.is_available()
    compiling = [r for r in caplog.records if r.name == "neuron_torch" and "compiling" in r.getMessage()]
    assert len(compiling) == 1 and compiling[0].levelno == logging.INFO


@needs_compiler
def test_threads_asking_at_once_compile_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(fused, "_failure", None)
    with caplog.at_level(logging.INFO, logger="neuron_torch"):
        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(lambda _: fused.is_available(), range(4)))
    assert sum("compiling" in r.getMessage() for r in caplog.records if r.name == "neuron_torch") == 1


def test_broken_compiler_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: it must compile, and cannot
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(fused, "_failure", None)
    net, ref_net, X, Y = make_problem(455, 30, torch.float64)
    with caplog.at_level(logging.INFO, logger="neuron_torch"):
        results = [net.forward_backward(X, Y) for _ in range(3)]
        assert not fused.is_available()
    ref_bp = ref_net.forward_backward(X, Y)
    for bp in results:
        assert len(bp.Z) == 1
        # exact: the fallback is the reference path's operations on the same tensors, in this process
        assert torch.equal(bp.loss, ref_bp.loss)
        assert all(torch.equal(g, ref_bp.gradients[k]) for k, g in bp.gradients.items())
    warnings = [r for r in caplog.records if r.name == "neuron_torch" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "/bin/false" in warnings[0].getMessage()
