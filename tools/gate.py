"""
tools/gate.py: the compile gate. Every launch the int8 training path makes, compiled for a GPU
with no GPU here, and checked: it fits the GPU's shared memory, spills no register, runs int8
tensor cores.

    python -m tools.gate                      # GPT-2 small to XL widths; sm90, sm80, sm89
    python -m tools.gate --arch sm90,sm80 --widths small   # what CI runs on every submission
    python -m tools.gate --json gate.json     # every field of every launch, in a file
    python -m tools.gate --self-test          # only: it rejects two known-bad plans

How it works:
 1. The launches. One training step of the int8 recipe per width (16 x 1024 tokens, one block:
    every block makes the same launches) runs on fake tensors (shapes and dtypes, no memory, no
    compute) under bf16 autocast, with a backend that records each quantize_dual and int8_matmul
    call and answers with the reference's results. So shapes, strides and dtypes are those
    training makes: X after LayerNorm is fp32, so its dX is fp32. Then the quantizers alone (rows
    only, bf16 and fp32), the fused AdamW (8/8 and 4/4 bits, each v map, every parameter size),
    `python kernels.py`'s checks and its benchmark's matmuls.
 2. The plans. Each call goes to kernels.py's plan function, with tensors on the meta device and
    a GPU of kernels.GPUS: the code that picks the launch on a real GPU.
 3. Compiling. Triton's own binder specializes the arguments as a launch does (divisibility by 16,
    constexprs); triton.compile makes PTX and a cubin for GPUTarget("cuda", arch, 32) with the
    Triton wheel's ptxas, whose log gives registers and spills; the kernel's metadata gives the
    shared memory a launch asks for. Equal specializations compile once.
 4. The checks. A launch fails on a failed compile, shared memory over the GPU's per-block limit,
    any spilled register, a matmul without int8 tensor-core instructions (wgmma .s8 on sm90,
    mma.sync .s8 below), or TMA below sm90. Reported too: the deepest wgmma wait in the PTX
    (0: the tensor cores finish each K step before the loop goes on).
 5. The estimate. Each launch's bytes moved and int8 operations, its time at the H200's peaks
    (HBM_BYTES_S, INT8_OPS_S), the same matmuls in bf16 at BF16_FLOPS_S, and per width a
    predicted step, int8 against bf16, to hold against what a GPU measures.
Every run first runs the self-test; the exit status is 1 when any launch fails.
"""

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python tools/x.py
import kernels  # noqa: E402
import qgpt  # noqa: E402

WIDTHS = {"small": (768, 12), "medium": (1024, 16), "large": (1280, 20), "xl": (1600, 25)}
LAYERS = {"small": 12, "medium": 24, "large": 36, "xl": 48}
BATCH, CONTEXT = 16, 1024  # 16,384 tokens a micro-step
HBM_BYTES_S, INT8_OPS_S, BF16_FLOPS_S = 4.8e12, 1580e12, 790e12  # H200: HBM; dense, measured bf16


# ----------------------------------------------------------------------------------------------
# 1. The launches a training step makes, recorded from a step on fake tensors.

