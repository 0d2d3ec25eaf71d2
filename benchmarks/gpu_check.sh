#!/usr/bin/env bash
# Merge engine on a CUDA machine, in one go (~8 minutes): issue 14's GPU figures.
#
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_figures.txt (OUT defaults to /tmp/gpu_out)
#
# Needs torch (CUDA), transformers, safetensors, numpy, scipy, matplotlib, click, rich, pyyaml
# on the machine, and the small wheels from benchmarks/gpu_wheels.sh carried in .whl/ (no
# network, no Ray, no vLLM). Each step has its own time limit; a failed step is logged and
# the script goes on; the figures file is written in every case.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
# overrides, for a dry run of the plumbing elsewhere (defaults: the real check)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SHAPE=${GPU_CHECK_SHAPE:---hidden 2048 --layers 8 --intermediate 5632 --vocab 32000 --heads 16 --kv-heads 4}
ZOO_VARIANT=${GPU_CHECK_ZOO:-full}
SITE=${GPU_CHECK_SITE:-/tmp/site}
mkdir -p "$OUT"
FIG="$OUT/gpu_figures.txt"
LOG="$OUT/gpu_check.log"
WORK=$(mktemp -d /tmp/evomerge_gpu.XXXXXX)
: > "$FIG"
: > "$LOG"
T0=$(date +%s)
fig() { echo "$*" | tee -a "$FIG"; }
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log everything, never abort
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "=== $name (limit ${limit}s)" >> "$LOG"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.out" 2>&1
  local rc=$?
  cat "$OUT/$name.out" >> "$LOG"
  fig "[$name] rc=$rc in $(( $(date +%s) - t )) s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
  return 0
}

fig "# evomerge GPU check $(date -u +%FT%TZ) on $(hostname)"
fig "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2)"
if [ "${GPU_CHECK_NO_WHEELS:-0}" = 1 ]; then
  fig "wheels: skipped (GPU_CHECK_NO_WHEELS=1)"
elif ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >> "$LOG" 2>&1 \
    && fig "wheels: installed $(ls .whl/*.whl | wc -l) from .whl/" || fig "wheels: install FAILED"
else
  fig "wheels: none in .whl/ (run benchmarks/gpu_wheels.sh where there is network)"
fi
export PYTHONPATH=$SITE:$PWD
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
fig "$(python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tail -1)"

# 1. imports without Ray / vLLM / fastapi / uvicorn
step imports 60 python3 -c '
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "vllm", "fastapi", "uvicorn"}:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import evomerge.cli, evomerge.engine.executor, evomerge.engine.runner, evomerge.fitness.backends.hf
print("imports ok without ray/vllm/fastapi/uvicorn")'
fig "  $(tail -1 "$OUT/imports.out")"

# 2. merge throughput on CUDA at the 0.49 B shape: streamed from disk and device-resident
#    (GB/s against a device-to-device copy of the same bytes; target >= 50%)
# shellcheck disable=SC2086
step merge_bench 300 python3 benchmarks/merge_throughput.py --device "$DEVICE" --resident $SHAPE \
  --threads "$(nproc)" --no-mergekit --no-rss --workdir "$WORK/models" --json "$OUT/merge_cuda.json"
grep -E "^(shape|resident|copy|task_arith|ties|dare|bread)|TIES /" "$OUT/merge_bench.out" \
  | sed 's/^/  /' | tee -a "$FIG"
rm -rf "$WORK/models"

# 3. one zoo search end to end on CUDA, local executor (full zoo; the test zoo if that fails)
step zoo_search 200 python3 benchmarks/gpu_zoo_search.py --variant "$ZOO_VARIANT" \
  --root "$WORK/zoo" --runs "$WORK/runs" --budget 8 --device "$DEVICE"
if ! grep -q "^search split" "$OUT/zoo_search.out"; then
  step zoo_search_test 90 python3 benchmarks/gpu_zoo_search.py --variant test \
    --root "$WORK/zoo" --runs "$WORK/runs" --budget 8 --device "$DEVICE"
  grep -E "^(zoo|search split)" "$OUT/zoo_search_test.out" | sed 's/^/  /' | tee -a "$FIG"
else
  grep -E "^(zoo|search split)" "$OUT/zoo_search.out" | sed 's/^/  /' | tee -a "$FIG"
fi

# 4. the CUDA tests, and the CPU/CUDA equality tests of the fast paths
step cuda_tests 240 python3 -m pytest -q -s -p no:cacheprovider tests/ops/test_cuda_ops.py tests/ops/test_fused_cpu.py \
  tests/ops/test_ops_parallel.py tests/ops/test_ops.py
grep -E "passed|failed|error|bit for bit" "$OUT/cuda_tests.out" | sed 's/^/  /' | tee -a "$FIG"

fig "total $(( $(date +%s) - T0 )) s; full log $LOG"
rm -rf "$WORK"
exit 0
