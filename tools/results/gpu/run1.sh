#!/bin/bash
# device call 1: does it run, kernel tables, end-to-end; logs under $OUT
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
L=$OUT/log.txt
step() { echo "=== $1 ($(date +%T))" | tee -a $L; shift; timeout "$@" 2>&1 | tee -a $L; echo "=== rc ${PIPESTATUS[0]}" | tee -a $L; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a $L
python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__, torch.cuda.get_device_name())" | tee -a $L
step "pytest kernel/triton natively" 150 python3 -m pytest test_qgpt.py -k "kernel or triton" -q -x -p no:cacheprovider
step "kernels.py" 200 python3 kernels.py
step "bench gpt2 eager" 100 python3 bench.py --model gpt2 --steps 10 --warmup 3
step "qgpt int8 short" 45 python3 qgpt.py --preset int8 --max_iters 300 --eval_interval 150 --eval_iters 5 --max_new_tokens 100 --out_dir /tmp/o1
step "bench gpt2 compile" 200 python3 bench.py --model gpt2 --compile --steps 10 --warmup 3
