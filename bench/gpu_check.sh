#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go, most important first, each part under its own time limit,
# so that a short GPU lease still returns the main figures:
#
#     bash bench/gpu_check.sh [OUT_DIR]        # default: gpu_out/  (~10 minutes on an H100)
#
# Writes OUT_DIR/<part>.log for each part, 8 files (a bench's log ends with its --json line); prints the
# device, each part's last lines and a summary. Needs requirements-dev.txt (transformers: the HF side, tests).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu_out}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of the script itself
ROUNDS=${ROUNDS:-10}

part() {  # part NAME SECONDS COMMAND...: run it with a limit, log to OUT_DIR/NAME.log, show its last lines
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 4 "$OUT_DIR/$name.log"
  echo "=== $name: exit $rc in $((SECONDS - t0))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" 2>&1

# First run (H100, 2026-11-25): the benches took 27-64 s each, the four resume tests over 300 s.
T="$PY -m pytest -q -s -p no:cacheprovider -rfE --tb=short --durations=0"
part bench_train_auto 150 $PY bench/train_throughput.py --device "$DEVICE" --rounds "$ROUNDS" --warmup 3 --profile 3 --json
part tests_cuda_quick 120 $T tests/test_cuda.py -k "out_of_memory or samples or cuda_rng" \
  "tests/test_checkpoint.py::test_cuda_rng_state_round_trips"
part bench_generate_auto 75 $PY bench/generate_throughput.py --device "$DEVICE" --json
part tests_cuda_resume 240 $T tests/test_cuda.py -k "resumed"
part bench_train_fp16 100 $PY bench/train_throughput.py --device "$DEVICE" --dtype float16 --rounds "$ROUNDS" --warmup 3 --json
part bench_train_b32 100 $PY bench/train_throughput.py --device "$DEVICE" --batch_size 32 --rounds "$ROUNDS" --warmup 3 --json
part bench_generate_fp32 60 $PY bench/generate_throughput.py --device "$DEVICE" --dtype float32 --json
# Measured on 2026-11-25 (fp32: 1.44x HF); now the experiment of CUDA graphs for the launch-bound step instead.
part bench_train_cudagraphs 120 $PY bench/train_throughput.py --device "$DEVICE" --compile_mode reduce-overhead \
  --rounds "$ROUNDS" --warmup 3 --json

echo "=== summary"
for f in "$OUT_DIR"/bench_*.log; do echo "$(basename "$f" .log): $(tail -n 1 "$f" | grep '^{')"; done
grep -h "passed\|failed\|FAILED\|ERROR" "$OUT_DIR"/tests_*.log | tail -n 12
