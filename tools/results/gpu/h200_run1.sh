#!/bin/bash
# The first H200 call of the int8 data flow (issue 20, first run): about 8 minutes, no autotuning
# (kernel blocks come from kernels.py's launch plans, which tools/gate.py compiled for sm90 first).
# Run it with the device tool as
#   run(command="bash tools/results/gpu/h200_run1.sh", carry=[".whl"], timeout_s=560)
# after `pip download` of torchao 0.18.0's wheel into .whl/ (README, GPU record). Dry run on a CPU:
#   OUT=/tmp/out BENCH_MODEL=tiny BENCH_STEPS=2 bash tools/results/gpu/h200_run1.sh
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; L=$OUT/log.txt
MODEL=${BENCH_MODEL:-gpt2}; STEPS=${BENCH_STEPS:-10}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
step() {  # step NAME SECONDS COMMAND...: a timeout for each, everything in the log
  echo "=== $1 ($(date +%T))" | tee -a "$L"; shift
  timeout "$@" 2>&1 | tee -a "$L"; echo "=== rc ${PIPESTATUS[0]}" | tee -a "$L"
}
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no GPU") | tee -a "$L"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$L"
python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1 | tee -a "$L"
step "kernel tests, compiled" 90 python3 -m pytest test_qgpt.py -q -p no:cacheprovider \
  -k "kernel or triton or fused_adam or reduce_overhead"
step "kernels.py: check and tables" 70 python3 kernels.py
step "$MODEL, compiled: bf16, torchao, int8, int8 + adam8" 180 python3 -m tools.bench --model "$MODEL" \
  --compile --steps "$STEPS" --warmup 3
step "$MODEL, CUDA graphs: bf16, int8" 70 python3 -m tools.bench --model "$MODEL" --compile \
  --compile_mode reduce-overhead --runs 0,2 --steps "$STEPS" --warmup 3 --profile_steps 0
step "$MODEL, compiled, quantizers fused by inductor: int8" 60 python3 -m tools.bench --model "$MODEL" \
  --compile --fuse_quantizers --runs 2 --steps "$STEPS" --warmup 3
