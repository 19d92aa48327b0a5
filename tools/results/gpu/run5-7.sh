#!/bin/bash
# device calls 5-7 (session 3), run one after the other on the warm machine of call 4 (outputs: h100_run5-7.txt)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
L=$OUT/log.txt
step() { echo "=== $1 ($(date +%T))" | tee -a $L; shift; timeout "$@" 2>&1 | tee -a $L; echo "=== rc ${PIPESTATUS[0]}" | tee -a $L; }
# call 5 (every step hit its timeout while compiling and autotuning the int8 configurations)
step "bench gpt2 compile inductor_quantize int8" 80 python3 -m tools.bench --model gpt2 --compile --inductor_quantize --runs 1 --steps 10 --warmup 3
step "bench gpt2-medium compile" 150 python3 -m tools.bench --model gpt2-medium --compile --steps 10 --warmup 3 --profile_steps 1
step "bench gpt2 shakespeare 300" 150 python3 -m tools.bench --model gpt2 --compile --dataset shakespeare --steps 300 --warmup 3 --profile_steps 0
# call 6: medium, eager
timeout 140 python3 -m tools.bench --model gpt2-medium --runs 0,2,1 --steps 5 --warmup 2 --profile_steps 0
# call 7: real data, eager (carry: data)
timeout 105 python3 -m tools.bench --model gpt2 --dataset shakespeare --runs 0,1 --steps 150 --warmup 2 --profile_steps 0
