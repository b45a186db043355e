"""A single neuron's loss and gradients in one read of X, on CUDA: a persistent Triton kernel.

The same sums as the CPU kernel (``fused_kernel.c``), per row ``i``::

    z_i = x_i·w + b
    loss_i = softplus(z_i) − y_i·z_i      softplus(z) = max(z, 0) + log1p(e^−|z|), finite for any z
    dz_i = σ(z_i) − y_i
    dw += dz_i·x_i,  db += dz_i,  loss += loss_i,  then each divided by m

A fixed number of programs each walk every P-th block of rows. A block is loaded once: its dot products give z,
and dz·x is added into the program's dw partial while the block is still in registers. Each program writes its
partials (loss, db, dw) to its own row of a small (P, n + 2) buffer, and the rows are summed afterwards in a fixed
order, so a given device, shape and program count always gives the same bits (no atomics).

Where n is wider than one column tile (``MAX_BLOCK_N``), z needs every tile before dz is known: the block's
tiles are read twice, the second time from cache (a block is a few tens of KB), and the dw partial lives in the
program's own row of the buffer instead of registers.

Accumulation is in float32 for float32 and bfloat16 X (w, b and the results float32), in float64 for float64.

Under ``TRITON_INTERPRET=1`` Triton runs the kernel on CPU tensors with NumPy; :func:`triton_pass` then takes
CPU tensors, which is how the kernel is tested on a machine without a GPU. Triton is imported on first use; where
it is missing :func:`triton_pass` returns None.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
from torch import Tensor

log = logging.getLogger("neuron_torch")

# Widest column tile held in registers at once: up to this many features, one read of each row; wider rows are
# walked in tiles of this width and read twice (the second time from cache).
MAX_BLOCK_N = 512
# Elements of X one program holds per block (BLOCK_M rows × BLOCK_N columns), and the same in float64.
BLOCK_ELEMENTS = {torch.float32: 4096, torch.bfloat16: 4096, torch.float64: 2048}
PROGRAMS_PER_SM = 4  # enough resident programs per multiprocessor to keep loads in flight
INTERPRETED_PROGRAMS = 3  # under the interpreter: a few programs, so the partials' sum is exercised

# X dtype → the dtype of w, b, the accumulators and the results
ACCUMULATE = {torch.float32: torch.float32, torch.bfloat16: torch.float32, torch.float64: torch.float64}

_lock = threading.Lock()
_kernels: dict[bool, object] = {}  # interpreted or not → the kernel (Triton decorates for one mode or the other)
_failure: str | None = None


def interpreting() -> bool:
    """Whether Triton's interpreter is asked for (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def is_available() -> bool:
    """Whether Triton imports and the kernel is defined (for the current interpreter setting); never raises."""
    return _kernel() is not None


def applies(X: Tensor, Y: Tensor, w: Tensor, b: Tensor) -> bool:
    """Whether :func:`triton_pass` takes these tensors (without importing Triton).

    CUDA tensors on one device (CPU tensors only under the interpreter); X float32, float64 or bfloat16 with
    rows contiguous (any row stride); w (1, n) contiguous and b (1,) in X's accumulation dtype
    (:data:`ACCUMULATE`); Y (m, 1) in X's dtype or w's.
    """
    if X.dtype not in ACCUMULATE or X.dim() != 2 or X.layout != torch.strided or Y.layout != torch.strided:
        return False
    device = X.device
    if not (device.type == "cuda" or (device.type == "cpu" and interpreting())):
        return False
    if any(t.device != device for t in (Y, w, b)):
        return False
    m, n = X.shape
    acc = ACCUMULATE[X.dtype]
    return (m > 0 and n > 0 and X.stride(1) == 1
            and Y.shape == (m, 1) and w.shape == (1, n) and b.shape == (1,)
            and w.dtype == acc and b.dtype == acc and Y.dtype in (X.dtype, acc) and w.is_contiguous())


