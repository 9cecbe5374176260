#!/usr/bin/env bash
# The one command for a lent GPU machine (`make gpu-check`): builds the extension for sm_90a, runs
# the CUDA tests (every CUDA op against its pure-torch reference, greedy parity against
# transformers), the op microbenchmarks and nano-vLLM's benchmark, then prints a short table.
# Full logs go to $OUT (default: build/gpu-check). Needs no internet: the machine's python3 has
# torch, transformers, nvcc, cmake, ninja and scikit-build-core; wheels in .whl/ are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
started=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...: runs it with its log in $OUT/NAME.log, records status and time
  local name=$1 limit=$2 t0=$(date +%s)
  shift 2
  # SIGINT first: pytest then still prints its failures and writes the junit file, and a Python
  # benchmark its traceback (where it was stuck); SIGKILL 15 s later if that does not end it.
  timeout -s INT -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-12s rc=%-3s %4ss\n' "$name" "$rc" "$(($(date +%s) - t0))" | tee -a "$OUT/summary.txt"
  return $rc
}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/pnl-site .whl/*.whl && export PYTHONPATH=/tmp/pnl-site
fi
# The image's default CXX (/opt/gcc) has only a static libstdc++, which CMake refuses: use the system g++.
if [ -n "${CXX:-}" ] && [[ "$($CXX -print-file-name=libstdc++.so)" != /* ]] && [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
fi
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)'
  echo "CXX=${CXX:-c++} ($(${CXX:-c++} --version | head -1))"
  git log -1 --format='commit %H %cd' 2>/dev/null || true
  date -u
} >"$OUT/env.txt" 2>&1

export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
step build 240 $PY -m pip install --no-build-isolation --no-deps -e . -C build-dir=build/gpu \
  -C cmake.define.PNL_WITH_CUDA=ON -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90a || {
  tail -40 "$OUT/build.log"
  exit 1
}
export PYTHONUNBUFFERED=1
xdist=()
$PY -c 'import xdist' 2>/dev/null && xdist=(-n 4)  # 4 processes share the GPU (33 s on an H200)
step pytest 180 $PY -m pytest -m cuda -q -p no:cacheprovider "${xdist[@]}" tests/ops tests/engine tests/models \
  --junitxml="$OUT/pytest.xml"
step bench-ops 60 $PY benchmarks/bench_ops_cuda.py
step nano-bench 90 $PY benchmarks/throughput.py --workload nano-bench

echo
echo "== gpu-check: $(head -2 "$OUT/env.txt" | tail -1), $(($(date +%s) - started)) s in all =="
cat "$OUT/summary.txt"
grep -E '^[0-9]+ (passed|failed)|passed|failed' "$OUT/pytest.log" | tail -1
grep -E '^(FAILED|ERROR)' "$OUT/pytest.log" | head -20
sed -n '/^op /,/^sampler/p' "$OUT/bench-ops.log"
grep -E '^(Total|HBM floor|copy bandwidth)' "$OUT/nano-bench.log"
tail -3 "$OUT/nano-bench.log" | grep -iE 'error|Traceback' && tail -15 "$OUT/nano-bench.log"
exit 0
