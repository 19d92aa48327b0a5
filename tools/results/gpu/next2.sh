#!/bin/bash
# The next GPU session's second call: GPT-2 medium, then the kernel tables again.
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
L=$OUT/log.txt
step() { echo "=== $1 ($(date +%T))" | tee -a $L; shift; timeout "$@" 2>&1 | tee -a $L; echo "=== rc ${PIPESTATUS[0]}" | tee -a $L; }
step "bench gpt2-medium compile" 200 python3 -m tools.bench --model gpt2-medium --compile --runs 0,2 --steps 10 --warmup 3 --profile_steps 1
step "kernels.py" 100 python3 kernels.py
