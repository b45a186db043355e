#!/usr/bin/env bash
# The GPU check in one command, for a fresh GPU machine with torch (CUDA build, which brings triton), lightning,
# torchmetrics and pytest, and neither MLflow nor internet access:
#   1. the CUDA tests (tests/test_cuda.py, tests/test_cuda_graphs.py) and the fused Triton kernel's tests
#      (tests/test_fused_triton.py), natively on the GPU;
#   2. the CUDA rows of benchmarks/bench.py (100k×30, 1M×64, 10M×64, 2M×512: one read of X, the reference path,
#      the fused Triton kernel, autograd, torch.compile, a CUDA graph of 50 updates, bfloat16 X).
# Everything lands in $OUT (default ./gpu-out): environment.txt, tests.log, tests.xml, bench.log, and the bench's
# JSON and markdown table. Each part runs under its own time limit (3 + 6 minutes at most; about 3 minutes in all
# is expected on an H100/H200). Run from anywhere:
#
#   bash benchmarks/gpu_check.sh
#   OUT=/tmp/gpu PYTHON=python3 bash benchmarks/gpu_check.sh
#
# Exit status: 0 when the tests passed and the bench finished; 1 otherwise; 2 without a CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
# the package from this checkout, installed or not; the kernel compiled for the GPU, not interpreted
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET NEURON_TORCH_FUSED

{
    date -u
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    "$PY" - <<'EOF'
import importlib.metadata as md
import torch
for name in ("torch", "triton", "lightning", "torchmetrics", "pytest", "numpy", "mlflow"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
print("cuda available:", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check" >&2
    exit 2
fi

echo "== tests (natively on the GPU)"
timeout 180 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    tests/test_cuda.py tests/test_fused_triton.py tests/test_cuda_graphs.py 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== bench, CUDA rows"
timeout 360 "$PY" benchmarks/bench.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== gpu_check: tests exit $tests_rc, bench exit $bench_rc (124: out of time); results in $OUT"
ls -l "$OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
