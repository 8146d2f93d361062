#!/usr/bin/env bash
# What only a GPU can tell, in one short run (about 10 minutes on one H100): run it once when a GPU
# machine is at hand, then put the figures it writes into the configurations' estimates and the README,
# labelled with the GPU they were measured on.
#
#     OUT=runs/gpu bash scripts/gpu_measurements.sh          # on the GPU machine
#     TINY=1 OUT=/tmp/gpu bash scripts/gpu_measurements.sh   # on a CPU, tiny sizes: checks the script itself
#
# 1. MUX-PLMs' throughput protocol (their Table 1: 2.0x / 4.9x / 9.8x at N = 2 / 5 / 10 on a V100):
#    BERT-base, 128 tokens, 128 multiplexed sequences a forward, bf16; RSA, T-MUX and the contextual
#    multiplexer at N = 2, 5, 10, 20, 40 beside vanilla BERT timed in the same run.
# 2. The preflight on the target (python -m mux.course preflight, without --offline) of one configuration
#    per model kind: CUDA and native bf16, then --steps training steps of each model at the configured
#    batch, workers and precision on synthetic data, the step rate and torch.cuda.max_memory_allocated().
#    --skip-data: this machine need not hold the datasets; run it again with them to time the loaders.
# Each part has its own time limit, so one that hangs or fails costs only its own minutes; everything
# goes to $OUT (the logs too), and the exit status counts the parts that failed.
set -uo pipefail
OUT=${OUT:-runs/gpu}
PY=${PY:-.venv/bin/python}
TINY=${TINY:-0}
mkdir -p "$OUT"
failed=0

part() {  # part NAME SECONDS COMMAND...: run COMMAND with a time limit, its output in $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - started)) s; last lines:"
  tail -n 25 "$OUT/$name.log" | sed 's/^/   | /'
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ nvidia-smi || echo "no nvidia-smi"; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, \
  torch.cuda.is_available() and torch.cuda.get_device_name(0))"; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "$TINY" = 1 ]; then
  sizes=(--layers 1 --hidden-size 32 --heads 2 --seq-len 16 --batch 4 --n 1 2 5 --trials 1 --device cpu --precision fp32)
  pre=(--smoke --device cpu --steps 2)
  configs=(datamux_mnist)
else
  sizes=(--n 1 2 5 10 20 40 --precision bf16 --device cuda)
  pre=(--device cuda --steps 30)
  configs=(datamux_mnist tmux_mnli_n10 mux_plms_base_pretrain_n10 vision_imagenet mixvit_cait_imagenet)
fi

part throughput 300 "$PY" scripts/benchmark_throughput.py --model rsa tmux contextual "${sizes[@]}" \
  --out "$OUT/throughput.json"
for config in "${configs[@]}"; do
  part "preflight_$config" 150 "$PY" -m mux.course preflight "configs/$config.yaml" --skip-data "${pre[@]}" \
    -p num_processes 1 --json "$OUT/preflight_$config.json"
done
echo "== $failed part(s) failed; results in $OUT"
exit "$failed"
