#!/usr/bin/env bash
# Every GPU check and figure in one device call: the CUDA-vs-CPU tests (QP and cone, the
# compiled QP path included), the QP solve's measured kernel launches, the small-to-large sweep against the peers with our eager and
# compiled (CUDA-graph) paths, the QP peer benchmark on CUDA (float32 and float64, batch up to
# 2048) and the cone benchmark with its CUDA derivative row. Peers missing on the machine are skipped by
# the benchmarks; wheels placed in .whl/ are installed first (BENCHMARKS.md, "Taking the GPU
# figures"). Results go to runs/gpu and, packed in one archive with the log beside it, to $OUT
# (the device tool's folder, which returns at most 8 files). Each step has a time limit so that
# the whole script fits one device call (10 minutes); the steps run in order of importance.
set -uo pipefail
out=runs/gpu
rm -rf "$out" && mkdir -p "$out/qp"  # this run's results only (the folder outlives a device call)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX (qpax) would otherwise take 75 % of the GPU from torch
log="$out/gpu_session.log"
failed=0
step() {  # step SECONDS COMMAND...: run COMMAND for at most SECONDS
  local limit=$1; shift
  echo "== $* (limit ${limit} s)" | tee -a "$log"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log" || failed=1
}
step 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
step 100 python3 -m pytest -q -m cuda tests/qp/test_cuda.py tests/qp/test_engine.py tests/cone/test_cone_cuda.py
step 40 python3 benchmarks/cuda_launches.py --json "$out/cuda_launches.json"
step 180 python3 -m benchmarks.qp_benchmark --device cuda --sweep --out "$out/sweep"
step 60 python3 benchmarks/bench_cone.py --repeats 5 --out "$out/bench_cone.json"
step 110 python3 -m benchmarks.qp_benchmark --device cuda --dtype both --solvers optlayers,linear,qpth,qpax,qpax-1e-8 --out "$out/qp"
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/gpu_results.tar.gz" -C "$out" . && cp "$log" "$OUT/" || failed=1
fi
exit "$failed"
