#!/usr/bin/env bash
# Issue 16's GPU measurements in one run of about 9 minutes, for a session that is lent a GPU (bench/README.md,
# "When a GPU is lent"). Each step has its own time limit, so one that hangs cannot take the others' time; each
# writes <name>.json (its last stdout line) and <name>.log under $OUT, and this prints the JSON ends.
#
# The device image has torch, transformers, peft and accelerate but not diffusers or torchao: carry their wheels
# (cp312, see the device README) in .whl/ and this installs them first.
#   run: bash bench/gpu_session.sh            (carry: [".whl"], timeout_s 600)
# A CPU smoke run of the same steps, small (minutes; compile needs a C compiler):
#   GPU_STEP_ARGS="--device cpu --heads 1 --image-tokens 64 --text-tokens 16 --joint-attention-dim 96 \
#     --steps 3 --warmup 1" bash bench/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
read -r -a EXTRA <<< "${GPU_STEP_ARGS:-}"

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most $limit s)"
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  echo "exit $?"
  tail -n 1 "$OUT/$name.out" > "$OUT/$name.json"
  tail -c 1500 "$OUT/$name.json"; echo
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
python3 -c "import torch, diffusers, torchao; print(torch.__version__, diffusers.__version__, torchao.__version__)" \
  > "$OUT/versions.txt" 2>&1
cat "$OUT/gpu.csv" "$OUT/versions.txt"
# The warm trainer forks on a CUDA machine (trainer/nvml_facts.py) and how much sooner its runs start.
step warm_fork 100 python3 bench/warm_fork_check.py --rounds 2 --steps 5
# fp8 and int8 compute against bf16: step time, MFU, 50-step loss curves (item 1).
step precisions 170 python3 bench/gpu_step.py --variants off --precisions no_change,fp8-torchao,int8-torchao \
  --steps 50 --time-budget-s 140 "${EXTRA[@]}"
# Compiled blocks' gain and the checkpointing choices (items 2, 3), with MFU of the full-width slice.
step compile 190 python3 bench/gpu_step.py --compile --variants off,ckpt,ckpt_half,ckpt_attn --time-budget-s 60 \
  "${EXTRA[@]}"
# A klein-4b-width slice (item 6).
step klein4b 80 python3 bench/gpu_step.py --flavour klein-4b --variants off,ckpt --time-budget-s 40 "${EXTRA[@]}"
