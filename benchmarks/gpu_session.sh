#!/usr/bin/env bash
# Every GPU check in one command, for a short GPU lease: the GPU-only tests, then the GPU
# benchmarks, each under its own time limit so that one hang cannot eat the rest.
#
#   bash benchmarks/gpu_session.sh [STEP ...]
#
# steps: info tests moe decode throughput mfu stability, and the narrower ones: gpu-tests (the
# compiled-kernel and CUDA-graph tests only), attn-tests (the attention ones among them), attention
# (the decode kernel with its tile and conversion sweep), profile (where a small model's decode step
# goes), throughput-overlap (the 1,000 prompts with overlapped scheduling), overlap (overlapped
# scheduling, 135M and 8B shapes), verify (speculative verification steps, chains and token trees,
# against the one-token step), drafting (an EAGLE head's chains and trees against the same step)
#
# Logs go to $OUT (or ./gpu-logs): one file per step, plus a short summary at the end.
# Needs python3 with torch + triton + transformers and quadrant's own dependencies
# (a bare GPU image: install them first, e.g. from carried wheels).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
steps=${*:-info tests moe decode attention mfu}  # the others: ask for them
summary=()

run() {  # run NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$name rc=$rc $((SECONDS - start))s")
  echo "== $name: rc=$rc in $((SECONDS - start)) s"
  tail -n 40 "$out/$name.log"
}

for step in $steps; do
  case $step in
    info) run info 60 bash -c 'nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"' ;;
    tests) run tests 240 python3 -m pytest -q -p no:cacheprovider --timeout 120 -m "not slow" \
             tests/kernels tests/engine/test_gpu_path.py ;;
    gpu-tests) run gpu-tests 120 python3 -m pytest -q -p no:cacheprovider --timeout 100 \
                 tests/kernels/test_kernels_gpu.py tests/engine/test_gpu_path.py ;;
    attn-tests) run attn-tests 100 python3 -m pytest -q -s -p no:cacheprovider --timeout 90 \
                  tests/kernels/test_kernels_gpu.py -k "attention or fp8_cache" ;;
    attention) run attention 150 python3 benchmarks/gpu_decode.py --only attention --sweep --json "$out/attention.json" ;;
    profile) run profile 60 python3 benchmarks/gpu_decode.py --only profile ;;
    verify) run verify 150 python3 benchmarks/gpu_decode.py --only verify --json "$out/verify.json" ;;
    drafting) run drafting 150 python3 benchmarks/gpu_decode.py --only drafting --json "$out/drafting.json" ;;
    overlap) run overlap 150 bash -c 'python3 benchmarks/overlap.py --model smollm2-135m --load-format dummy \
               --batch-sizes 1 8 64 --kv-cache-memory 2 --max-tokens 128 --repeats 2 &&
             python3 benchmarks/overlap.py --model llama-3-8b --load-format dummy --batch-sizes 1 8 64 \
               --kv-cache-memory 4 --max-tokens 64 --repeats 2' ;;
    moe) run moe 150 python3 benchmarks/gpu_moe.py ;;
    decode) run decode 200 python3 benchmarks/gpu_decode.py --only batch1 small --overlap --json "$out/decode.json" ;;
    throughput) run throughput 240 python3 benchmarks/gpu_decode.py --only throughput --json "$out/throughput.json" ;;
    throughput-overlap) run throughput-overlap 240 python3 benchmarks/gpu_decode.py --only throughput --overlap \
                          --json "$out/throughput-overlap.json" ;;
    mfu) run mfu 200 python3 benchmarks/train_mfu.py ;;
    stability) run stability 300 python3 benchmarks/train_stability.py --full ;;
    *) echo "unknown step $step" ;;
  esac
done
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
