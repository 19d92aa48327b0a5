# device call 3, on the warm machine of call 2: the quantize kernels alone (output: h100_run3.txt)
unset TRITON_INTERPRET; timeout 100 python3 -c "
import torch, kernels
from triton.testing import do_bench
for M,K in [(16384,768),(16384,3072),(16384,2304)]:
    x=torch.randn(M,K,device='cuda',dtype=torch.bfloat16)
    for n,f in [('rows',kernels.quantize_rows),('cols',kernels.quantize_columns),('cols of x.t() (G^T)',lambda x: kernels.quantize_rows_op(x.t(),8,1e-9)),('ref eager',kernels.quantize_rows_reference)]:
        ms=do_bench(lambda: f(x),return_mode='median'); print(f'{n:22s} {M}x{K}: {ms*1e3:8.1f} us {x.numel()*3/ms/1e9:6.2f} TB/s',flush=True)
"
