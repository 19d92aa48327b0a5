#!/bin/bash
# device call 4 (session 3): the native tests, the kernel tables, GPT-2 small end to end (output: h100_run4.txt)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
L=$OUT/log.txt
step() { echo "=== $1 ($(date +%T))" | tee -a $L; shift; timeout "$@" 2>&1 | tee -a $L; echo "=== rc ${PIPESTATUS[0]}" | tee -a $L; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a $L
step "pytest kernel/triton/fused_adam natively" 150 python3 -m pytest test_qgpt.py -k "kernel or triton or fused_adam" -q --maxfail=5 -p no:cacheprovider
step "kernels.py" 120 python3 kernels.py
step "bench gpt2 compile" 150 python3 -m tools.bench --model gpt2 --compile --steps 10 --warmup 3
