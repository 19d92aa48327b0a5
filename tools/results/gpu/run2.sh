#!/bin/bash
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
L=$OUT/log.txt
step() { echo "=== $1 ($(date +%T))" | tee -a $L; shift; timeout "$@" 2>&1 | tee -a $L; echo "=== rc ${PIPESTATUS[0]}" | tee -a $L; }
step "pytest kernel/triton natively" 100 python3 -m pytest test_qgpt.py -k "kernel or triton" -q -p no:cacheprovider
step "kernels.py" 140 python3 kernels.py
step "bench gpt2 compile" 140 python3 bench.py --model gpt2 --compile --steps 10 --warmup 3
step "qgpt int8 short" 40 python3 qgpt.py --preset int8 --max_iters 100 --eval_interval 50 --eval_iters 5 --max_new_tokens 60 --out_dir /tmp/o1
