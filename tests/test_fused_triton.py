"""The fused Triton kernel against the reference path: natively on CUDA, under Triton's interpreter on CPU.

Without a GPU the kernel runs under ``TRITON_INTERPRET=1``, in one child process that computes every case at once:
Triton reads that setting when it is first imported, and in this process it is imported already, compiled mode
(Lightning imports it). Each test then compares its case here. With CUDA, each test runs the kernel natively in
this process on the same inputs. The reference is ``SingleNeuron(fused=False).forward_backward`` in the kernel's
accumulation dtype (float32 for bfloat16 X, whose values float32 holds exactly).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tol
from neuron_torch import SingleNeuron
from neuron_torch.data.storage import storage_dtype
from neuron_torch.kernels import fused, fused_triton

CUDA = torch.cuda.is_available()
TRITON_MISSING = importlib.util.find_spec("triton") is None
needs_triton = pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed (the test extra installs it on "
                                                         "Linux x86_64): the fused CUDA kernel cannot run here")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device: torch.cuda.is_available() is False")

f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
# id: (m, n, dtype of X, how X is made). m = 1; ragged m (not a multiple of any block); several blocks per
# program; n not a power of two; n > fused_triton.MAX_BLOCK_N (two column tiles, the second read from cache);
# |z| up to 1e4; a row slice of a wider X (row stride ≠ n) with Y a column of a wider tensor; bfloat16 X with
# float32 or bfloat16 Y
CASES = {
    "1x1-f32": (1, 1, f32, "random"),
    "1x7-f64": (1, 7, f64, "random"),
    "37x17-f32": (37, 17, f32, "random"),
    "37x17-f64": (37, 17, f64, "random"),
    "1000x30-f32": (1000, 30, f32, "random"),
    "1000x30-f64": (1000, 30, f64, "random"),
    "129x600-f32": (129, 600, f32, "random"),
    "67x515-f64": (67, 515, f64, "random"),
    "extreme-64x5-f32": (64, 5, f32, "extreme"),
    "extreme-64x5-f64": (64, 5, f64, "extreme"),
    "strided-200x12-f32": (200, 12, f32, "strided"),
    "257x30-bf16": (257, 30, bf16, "random"),
    "37x17-bf16-labels": (37, 17, bf16, "bf16 labels"),
}

# the child: every case under the interpreter, results saved for the tests (tensors only, read weights_only)
CHILD = """
import sys, torch
from neuron_torch.kernels import fused_triton
assert fused_triton.interpreting()
cases = torch.load(sys.argv[1], weights_only=True)
torch.save({k: fused_triton.triton_pass(*v) for k, v in cases.items()}, sys.argv[2])
"""


def make_case(m: int, n: int, dtype: torch.dtype, kind: str):
    """(X, Y, w, b) on CPU: w and b in the accumulation dtype, Y in it too unless ``kind`` says otherwise."""
    acc = fused_triton.ACCUMULATE[dtype]
    gen = torch.Generator().manual_seed(1000 * m + n)
    X = torch.randn(m, n, generator=gen, dtype=f64)
    Y = torch.randint(0, 2, (m, 1), generator=gen).to(acc)
    w = (torch.randn(1, n, generator=gen, dtype=f64) / n**0.5).to(acc)
    b = torch.randn(1, generator=gen, dtype=f64).to(acc)
    if kind == "extreme":  # z = Σ ±2000 + b: |z| in the thousands up to 1e4; e^|z| overflows, e^−|z| does not
        X, w = torch.sign(X) * 2000, torch.ones_like(w)
    X = X.to(dtype)
    if kind == "strided":  # NaN where the kernel must not read
        X = torch.cat([X, torch.full_like(X, float("nan"))], dim=1)[:, :n]
        Y = torch.cat([Y, torch.full_like(Y, float("nan"))], dim=1)[:, :1]
    if kind == "bf16 labels":
        Y = Y.to(dtype)
    return X, Y, w, b


def reference(X, Y, w, b):
    """The reference path's (loss, dw, db) in the accumulation dtype, on X's device."""
    net = SingleNeuron(X.shape[1], fused=False).to(device=X.device, dtype=w.dtype)
    with torch.no_grad():
        net.linear.weight.copy_(w)
        net.linear.bias.copy_(b)
    bp = net.forward_backward(X.to(w.dtype), Y.to(w.dtype))
    return bp.loss, bp.gradients["linear.weight"], bp.gradients["linear.bias"]


def bounds(X, Y, w, b) -> tuple[float, float, float]:
    """How far the kernel's (loss, dw, db) may sit from the reference by rounding alone, absolute.

    Both compute z_i as an (n + 1)-term sum in another order: |δz_i| ≤ 2(n + 1)·ε·(Σ_k|x_ik·w_k| + |b|). A loss
    term moves by at most |δz| (|softplus′ − y| ≤ 1), dz by |δz|/4 (σ′ ≤ ¼), and exp, log and the division add a
    few ε each (8ε, counting GPU approximations of 2 ulp). The means over m rows are summed in another order:
    m-term sums, ≤ 2m·ε·max|term| between the two. dw_k = mean(dz_i·x_ik) with |dz_i| ≤ 1 scales dz's bound by
    max|x|.
    """
    acc = w.dtype
    m, n = X.shape
    X64, w64, b64, Y64 = X.double(), w.double(), b.double(), Y.double()
    dot = (X64.abs() @ w64.abs().T + b64.abs()).max().item()
    z = X64 @ w64.T + b64
    loss_terms = (torch.logaddexp(z, torch.zeros_like(z)) - Y64 * z).abs().max().item()
    dz = tol(acc, 2 * (n + 1) * dot)
    x_max = max(1.0, X64.abs().max().item())
    loss = dz + tol(acc, 8 + 2 * m) * max(1.0, loss_terms)
    dz_mean = dz / 4 + tol(acc, 8) + tol(acc, 2 * m)
    return loss, x_max * dz_mean, dz_mean


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """id → (loss, dw, db) of the kernel: natively with CUDA, else from the interpreter in one child process."""
    if TRITON_MISSING:
        pytest.skip("triton is not installed")
    inputs = {k: make_case(*spec) for k, spec in CASES.items()}
    if CUDA:
        return {k: fused_triton.triton_pass(*(t.cuda() for t in v)) for k, v in inputs.items()}
    folder = tmp_path_factory.mktemp("interpreted")
    torch.save(inputs, folder / "in.pt")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder / "in.pt"), str(folder / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = torch.load(folder / "out.pt", weights_only=True)
    assert all(v is not None for v in out.values()), f"the kernel declined a case under the interpreter: {done.stderr}"
    return out


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_the_reference_path(case, results):
    X, Y, w, b = make_case(*CASES[case])
    loss, dw, db = results[case]
    device = "cuda" if CUDA else "cpu"
    assert (loss.shape, dw.shape, db.shape) == ((), w.shape, b.shape)
    assert all(t.dtype == w.dtype and t.device.type == device for t in (loss, dw, db))
    if CASES[case][3] == "strided":
        X, Y = X.contiguous(), Y.contiguous()  # the reference reads the same values from its own copy
    ref_loss, ref_dw, ref_db = reference(*(t.to(device) for t in (X, Y, w, b)))
    loss_tol, dw_tol, db_tol = bounds(X, Y, w, b)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=loss_tol)
    torch.testing.assert_close(dw, ref_dw, rtol=0, atol=dw_tol)
    torch.testing.assert_close(db, ref_db, rtol=0, atol=db_tol)
    assert all(bool(torch.isfinite(t).all()) for t in (loss, dw, db))
    if CASES[case][3] == "extreme":
        assert loss.item() > 100  # finite where e^|z| overflows: softplus(z) − y·z taken from e^−|z|


def test_applies_only_where_it_can_run(monkeypatch):
    """Decided from the tensors alone (Triton is not imported): CPU tensors only under the interpreter; the
    dtypes, shapes and layouts the kernel reads."""
    X, Y, w, b = make_case(37, 17, f32, "random")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not fused_triton.applies(X, Y, w, b)
    assert fused_triton.triton_pass(X, Y, w, b) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_triton.applies(X, Y, w, b)
    assert not fused_triton.applies(X.half(), Y.half(), w.half(), b.half())  # float16: not taken
    assert not fused_triton.applies(X.T.contiguous().T, Y, w, b)  # column-major rows
    assert not fused_triton.applies(X.bfloat16(), Y, w.bfloat16(), b.bfloat16())  # bfloat16 accumulation
    assert fused_triton.applies(X.bfloat16(), Y, w, b)
    assert not fused_triton.applies(X.double(), Y, w, b)  # w in another dtype than float64 X's
    assert not fused_triton.applies(X, Y[:-1], w, b)


def test_missing_triton_gives_none_and_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "neuron_torch.kernels.triton_kernel", None)  # its import fails as triton's would
    monkeypatch.setattr(fused_triton, "_kernels", {})
    monkeypatch.setattr(fused_triton, "_failure", None)
    with caplog.at_level(logging.WARNING, logger="neuron_torch"):
        assert not fused_triton.is_available() and not fused_triton.is_available()
    warnings = [r for r in caplog.records if r.name == "neuron_torch" and "Triton" in r.getMessage()]
    assert len(warnings) == 1


# --- with a GPU: SingleNeuron takes the kernel on CUDA, under the same switch as the CPU kernel --------------------


@needs_triton
@needs_cuda
@pytest.mark.parametrize("dtype", [f32, f64])
@pytest.mark.parametrize("l2", [0.0, 0.37])
def test_single_neuron_takes_the_kernel_on_cuda(dtype, l2, monkeypatch):
    monkeypatch.delenv(fused.ENV_SWITCH, raising=False)
    X, Y, w, b = (t.cuda() for t in make_case(1000, 30, dtype, "random"))
    nets = [SingleNeuron(30, l2=l2, fused=f).to("cuda", dtype) for f in (True, False)]
    for net in nets:
        with torch.no_grad():
            net.linear.weight.copy_(w)
            net.linear.bias.copy_(b)
    bp, ref_bp = nets[0].forward_backward(X, Y), nets[1].forward_backward(X, Y)
    assert bp.Z == [] and len(ref_bp.Z) == 1  # fused, and the reference
    loss_tol, dw_tol, db_tol = bounds(X.cpu(), Y.cpu(), w.cpu(), b.cpu())
    torch.testing.assert_close(bp.loss, ref_bp.loss, rtol=0, atol=loss_tol)
    torch.testing.assert_close(bp.gradients["linear.weight"], ref_bp.gradients["linear.weight"], rtol=0,
                               atol=dw_tol + tol(dtype, 4) * l2 * w.abs().max().item())
    torch.testing.assert_close(bp.gradients["linear.bias"], ref_bp.gradients["linear.bias"], rtol=0, atol=db_tol)
    again = nets[0].forward_backward(X, Y)  # fixed program count and summation order: the same bits
    assert torch.equal(again.loss, bp.loss) and torch.equal(again.gradients["linear.weight"],
                                                            bp.gradients["linear.weight"])
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    assert len(nets[0].forward_backward(X, Y).Z) == 1  # switched off: the reference path


@needs_triton
@needs_cuda
def test_bfloat16_inputs_through_neuron_pass():
    X, Y, w, b = (t.cuda() for t in make_case(257, 30, bf16, "random"))
    out = fused.neuron_pass(X, Y, w, b)
    assert out is not None and all(t.dtype == f32 for t in out)
    assert fused.neuron_pass(X.half(), Y.half(), w.half(), b.half()) is None  # float16: the reference path


# --- X stored as bfloat16 (data.dtype): where it is allowed ------------------------------------------------------


def test_storage_dtype_says_where_bfloat16_is_allowed():
    assert storage_dtype("model", f64, "cpu") == f64
    assert storage_dtype("bfloat16", f32, "cuda") == bf16
    assert storage_dtype("bfloat16", f32, torch.device("cuda", 1)) == bf16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        storage_dtype("bfloat16", f32, "cpu")
    with pytest.raises(ValueError, match="needs float32 parameters, got float64"):
        storage_dtype("bfloat16", f64, "cuda")
    with pytest.raises(ValueError, match="'model' or 'bfloat16', got 'float16'"):
        storage_dtype("float16", f32, "cuda")


def test_computable_converts_only_when_needed():
    X = torch.randn(5, 3)
    assert fused_triton.computable(X, f32) is X
    low = X.bfloat16()
    assert fused_triton.computable(low, f32).dtype == f32
    assert torch.equal(fused_triton.computable(low, f32).bfloat16(), low)  # bfloat16 → float32 is exact