def meta_like(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


class RecordingBackend:
    """kernels.ReferenceBackend's results; each call recorded as (operation, args, kwargs) with
    its tensors as (shape, stride, dtype), to be made into meta tensors out of the fake mode."""
    name = "gate"

    def __init__(self):
        self.calls = []

    def _record(self, op, args, kwargs):
        def describe(v):
            return (("tensor", tuple(v.shape), v.stride(), v.dtype, v.storage_offset())
                    if torch.is_tensor(v) else v)
        self.calls.append((op, tuple(describe(a) for a in args),
                           {k: describe(v) for k, v in kwargs.items()}))

    def quantize_dual(self, x, bits, absmax_floor, token_group=0, rows=True, columns=True):
        self._record("quantize_dual", (x, bits, absmax_floor, token_group, rows, columns), {})
        return kernels.ReferenceBackend.quantize_dual(x, bits, absmax_floor, token_group, rows,
                                                      columns)

    def int8_matmul(self, a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32, k_group=0):
        self._record("int8_matmul", (a, a_scale, b, b_scale, bias, out_dtype, k_group), {})
        return kernels.ReferenceBackend.int8_matmul(a, a_scale, b, b_scale, bias, out_dtype,
                                                    k_group)


def materialize(v):
    """A recorded value, its tensors as meta tensors of the same shape, strides and dtype."""
    if isinstance(v, tuple) and v and v[0] == "tensor":  # the offset moves data_ptr: alignment
        size = v[4] + sum((n - 1) * s for n, s in zip(v[1], v[2])) + 1 if all(v[1]) else v[4]
        base = torch.empty(size, dtype=v[3], device="meta")
        return base.as_strided(v[1], v[2], v[4])
    return v


def trace_step(n_embd, n_head, batch=BATCH, context=CONTEXT, fake=True):
    """The kernel calls of one int8 training step (forward and backward) of a one-block GPT-2 of
    this width under bf16 autocast, [(operation, args, kwargs)], and its parameters [(name,
    numel)]. fake: on fake tensors (no memory, no compute); else a real step on the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    cfg = qgpt.Config(**{**qgpt.PRESETS["int8"], "n_layer": 1, "n_head": n_head,
                         "n_embd": n_embd, "block_size": context, "batch_size": batch})
    recorder = RecordingBackend()
    with FakeTensorMode() if fake else contextlib.nullcontext():
        model = qgpt.GPT(cfg, 50304)
        qgpt.quantize_model(model, cfg, recorder)
        for module in model.modules():
            if isinstance(module, qgpt.QLinear):
                module.cache_weight_codes = False  # fake weights have no address to key a cache
        idx = torch.zeros(batch, context, dtype=torch.long)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as a GPU step's autocast
            _, loss = model(idx, idx)
        loss.backward()
        params = [(name, p.numel()) for name, p in model.named_parameters()]
    return recorder.calls, params


# ----------------------------------------------------------------------------------------------
# 2. Plans: (label, Launch) for one GPU, all through kernels.py's plan functions.

def plan_calls(calls, gpu, where):
    plans = {"quantize_dual": kernels.quantize_dual_plan, "int8_matmul": kernels.int8_matmul_plan}
    out = []
    for op, args, kwargs in calls:
        args = [materialize(a) for a in args]
        _, launch = plans[op](*args, **{k: materialize(v) for k, v in kwargs.items()}, gpu=gpu)
        if launch is not None:
            out.append((f"{where} {describe_call(op, args)}", launch))
    return out


def describe_call(op, args):
    if op == "quantize_dual":
        x, token_group, rows, columns = args[0], args[3], args[4], args[5]
        parts = "+".join(p for p, on in (("rows", rows), ("columns", columns)) if on)
        group = f" groups of {token_group}" if columns and token_group else ""
        return f"quantize_dual {'x'.join(map(str, x.shape))} {str(x.dtype)[6:]} {parts}{group}"
    a, b, out_dtype, k_group = args[0], args[2], args[5], args[6]
    groups = f" K-groups of {k_group}" if k_group and k_group < a.shape[1] else ""
    return f"int8_matmul {a.shape[0]}x{b.shape[1]}x{a.shape[1]} -> {str(out_dtype)[6:]}{groups}"


def step_launches(width, gpu, traced):
    """The launches of a training step at `width`, in the order the step makes them."""
    calls, params = traced
    launches = plan_calls(calls, gpu, f"{width} step:")
    for n_embd in {WIDTHS[width][0], 4 * WIDTHS[width][0]}:  # rows only (frozen W, the bench)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.empty(BATCH * CONTEXT, n_embd, dtype=dtype, device="meta")
            _, launch = kernels.quantize_dual_plan(x, 8, qgpt.ACT_FLOOR, columns=False, gpu=gpu)
            launches.append((f"{width} rows: {describe_call('quantize_dual', [x, 8, 0, 0, 1, 0])}",
                             launch))
    return launches, params


def adamw_launches(params, gpu, block_size=qgpt.Config.state_block_size):
    """The fused AdamW of QAdamW's 8/8 and 4/4-bit block states, each v map, each parameter size."""
    launches = []
    for numel in sorted({n for _, n in params}):
        p = torch.empty(numel, device="meta")
        n_blocks = -(-numel // block_size)
        for bits in (8, 4):
            state = {"codes": torch.empty(n_blocks * block_size * bits // 8, dtype=torch.uint8,
                                          device="meta"),
                     "scale": torch.empty(n_blocks, device="meta")}
            for v_map in kernels.V_MAPS:
                launch = kernels.adamw_lowbit_plan(p, p, state, state, bits, bits, v_map,
                                                   block_size, 1, 1e-3, 0.9, 0.95, 1e-8, 0.1, gpu)
                launches.append((f"adamw {bits}/{bits} {v_map} {numel}", launch))
    return launches


def check_and_bench_launches(gpu):
    """`python kernels.py`'s: the checks' launches, then the benchmark's matmuls (its quantizers
    are the step's and the rows-only launches)."""
    launches = []
    plans = {kernels.quantize_dual: kernels.quantize_dual_plan,
             kernels.int8_matmul: kernels.int8_matmul_plan}
    for name, launcher, args, kwargs, _ in kernels.check_cases("meta", gpu):
        launches.append((f"check: {name}", plans[launcher](*args, **kwargs, gpu=gpu)[1]))
    for M, K, N in kernels.BENCH_SHAPES:
        a = torch.empty(M, K, dtype=torch.int8, device="meta")
        b = torch.empty(N, K, dtype=torch.int8, device="meta").t()
        sa, sb = torch.empty(M, 1, device="meta"), torch.empty(N, 1, device="meta")
        for use_tma in (False, True) if gpu.capability >= (9, 0) else (False,):
            _, launch = kernels.int8_matmul_plan(a, sa, b, sb, None, torch.bfloat16, 0, use_tma,
                                                 gpu)
            launches.append((f"bench: int8_matmul {M}x{N}x{K} -> bfloat16 "
                             f"{'tma' if use_tma else 'pointer'}", launch))
    return launches


# ----------------------------------------------------------------------------------------------
# 3. Compiling one launch for a GPU that is not here.

def compile_launch(launch, gpu, cache):
    """The compiled kernel of a Launch for `gpu`: {"key", "compile_s", "kernel", "log"} or
    {"key", "error"}; equal specializations compile once (cache)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.kernel
    target = GPUTarget("cuda", gpu.capability[0] * 10 + gpu.capability[1], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.meta, bound,
                                                          specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    key = (target.arch, source.hash(), repr(sorted(options.__dict__.items())))
    if key in cache:
        return cache[key]
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(knobs.nvidia.scope())
            stack.enter_context(knobs.compilation.scope())
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills, printed
            knobs.compilation.always_compile = True  # a cached kernel has no log
            stack.enter_context(contextlib.redirect_stdout(log))
            compiled = triton.compile(source, target=target, options=options.__dict__)
        result = {"key": key, "compile_s": time.perf_counter() - start, "kernel": compiled,
                  "log": log.getvalue()}
    except Exception as e:  # noqa: BLE001 (every compile error is a verdict, with its message)
        result = {"key": key, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
    cache[key] = result
    return result


# ----------------------------------------------------------------------------------------------
# 4. and 5. What a compiled launch says, and what it should cost.

def inspect(label, launch, gpu, compiled):
    """One row of the report: the checks' fields and the estimate."""
    row = {"arch": gpu.name, "launch": label, "kernel": launch.kernel.__name__,
           "config": dict(launch.meta), "grid": list(launch.grid)}
    row.update(estimate(launch))
    is_matmul = launch.kernel in (kernels.int8_matmul_kernel, kernels.int8_matmul_tma_kernel)
    if "error" in compiled:
        row["failures"] = [f"does not compile: {compiled['error']}"]
        return row
    kernel, log, ptx = compiled["kernel"], compiled["log"], compiled["kernel"].asm["ptx"]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    wgmma = re.findall(r"wgmma\.mma_async\S*\.s8", ptx)
    mma_sync = re.findall(r"mma\.sync\.aligned\S*\.s8", ptx)
    registers = re.findall(r"Used (\d+) registers", log)
    waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    int8_mma = len(wgmma if gpu.capability >= (9, 0) else mma_sync)  # Hopper: wgmma, not mma.sync
    tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    row.update(compile_s=round(compiled["compile_s"], 2),
               registers=int(registers[0]) if registers else None, spill_bytes=sum(spills),
               shared=kernel.metadata.shared, shared_limit=gpu.shared_memory,
               int8_mma=int8_mma, tma=tma, wgmma_wait=max(waits) if waits else None)
    failures = []
    if row["shared"] > gpu.shared_memory:
        failures.append(f"shared memory {row['shared']:,} B > {gpu.shared_memory:,} B")
    if row["spill_bytes"]:
        failures.append(f"{row['spill_bytes']} B of register spills")
    if is_matmul and not int8_mma:
        failures.append("no int8 " + ("wgmma" if gpu.capability >= (9, 0) else "mma.sync")
                        + " instruction")
    if launch.meta.get("enable_fp_fusion", True):
        failures.append("enable_fp_fusion is not False: the epilogue may round unlike PyTorch")
    if tma and gpu.capability < (9, 0):
        failures.append("TMA below sm90")
    if not registers or len(spills) != 2:
        failures.append("no ptxas log of registers and spills: both unknown")
    row["failures"] = failures
    return row


def estimate(launch):
    """Bytes moved (each tensor argument read or written once), int8 operations, and the time at
    the H200's peaks: the larger of memory and compute time. Matmuls also get their bf16 twin:
    bf16 operands, the same output, at BF16_FLOPS_S."""
    tensors = [a for a in launch.args if torch.is_tensor(a)]
    moved = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
    if launch.kernel in (kernels.int8_matmul_kernel, kernels.int8_matmul_tma_kernel):
        a, b, c = launch.args[:3]
        M, N, K = launch.args[6:9]
        ops = 2 * M * N * K
        bf16_s = max((2 * (a.numel() + b.numel()) + c.numel() * c.element_size()) / HBM_BYTES_S,
                     ops / BF16_FLOPS_S)
        return {"bytes": moved, "ops": ops, "predicted_us": 1e6 * max(moved / HBM_BYTES_S,
                                                                      ops / INT8_OPS_S),
                "bf16_us": 1e6 * bf16_s}
    return {"bytes": moved, "ops": 0, "predicted_us": 1e6 * moved / HBM_BYTES_S, "bf16_us": 0.0}


def run_gate(archs, widths, log=print):
    """Every row of the report, for each GPU of archs at each width."""
    rows, cache = [], {}
    traced = {width: trace_step(*WIDTHS[width]) for width in widths}
    for arch in archs:
        gpu = kernels.GPUS[arch]
        launches, params = [], []
        for width in widths:
            step, width_params = step_launches(width, gpu, traced[width])
            launches += step
            params += width_params
        launches += adamw_launches(params, gpu) + check_and_bench_launches(gpu)
        for label, launch in launches:
            compiled = compile_launch(launch, gpu, cache)
            row = inspect(label, launch, gpu, compiled)
            row["compile_key"] = repr(compiled["key"][1:])
            rows.append(row)
            log(format_row(row))
    return rows


def format_row(row):
    if "registers" not in row:
        return f"{row['arch']}  FAIL  {row['launch']}: {'; '.join(row['failures'])}"
    config = row["config"]
    tile = (f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']} s{config['num_stages']} "
            f"w{config['num_warps']}" if "BLOCK_N" in config and "num_stages" in config else "")
    wait = "" if row["wgmma_wait"] is None else f" wait {row['wgmma_wait']}"
    verdict = "ok  " if not row["failures"] else "FAIL"
    return (f"{row['arch']}  {verdict}  {row['launch']:58s} {row['kernel']:22s} {tile:18s} "
            f"{row['registers']:3d} reg {row['spill_bytes']:4d} B spill "
            f"{row['shared']:7,d}/{row['shared_limit']:,} B{wait} {row['predicted_us']:8.1f} us"
            + (f"  <- {'; '.join(row['failures'])}" if row["failures"] else ""))


def bf16_matmul_us(M, N, K, out_bytes=2):
    """A bf16 matmul's time at the H200's peaks: the larger of memory and compute time."""
    moved = 2 * (M * K + K * N) + out_bytes * M * N
    return 1e6 * max(moved / HBM_BYTES_S, 2 * M * N * K / BF16_FLOPS_S)


def step_prediction(width, rows):
    """(int8 step us, bf16 step us) of GPT-2 at `width` and its depth, from one block's launches:
    the Linears (int8: the quantizers and int8 matmuls; bf16: the same matmuls in bf16) in each
    block, plus what both steps share: the LM head's three bf16 matmuls and causal attention
    (forward 2 B T^2 d, backward 2.5 times that, at BF16_FLOPS_S). Elementwise work and the
    optimizer are left out of both."""
    n_embd, tokens, layers = WIDTHS[width][0], BATCH * CONTEXT, LAYERS[width]
    step = [r for r in rows if r["launch"].startswith(f"{width} step:")]
    head = (bf16_matmul_us(tokens, 50304, n_embd) + bf16_matmul_us(tokens, n_embd, 50304)
            + bf16_matmul_us(50304, n_embd, tokens, 4))
    attention = 1e6 * layers * 3.5 * 2 * BATCH * CONTEXT ** 2 * n_embd / BF16_FLOPS_S
    shared = head + attention
    return (layers * sum(r["predicted_us"] for r in step) + shared,
            layers * sum(r["bf16_us"] for r in step) + shared)


def summary(rows, widths):
    """Per architecture: launches, compiled, fitting, spill-free, passing; per width: the
    predicted int8 and bf16 steps (the same for every architecture: H200 peaks)."""
    lines = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = [r for r in rows if r["arch"] == arch]
        compiled = [r for r in mine if "registers" in r]
        lines.append(f"{arch}: {len(mine)} launches, {len(compiled)} compiled, "
                     f"{sum(r['shared'] <= r['shared_limit'] for r in compiled)} fit, "
                     f"{sum(r['spill_bytes'] == 0 for r in compiled)} spill-free, "
                     f"{sum(not r['failures'] for r in mine)} pass")
    mine = [r for r in rows if r["arch"] == rows[0]["arch"]] if rows else []
    for width in widths:
        int8_us, bf16_us = step_prediction(width, mine)
        lines.append(f"predicted at H200 peaks, GPT-2 {width} ({LAYERS[width]} x "
                     f"{WIDTHS[width][0]}, {BATCH} x {CONTEXT} tokens): int8 step "
                     f"{int8_us / 1e3:.1f} ms, bf16 "
                     f"{bf16_us / 1e3:.1f} ms: int8 {bf16_us / int8_us:.2f}x bf16's speed")
    return lines


def self_test(log=print):
    """The gate can fail: it must reject two plans and pass the two they come from. On sm90, c_fc's
    dX (16384 x 768 x 3072, fp32 out, as after LayerNorm) with one stage more than its plan has,
    and the MLP c_proj's dW (768 x 3072 x 16384 in K-groups of 1024) on a 128 x 256 tile of 4
    warps (the int32 and the fp32 sums, 256 values a thread each: spills on any Triton). Returns
    what it got wrong."""
    gpu, cache, wrong = kernels.GPUS["sm90"], {}, []

    def codes(rows, cols):  # int8 codes, and the K-major view of their transpose
        return torch.empty(rows, cols, dtype=torch.int8, device="meta")

    def scales(groups, n):
        return torch.empty(groups, n, device="meta")
    _, dx = kernels.int8_matmul_plan(codes(16384, 3072), scales(1, 16384), codes(768, 3072).t(),
                                     scales(1, 768), None, torch.float32, 0, None, gpu)
    _, dw = kernels.int8_matmul_plan(codes(768, 16384), scales(16, 768), codes(3072, 16384).t(),
                                     scales(16, 3072), None, torch.float32, 1024, None, gpu)
    cases = [("c_fc dX, its plan", dx, None),
             ("c_fc dX, one stage more (must fail)", dx._replace(meta=dict(
                 dx.meta, num_stages=dx.meta["num_stages"] + 1)), "shared memory"),
             ("c_proj dW, its plan", dw, None),
             ("c_proj dW, 128 x 256 on 4 warps (must fail)", dw._replace(
                 meta=dict(dw.meta, BLOCK_N=256, num_warps=4)), "spills")]
    for name, launch, expected in cases:
        row = inspect(f"self-test: {name}", launch, gpu, compile_launch(launch, gpu, cache))
        log(format_row(row))
        got = "; ".join(row["failures"])
        if (expected is None) != (not got) or (expected and expected not in got):
            wrong.append(f"{name}: expected {expected or 'a pass'}, got {got or 'a pass'}")
    return wrong


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Compile every int8 launch for GPUs that are not here; fail on a launch that "
                    "does not fit, spills, or misses the int8 tensor cores.")
    parser.add_argument("--arch", default="sm90,sm80,sm89",
                        help=f"comma-separated, of {', '.join(kernels.GPUS)}")
    parser.add_argument("--widths", default="small,medium,large,xl",
                        help=f"comma-separated GPT-2 widths, of {', '.join(WIDTHS)}")
    parser.add_argument("--json", default="", help="write every field of every launch here")
    parser.add_argument("--self-test", action="store_true",
                        help="only show that the gate rejects two known-bad plans")
    args = parser.parse_args(argv)
    archs, widths = args.arch.split(","), args.widths.split(",")
    for name, known in [(a, kernels.GPUS) for a in archs] + [(w, WIDTHS) for w in widths]:
        if name not in known:
            parser.error(f"unknown '{name}': choose from {', '.join(known)}")
    if kernels.triton is None or os.environ.get("TRITON_INTERPRET") == "1":
        print("the gate needs triton installed, and TRITON_INTERPRET unset")
        return 1
    import triton
    print(f"compile gate: triton {triton.__version__}, torch {torch.__version__}; "
          f"{', '.join(archs)}; widths {', '.join(widths)}")
    start = time.perf_counter()
    wrong = self_test()  # every run first shows that it can fail
    if wrong or args.self_test:
        print("self-test: " + ("; ".join(wrong) if wrong else "both bad plans rejected, both "
                               "fitted plans pass"))
        return 1 if wrong else 0
    rows = run_gate(archs, widths)
    for line in summary(rows, widths):
        print(line)
    failed = [r for r in rows if r["failures"]]
    compiles = len({(r["arch"], r["compile_key"]) for r in rows if "compile_key" in r})
    print(f"{len(rows) - len(failed)} of {len(rows)} launches pass ({compiles} compiles), "
          f"{time.perf_counter() - start:.0f} s" + (f"; {len(failed)} FAIL" if failed else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "rows": rows}, f,
                      indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
