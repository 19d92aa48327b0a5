#!/bin/bash
# The next GPU session's first call, in order of value, sized for about 9 minutes (run with carry: ["data"]).
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
L=$OUT/log.txt
step() { echo "=== $1 ($(date +%T))" | tee -a $L; shift; timeout "$@" 2>&1 | tee -a $L; echo "=== rc ${PIPESTATUS[0]}" | tee -a $L; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a $L
step "pytest kernel/triton/fused_adam natively" 90 python3 -m pytest test_qgpt.py -k "kernel or triton or fused_adam" -q -p no:cacheprovider
step "real data, LM head bf16 (eager)" 110 python3 -m tools.bench --model gpt2 --dataset shakespeare --runs 0,1 --steps 200 --warmup 2 --profile_steps 0
step "bench gpt2 compile" 150 python3 -m tools.bench --model gpt2 --compile --steps 10 --warmup 3
step "bench gpt2 compile, CUDA graphs" 150 python3 -m tools.bench --model gpt2 --compile --compile_mode reduce-overhead --runs 0,1 --steps 10 --warmup 3
