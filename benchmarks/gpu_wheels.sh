#!/usr/bin/env bash
# The peers' wheels for the GPU machine (Python 3.12, x86-64 manylinux; nothing can be installed
# there from a registry), downloaded here into .whl/ (ignored by git: .git/info/exclude), which
# the device call names in `carry` and benchmarks/gpu_session.sh installs first. qpth's latest
# release has no wheel and is built here; the pins are the versions measured on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  qpax==0.1.4 proxsuite==0.8.0 cmeel clarabel==0.11.1 diffcp==1.1.8 scs==3.3.1 ecos cvxpy==1.7.5 osqp cffi pycparser
python3 -m pip wheel -q --no-deps -w .whl qpth==0.0.18
ls .whl
du -sh .whl
