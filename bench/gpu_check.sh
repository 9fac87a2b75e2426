#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go, most important first, each part under its own time limit,
# so that a short GPU lease still returns the main figures:
#
#     bash bench/gpu_check.sh [OUT_DIR [PART...]]   # default: gpu_out/, every part (~8 minutes on an H200)
#
# ALL (below) lists the parts, in the order they run; a lease of 15 minutes, the machine's start included, fits
# about 8 minutes of them.
# Writes OUT_DIR/<part>.log for each part run (a bench's log ends with its --json line); prints the device,
# each part's last lines and a summary. Needs requirements-dev.txt (transformers: the HF side, tests).
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
ALL="tests_generation bench_generate_auto bench_generate_fp32 tests_resume_compiled tests_samples
  bench_train_auto tests_cudagraphs bench_train_cudagraphs bench_train_fp16 bench_train_b32 tests_resume_eager
  tests_oom ncu_train"
PARTS=${*:2}
for name in ${PARTS:-$ALL}; do
  case $name in
    tests_generation) part $name 90 $T tests/test_cuda.py -k "generation" ;;
    bench_generate_auto) part $name 75 $PY bench/generate_throughput.py --device "$DEVICE" --json ;;
    bench_generate_fp32) part $name 60 $PY bench/generate_throughput.py --device "$DEVICE" --dtype float32 --json ;;
    tests_resume_compiled) part $name 220 $T tests/test_cuda.py -k "resumed and compiled" ;;
    tests_resume_eager) part $name 150 $T tests/test_cuda.py -k "resumed and eager" ;;
    tests_samples) part $name 90 $T tests/test_cuda.py -k "samples" ;;
    tests_oom) part $name 90 $T tests/test_cuda.py tests/test_checkpoint.py -k "(out_of_memory and not cuda_graphs) or cuda_rng" ;;
    # Nsight Compute over one compiled bf16 step of ours (the default mode): per kernel, time and speed of light
    ncu_train) if command -v ncu >/dev/null; then part $name 300 ncu --profile-from-start off --clock-control none \
        --section SpeedOfLight --print-summary per-kernel $PY bench/train_throughput.py --device "$DEVICE" \
        --warmup 3 --ncu; else echo "=== $name: no ncu on this machine"; fi ;;
    # train.py's cuda_graphs=True: accumulation and resume against the default compiled run, and out of memory
    tests_cudagraphs) part $name 240 $T tests/test_cuda.py -k "cuda_graph_training or with_cuda_graphs" ;;
    bench_train_auto) part $name 150 $PY bench/train_throughput.py --device "$DEVICE" --rounds "$ROUNDS" --warmup 3 \
      --profile 3 --json ;;
    # CUDA graphs for the launch-bound training step (train.py's cuda_graphs=True; off by default until measured)
    bench_train_cudagraphs) part $name 120 $PY bench/train_throughput.py --device "$DEVICE" --cuda_graphs \
      --rounds "$ROUNDS" --warmup 3 --json ;;
    bench_train_fp16) part $name 100 $PY bench/train_throughput.py --device "$DEVICE" --dtype float16 \
      --rounds "$ROUNDS" --warmup 3 --json ;;
    bench_train_b32) part $name 100 $PY bench/train_throughput.py --device "$DEVICE" --batch_size 32 \
      --rounds "$ROUNDS" --warmup 3 --json ;;
    *) echo "unknown part $name (parts: $ALL)"; exit 2 ;;
  esac
done

echo "=== summary"
for f in "$OUT_DIR"/bench_*.log; do [ -e "$f" ] || continue; echo "$(basename "$f" .log): $(tail -n 1 "$f" | grep '^{')"; done
grep -h "passed\|failed\|FAILED\|ERROR" "$OUT_DIR"/tests_*.log | tail -n 12
