#!/usr/bin/env bash
# Every GPU check and figure in one device call: the CUDA-vs-CPU tests (QP and cone, the
# compiled QP path included), the QP solve's measured kernel launches, the small-to-large sweep against the peers with our eager and
# compiled (CUDA-graph) paths, the QP peer benchmark on CUDA (float32 and float64, batch up to
# 2048) and the cone benchmark with its CUDA derivative row. Peers missing on the machine are skipped by
# the benchmarks; wheels placed in .whl/ are installed first (BENCHMARKS.md, "Taking the GPU
# figures"). Results go to $OUT (the device tool's folder) or runs/gpu.
set -uo pipefail
out="${OUT:-runs/gpu}"
mkdir -p "$out/qp"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX (qpax) would otherwise take 75 % of the GPU from torch
log="$out/gpu_session.log"
failed=0
step() {
  echo "== $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log" || failed=1
}
step nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
step python3 -m pytest -q -m cuda tests/qp/test_cuda.py tests/qp/test_engine.py tests/cone/test_cone_cuda.py
step python3 benchmarks/cuda_launches.py --json "$out/cuda_launches.json"
step python3 -m benchmarks.qp_benchmark --device cuda --sweep --out "$out/sweep"
step python3 -m benchmarks.qp_benchmark --device cuda --dtype both --solvers optlayers,linear,qpth,qpax --out "$out/qp"
step python3 benchmarks/bench_cone.py --repeats 5 --out "$out/bench_cone.json"
exit "$failed"
