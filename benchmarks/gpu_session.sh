#!/usr/bin/env bash
# Every GPU check in one command, for a short GPU lease: the GPU-only tests, then the GPU
# benchmarks, each under its own time limit so that one hang cannot eat the rest.
#
#   bash benchmarks/gpu_session.sh [STEP ...]     # steps: info tests moe decode throughput mfu stability
#
# Logs go to $OUT (or ./gpu-logs): one file per step, plus a short summary at the end.
# Needs python3 with torch + triton + transformers and quadrant's own dependencies
# (a bare GPU image: install them first, e.g. from carried wheels).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
steps=${*:-info tests moe decode mfu}  # throughput and stability: ask for them
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
    moe) run moe 150 python3 benchmarks/gpu_moe.py ;;
    decode) run decode 200 python3 benchmarks/gpu_decode.py --only batch1 small attention --json "$out/decode.json" ;;
    throughput) run throughput 240 python3 benchmarks/gpu_decode.py --only throughput --json "$out/throughput.json" ;;
    mfu) run mfu 200 python3 benchmarks/train_mfu.py ;;
    stability) run stability 300 python3 benchmarks/train_stability.py --full ;;
    *) echo "unknown step $step" ;;
  esac
done
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
