"""A single neuron's loss and gradients in one pass over X: a C kernel on CPU, a Triton kernel on CUDA.

The plain reference path (:meth:`neuron_torch.SingleNeuron.forward_backward` with ``fused=False``) reads X
twice: once for ``Z = X·wᵀ + b`` and once for ``dw = dZᵀ·X / m``, with ``Z`` and ``dZ`` written and read in
between. Every row is independent until the sum, so ``z_i``, ``dz_i`` and ``dz_i·x_i`` can be taken while the
row is still in cache: ``fused_kernel.c`` does that, and this module compiles it once with the system C compiler,
loads it with ``ctypes`` and calls it on the tensors' memory. Where it cannot (no compiler, a tensor it does not
take) :func:`neuron_pass` returns None and the caller takes the reference path. CUDA tensors go to the Triton
kernel of :mod:`neuron_torch.kernels.fused_triton` instead, under the same switch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from neuron_torch.kernels import fused_triton  # imports triton only when a CUDA tensor first asks for it

log = logging.getLogger("neuron_torch")

SOURCE = Path(__file__).with_name("fused_kernel.c")
# Tried in order until one compiles and loads: no -march=native for compilers that lack it, no OpenMP
# for compilers without it (one thread, still one read of X). With GCC the library asks for libgomp.so.1; when
# torch (built with GNU OpenMP) is already loaded, that name resolves to torch's own copy, so the kernel and
# torch share one pool of threads instead of two pools competing for the cores.
FLAG_SETS = [
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native", "-fopenmp-simd"],  # no OpenMP runtime: still vectorise the omp simd loops
    ["-O3", "-fopenmp-simd"],
    ["-O3"],
]
# -fno-math-errno lets the compiler call vector exp/log1p (the kernel never reads errno)
COMMON_FLAGS = ["-fno-math-errno", "-shared", "-fPIC"]
# Below this many elements (m·n) one thread is as fast as waking the others: waking them costs as much as the
# work they would share.
SERIAL_BELOW = 1 << 15
ENV_SWITCH = "NEURON_TORCH_FUSED"
_DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_kernels: dict[torch.dtype, ctypes._CFuncPtr] | None = None
_failure: str | None = None  # why the fast path is unavailable, once known


def enabled() -> bool:
    """False when the environment variable ``NEURON_TORCH_FUSED`` is ``0`` (or ``false``/``no``/``off``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def is_available() -> bool:
    """Whether the compiled kernel is loaded (compiling it on first call); never raises."""
    return _load() is not None


def neuron_pass(X: Tensor, Y: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """Mean cross-entropy and its gradients for one sigmoid neuron, reading ``X`` once.

    Parameters
    ----------
    X : Tensor, shape (m, n)
        Inputs, float32 or float64, rows contiguous (``X.stride(1) == 1``; any row stride). On CUDA also
        bfloat16, with float32 ``Y``, ``w`` and ``b`` (see :func:`neuron_torch.kernels.fused_triton.triton_pass`).
    Y : Tensor, shape (m, 1)
        Labels in {0, 1}, same dtype as ``X``.
    w : Tensor, shape (1, n)
        Weight, same dtype as ``X``.
    b : Tensor, shape (1,)
        Bias, same dtype as ``X``.

    Returns
    -------
    (loss, dw, db) : tuple of Tensor, shapes (), (1, n) and (1,)
        ``mean(softplus(Z) − Y·Z)``, ``dZᵀ·X / m`` and ``mean(dZ)`` with ``Z = X·wᵀ + b``, ``dZ = σ(Z) − Y``
        (no L2 term); or None when the fast path does not apply (switched off, no compiler or no Triton, another
        device or dtype, other shapes or strides), and the caller should take the reference path.
    """
    if not enabled():
        return None
    if X.is_cuda:
        return fused_triton.triton_pass(X, Y, w, b)
    if not _applies(X, Y, w, b):
        return None
    kernel = (_kernels or _load() or {}).get(X.dtype)
    if kernel is None:
        return None
    m, n = X.shape
    loss, dw, db = torch.empty((), dtype=X.dtype), torch.empty((1, n), dtype=X.dtype), torch.empty(1, dtype=X.dtype)
    threads = 1 if m * n < SERIAL_BELOW else torch.get_num_threads()
    status = kernel(X.data_ptr(), m, n, X.stride(0), Y.data_ptr(), Y.stride(0), w.data_ptr(), b.data_ptr(),
                    threads, loss.data_ptr(), dw.data_ptr(), db.data_ptr())
    return None if status else (loss, dw, db)


def _applies(X: Tensor, Y: Tensor, w: Tensor, b: Tensor) -> bool:
    """The kernel reads raw memory: every tensor on CPU and strided, one dtype it knows, the layouts it assumes."""
    dtype = X.dtype
    if (dtype not in _DTYPES or X.dim() != 2 or not (X.is_cpu and Y.is_cpu and w.is_cpu and b.is_cpu)
            or X.layout != torch.strided or Y.layout != torch.strided):
        return False
    m, n = X.shape
    return (m > 0 and n > 0 and X.stride(1) == 1  # rows contiguous; a row slice of a wider X is read in place
            and Y.shape == (m, 1) and w.shape == (1, n) and b.shape == (1,)
            and Y.dtype == dtype and w.dtype == dtype and b.dtype == dtype and w.is_contiguous())


def _load() -> dict[torch.dtype, ctypes._CFuncPtr] | None:
    """The kernels by dtype, compiled on first use (once per process, thread-safe); None if that failed."""
    global _kernels, _failure
    if _kernels is not None or _failure is not None:
        return _kernels
    with _lock:
        if _kernels is None and _failure is None:
            try:
                _kernels = _build()
            except Exception as err:  # whatever goes wrong, the reference path still works
                _failure = f"{type(err).__name__}: {err}"
                log.warning("fused CPU kernel unavailable, using the reference path: %s", _failure)
    return _kernels


def _build() -> dict[torch.dtype, ctypes._CFuncPtr]:
    compiler = shlex.split(os.environ.get("CC") or "cc")  # CC may carry a wrapper or flags ("ccache gcc")
    if not compiler or shutil.which(compiler[0]) is None:
        raise RuntimeError(f"no C compiler found (tried {' '.join(compiler) or repr('')}; set CC to use another)")
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    errors = []
    for flags in FLAG_SETS:
        try:
            return _bind(ctypes.CDLL(str(_compiled(compiler, version, flags + COMMON_FLAGS))))
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"[{' '.join(flags)}] {_first_error(str(err))}")
    raise RuntimeError(f"{' '.join(compiler)} could not build {SOURCE.name}: " + "; ".join(errors))


def _first_error(message: str) -> str:
    """The line of a compiler's output that says what went wrong (the first with "error"), else the last."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()] or [message]
    return next((line for line in lines if "error" in line.lower()), lines[-1])


def _compiled(compiler: list[str], version: str, flags: list[str]) -> Path:
    """The shared library for these flags, from the cache or compiled into it.

    The file name hashes everything the binary depends on: source, flags, the compiler and its version, and the
    CPU (``-march=native`` code may not run on another CPU sharing the same home directory). It is written under
    a temporary name and renamed, so processes compiling at once (DDP ranks, sweep workers) never load half a
    file.
    """
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(compiler + flags).encode(), version.encode(),
                                     platform.machine().encode(), _cpu_identity().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neuron_torch"
    target = cache / f"fused_kernel-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log.info("compiling the fused CPU kernel (once per machine): %s %s", " ".join(compiler), " ".join(flags))
    fd, tmp = tempfile.mkstemp(prefix=target.stem + "-", suffix=".so.tmp", dir=cache)
    os.close(fd)
    try:
        done = subprocess.run([*compiler, *flags, "-o", tmp, str(SOURCE.resolve()), "-lm"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr or f"{' '.join(compiler)} exited {done.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cpu_identity() -> str:
    """Model and feature flags of this CPU (Linux), else what :mod:`platform` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(next((l for l in lines if l.startswith(k)), "") for k in ("model name", "flags"))
    except OSError:
        return platform.processor()


def _bind(lib: ctypes.CDLL) -> dict[torch.dtype, ctypes._CFuncPtr]:
    kernels = {}
    for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
        fn = getattr(lib, f"neuron_pass_{suffix}")
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        # X, m, n, ldx, y, ys, w, b, threads, loss, dw, db
        fn.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int, ptr, ptr, ptr]
        fn.restype = ctypes.c_int
        kernels[dtype] = fn
    return kernels