def computable(X: Tensor, dtype: torch.dtype) -> Tensor:
    """X in the parameters' dtype for the paths that multiply it with them (the reference path, predictions):
    X itself when it is already, else a converted copy (bfloat16 → float32 is exact).

    Parameters
    ----------
    X : Tensor, shape (m, n)
    dtype : torch.dtype

    Returns
    -------
    Tensor, shape (m, n), of ``dtype``
    """
    return X if X.dtype == dtype else X.to(dtype)


def block_shape(n: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for rows of ``n`` features of ``dtype``: a power-of-two column tile covering n (at
    most :data:`MAX_BLOCK_N`) and as many rows as keep a block at :data:`BLOCK_ELEMENTS`."""
    block_n = min(MAX_BLOCK_N, 1 << max(0, n - 1).bit_length())
    block_m = max(1, BLOCK_ELEMENTS[dtype] // block_n)
    return block_m, block_n


def program_count(X: Tensor, blocks: int) -> int:
    """The fixed number of programs for X: a few per multiprocessor on CUDA, never more than there are blocks."""
    if X.is_cuda:
        sms = torch.cuda.get_device_properties(X.device).multi_processor_count
        return max(1, min(blocks, PROGRAMS_PER_SM * sms))
    return max(1, min(blocks, INTERPRETED_PROGRAMS))


def triton_pass(X: Tensor, Y: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """Mean cross-entropy and its gradients for one sigmoid neuron, reading ``X`` once, by a Triton kernel.

    Parameters
    ----------
    X : Tensor, shape (m, n)
        Inputs on a CUDA device (or on CPU under ``TRITON_INTERPRET=1``): float32, float64, or bfloat16 with
        float32 ``w`` and ``b``; rows contiguous (``X.stride(1) == 1``; any row stride).
    Y : Tensor, shape (m, 1)
        Labels in {0, 1}, in X's dtype or w's.
    w : Tensor, shape (1, n)
        Weight, float32 for float32 and bfloat16 X, float64 for float64 X; contiguous.
    b : Tensor, shape (1,)
        Bias, w's dtype.

    Returns
    -------
    (loss, dw, db) : tuple of Tensor, shapes (), (1, n) and (1,), w's dtype
        ``mean(softplus(Z) − Y·Z)``, ``dZᵀ·X / m`` and ``mean(dZ)`` with ``Z = X·wᵀ + b``, ``dZ = σ(Z) − Y``
        (no L2 term); or None where the kernel does not apply (see :func:`applies`) or Triton is unavailable.
        Nothing is read back to the host: the call is asynchronous on CUDA and can be captured in a CUDA graph
        once it has run (compiled) outside the capture.
    """
    if not applies(X, Y, w, b):
        return None
    kernel = _kernel()
    if kernel is None:
        return None
    m, n = X.shape
    acc = ACCUMULATE[X.dtype]
    block_m, block_n = block_shape(n, X.dtype)
    blocks = -(-m // block_m)
    programs = program_count(X, blocks)
    # per program: loss, db, then dw; every entry is written by its program (no zeroing needed)
    partials = torch.empty((programs, n + 2), dtype=acc, device=X.device)
    try:
        kernel[(programs,)](X, Y, w, b, partials, m, n, X.stride(0), Y.stride(0), partials.stride(0),
                            BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=n <= block_n)
    except Exception as err:  # compiling for this GPU failed: say so once, then keep to the reference path
        _fail(err)
        return None
    total = partials.sum(0) / m  # (n + 2,): the programs' partials in program order
    return total[0], total[2:].view(1, n), total[1:2]


def _kernel():
    """The Triton kernel for the current interpreter setting, defined on first use; None if Triton fails."""
    mode = interpreting()
    if mode in _kernels or _failure is not None:
        return _kernels.get(mode)
    with _lock:
        if mode not in _kernels and _failure is None:
            try:
                from neuron_torch.kernels import triton_kernel  # imports triton
                _kernels[mode] = triton_kernel.define()
            except Exception as err:  # no triton, or one that cannot load here: the caller falls back
                _fail(err)
    return _kernels.get(mode)


def _fail(err: Exception) -> None:
    global _failure
    _failure = f"{type(err).__name__}: {err}"
    _kernels.clear()
    log.warning("fused Triton kernel unavailable, using the reference path: %s", _failure)
