#!/usr/bin/env bash
# Every GPU check and figure in one device call (10 minutes at most): the CUDA-vs-CPU tests (QP
# and cone, the compiled QP path included), the QP solve's kernel launches, the kernels that take
# its device time and where the host's time goes (forward and backward, at batch 128, n = 100 and
# at batch 1, n = 10), the target row (batch 128, n = 100, float32 and float64, our eager and
# compiled paths against qpth, qpax and a linear layer), the A/B of the CUDA variants (the solve's
# parts outside the iterations graphed or not, eager and compiled: cuda_variants.py), the small-to-large sweep against the peers,
# the cone benchmark with its CUDA rows and the QP peer benchmark on CUDA (batch up to 2048),
# in that order of importance. Peers missing
# on the machine are skipped by the benchmarks; wheels placed in .whl/ (benchmarks/gpu_wheels.sh)
# are installed first (BENCHMARKS.md, GPU section). While the tests run, background processes compile our compiled
# path for each shape (`qp_benchmark --prepare`, at most four at once) into inductor's on-disk
# cache, so that the timed runs after them find the compiled code ready; nothing is timed while
# they work. Every step has a time limit and the whole script a deadline (DEADLINE seconds, default
# 580) that cuts the last steps short rather than let the device call be killed. Results go to
# runs/gpu and, packed in one archive with the log beside it, to $OUT (the device tool's folder,
# which returns at most 8 files).
#
# PART=1 runs the checks, the A/Bs and the target row (a full device call), PART=2 the rest (the
# sweep, the cones, the QP figures: a second, shorter call on the still-warm machine, which keeps
# inductor's cache); the default, PART=all, runs both in one call.
set -uo pipefail
part=${PART:-all}
case "$part" in all|1|2) ;; *) echo "PART must be all, 1 or 2, not $part" >&2; exit 2;; esac
out=runs/gpu/part_$part
rm -rf "$out" && mkdir -p "$out/qp" "$out/prepare"  # this run's results only (the folder outlives a device call)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:/tmp/site/cmeel.prefix/lib/python3.12/site-packages  # proxsuite's files sit in cmeel's prefix
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX (qpax) would otherwise take 75 % of the GPU from torch
log="$out/gpu_session.log"
deadline=${DEADLINE:-580}
failed=0
step() {  # step SECONDS COMMAND...: run COMMAND for at most SECONDS, and never past the deadline
  local limit=$1; shift
  local left=$((deadline - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "== skipped, past the deadline: $*" | tee -a "$log"; failed=1; return
  fi
  echo "== $* (limit ${limit} s, ${SECONDS} s into the session)" | tee -a "$log"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log" || failed=1
}
step 10 git describe --always --dirty --abbrev=7
step 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
step 30 python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step 30 python3 -c "import importlib.util; [print(name, 'imports' if importlib.util.find_spec(name) else 'MISSING') for name in ('qpth', 'cvxpy', 'proxsuite', 'qpax', 'diffcp', 'clarabel')]"

# Compile ahead, beside the tests: at most 4 compilations at once (4 compiler threads each; seven at
# once took over 4 minutes for batch 128, n = 100 on an H200's 16 cores), the target row first;
# those unfinished at 240 s are stopped (a timed step compiles what it lacks in its warm-up).
prepare() {  # prepare NAME ARGS...: one background compilation, its log under $out/prepare
  while [ "$(jobs -rp | wc -l)" -ge 4 ]; do sleep 1; done
  [ "$SECONDS" -ge 240 ] && return  # past the wait below: none started any more
  local args=(--device cuda --prepare --solvers optlayers-compiled "${@:2}" --out "$out/prepare/$1")
  TORCHINDUCTOR_COMPILE_THREADS=4 timeout -k 5 240 python3 -m benchmarks.qp_benchmark "${args[@]}" >"$out/prepare/$1.log" 2>&1 &
}
compile_ahead() {
  prepare target_float64 --figures target --dtype float64
  prepare target_float32 --figures target --dtype float32
  for shape in 128x10 1x10 1x100 64x100 128x50; do prepare "sweep_$shape" --sweep --shapes "$shape"; done
  wait
}
if [ "$part" != 2 ]; then
  compile_ahead &
  compiling=$!
  step 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/qp/test_cuda.py tests/qp/test_engine.py tests/cone/test_cone_cuda.py tests/cone/test_interior.py tests/cone/test_auto_solver.py tests/experiments/test_cli.py
  echo "== waiting for the compilations (${SECONDS} s into the session)" | tee -a "$log"
  while kill -0 "$compiling" 2>/dev/null && [ "$SECONDS" -lt 240 ]; do sleep 2; done
  kill "$compiling" 2>/dev/null
  pkill -f -- "--prepare --solvers optlayers-compiled" && echo "== compilations stopped unfinished at ${SECONDS} s" | tee -a "$log"
  grep -h "optlayers-compiled\|Error" "$out"/prepare/*.log | cut -c1-300 | tee -a "$log"
  # after the compilations, so that the compiled rows find the cache
  step 60 python3 benchmarks/cuda_launches.py --json "$out/cuda_launches.json"
  step 40 python3 benchmarks/cuda_launches.py --batch 1 --n 10 --json "$out/cuda_launches_1x10.json"

  step 60 python3 benchmarks/cuda_variants.py --batch 1 --n 10 --dtypes float64 --variants eager-graphs,eager-graphs-inverted,eager-graphs-inverted-calls,inverted,inverted-calls --json "$out/cuda_variants_1x10.json"
  step 100 python3 benchmarks/cuda_variants.py --dtypes float64,float32 --variants eager-graphs,eager-graphs-inverted,eager-graphs-inverted-calls,inverted,inverted-calls --json "$out/cuda_variants.json"
  step 70 python3 -m benchmarks.qp_benchmark --device cuda --dtype both --figures target --out "$out/target"
fi
if [ "$part" != 1 ]; then
  step 60 python3 benchmarks/bench_cone.py --repeats 3 --without-psd --scaling 16,128 --out "$out/bench_cone_without_psd.json"
  step 150 python3 -m benchmarks.qp_benchmark --device cuda --sweep --out "$out/sweep"
  step 90 python3 benchmarks/bench_cone.py --repeats 5 --out "$out/bench_cone.json"
  step 110 python3 -m benchmarks.qp_benchmark --device cuda --dtype both --figures fig1,fig2,equality,batch --solvers optlayers,linear,qpth,qpax,qpax-1e-8 --out "$out/qp"
fi
echo "== done in ${SECONDS} s" | tee -a "$log"
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/gpu_results.tar.gz" -C "$out" . && cp "$log" "$OUT/" || failed=1
fi
exit "$failed"
