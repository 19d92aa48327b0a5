"""
tools/bench.py: training speed and memory of qgpt, bf16 vs int8, every configuration in one process.

    python -m tools.bench --model gpt2 --compile              # GPU: GPT-2 small, 16 x 1024 tokens
    python -m tools.bench --model gpt2-medium --compile       # GPU: GPT-2 medium, 8 x 1024
    python -m tools.bench --model gpt2-xl --layers 12 --compile   # GPU: XL width (1600), 12 layers
    python -m tools.bench --compile --compile_mode reduce-overhead   # GPU: steps as CUDA graphs
    python -m tools.bench --model gpt2 --dataset shakespeare --steps 300   # real data: the losses
    python -m tools.bench --adamw                             # GPU: fused low-bit AdamW, check + speed
    python -m tools.bench --model tiny --device cpu --steps 5 # a smoke run anywhere

Every configuration trains the same model from the same initialisation on the same batches (random
tokens, or --dataset), one after the other: the bf16 (autocast) baseline with torch's fused AdamW;
torchao's int8 mixed-precision training (all three matmuls, the LM head excluded), when torchao
imports and its int8 matmul is seen to run; qgpt's int8 recipe (`--preset int8`: Triton kernels on
a GPU); the int8 recipe with 8-bit Adam states. Printed per configuration: kernels one Linear
launches per micro-step (forward and backward), tokens/s, wall ms per step next to the ms the GPU
is busy (the gap is host time), MFU, peak memory, the final loss (mean of the last 10 steps), the
ratios to the first row, and where the GPU time goes; with the GPU, torch, Triton and torchao
versions and the shapes.
"""

import argparse
import dataclasses
import importlib.metadata
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python tools/x.py
import kernels  # noqa: E402
import qgpt  # noqa: E402

MODELS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, batch_size=8),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, batch_size=8),
}
RUNS = [("baseline", {}), ("torchao int8", {}), ("int8 recipe", qgpt.PRESETS["int8"]),
        ("int8 + 8-bit Adam", {**qgpt.PRESETS["int8"], **qgpt.PRESETS["adam8"]})]
TORCHAO = 1  # the index of torchao's row


def precision(device):
    """What every row runs in: training's --dtype auto (bf16 autocast on sm80+, fp32 on a CPU)."""
    return qgpt.autocast_context(device, qgpt.autocast_dtype(qgpt.Config(), device))


def version(package):
    try:
        return importlib.metadata.version(package)  # installed, whether or not imported yet
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ----------------------------------------------------------------------------------------------
# Counting kernels: on a GPU the profiler's device kernels; on a CPU each Triton launch (under the
# interpreter) and each PyTorch operator that computes (each is a kernel on a GPU).

NO_KERNEL_OPS = {  # operators that only allocate or describe memory
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
    "aten::new_empty_strided", "aten::view", "aten::reshape", "aten::_reshape_alias",
    "aten::_unsafe_view", "aten::as_strided", "aten::t", "aten::transpose", "aten::permute",
    "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::resize_", "aten::to",
    "aten::contiguous", "aten::numpy_T", "aten::set_", "aten::unbind", "aten::split",
    "aten::chunk", "aten::narrow", "aten::result_type", "aten::view_as", "aten::is_nonzero"}


def count_kernels(fn, device):
    """(number of kernels fn launches, their names)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return len(names), names
    launches = []
    try:
        import triton.runtime.interpreter as interpreter
        real = interpreter.GridExecutor.__call__
    except ImportError:
        interpreter = None

    def launch(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        with record_function("triton launch"):  # what the interpreter copies inside is not counted
            return real(self, *args, **kwargs)
    if interpreter is not None:
        interpreter.GridExecutor.__call__ = launch
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        if interpreter is not None:
            interpreter.GridExecutor.__call__ = real

    def computes(event):
        return event.name.startswith("aten::") and event.name not in NO_KERNEL_OPS

    def below(event):  # an operator that calls others counts through them
        return any(computes(c) or below(c) for c in event.cpu_children)

    def in_launch(event):
        while event is not None:
            if event.name == "triton launch":
                return True
            event = event.cpu_parent
        return False
    ops = [e.name for e in prof.events() if computes(e) and not below(e) and not in_launch(e)]
    return len(launches) + len(ops), launches + ops


def linear_step_kernels(make_linear, tokens, n_in, n_out, device):
    """Kernels of one micro-step (forward and backward) of one Linear, its W codes already made."""
    torch.manual_seed(0)
    layer = make_linear(n_in, n_out).to(device)
    x = torch.randn(tokens, n_in, device=device, requires_grad=True)
    with precision(device):  # G in the dtype of Y: no cast inside the counted step
        g = torch.randn(tokens, n_out, device=device).to(layer(x).dtype)

    def step():
        with precision(device):
            y = layer(x)
        y.backward(g)
    step()  # W's codes are made once per optimizer step: not counted
    for p in [x, *layer.parameters()]:
        p.grad = None
    return count_kernels(step, device)


# ----------------------------------------------------------------------------------------------
# torchao's int8 mixed-precision training, the peer.

TORCHAO_CALLS = {"n": 0}  # calls of torchao's int8 matmul, counted once torchao_swap patched it
TORCHAO_MODULE_SWAP = [False]  # torchao's module-swap path, after its tensor subclass did not run


def torchao_swap(model, module_swap=False):
    """torchao's int8 mixed-precision training on every Linear but the LM head; False when torchao
    does not import. Its int8 matmul calls are counted in TORCHAO_CALLS, so that a row is trusted
    only when they happen (under torch 2.13 on a CPU, torchao 0.18's default tensor-subclass path
    left every Linear as it was; its module_swap=True path ran)."""
    try:
        from torchao import quantize_
        from torchao.prototype.quantized_training import int8_mixed_precision as int8mp
    except ImportError:
        return False
    if not getattr(int8mp._dynamic_int8_mm, "counted", False):
        real = int8mp._dynamic_int8_mm

        def counted(a, b):
            TORCHAO_CALLS["n"] += 1
            return real(a, b)
        counted.counted = True
        int8mp._dynamic_int8_mm = counted
    quantize_(model, int8mp.Int8MixedPrecisionTrainingConfig(module_swap=module_swap),
              filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "lm_head")
    return True


def driver_version():
    try:
        import subprocess
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        return "?"


# ----------------------------------------------------------------------------------------------
# One configuration.

BUCKETS = [("quantize", ("quantize", "absmax")), ("int8 matmul", ("int8_matmul", "int8_mm")),
           ("attention", ("flash", "attention", "fmha", "sdpa", "cudnn")),
           ("other matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "aten::mm", "addmm",
                             "bmm")),
           ("optimizer", ("adam", "foreach"))]


def breakdown(run_step, device, steps=2):
    """Device time per step by kernel kind, from torch.profiler: {bucket: ms}."""
    from torch.profiler import ProfilerActivity, profile
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            run_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals = dict.fromkeys([b for b, _ in BUCKETS] + ["rest"], 0.0)
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us <= 0 or (device.type == "cpu" and not event.key.startswith("aten::")):
            continue  # on CPU, count the leaf operators only
        name = event.key.lower()
        bucket = next((b for b, words in BUCKETS if any(w in name for w in words)), "rest")
        totals[bucket] += us / 1000 / steps
    return totals


@dataclasses.dataclass
class Row:
    name: str
    tokens_per_s: float
    ms: float
    busy_ms: float
    peak_mib: float
    loss: float
    mfu: float
    kernels: int
    parts: dict


def bench_one(name, cfg, vocab_size, batches, steps, warmup, device, compile_mode=None,
              profile_steps=0, peak_flops=None):
    """Train warmup + steps steps of one configuration; returns its Row, or None when torchao's
    int8 matmul cannot be made to run."""
    peer = name == RUNS[TORCHAO][0]
    for module_swap in (False, True) if peer else (False,):
        model = qgpt.build_model(cfg, vocab_size, device)
        if peer and not torchao_swap(model, module_swap):
            print(f"  {name}: torchao does not import: row left out")
            return None
        calls_before = TORCHAO_CALLS["n"]
        optimizer = qgpt.make_optimizer(model, cfg)
        run_step = make_step(model, optimizer, batches, device, compile_mode)
        t0 = time.time()
        for _ in range(warmup):
            run_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(f"  {name}: {warmup} warm-up steps (compilation included) in {time.time() - t0:.1f} "
              f"s", flush=True)
        if not peer or TORCHAO_CALLS["n"] > calls_before:
            break
        print(f"  {name}{' (module_swap=True)' if module_swap else ''}: its int8 matmul never ran "
              f"(every Linear stayed in full precision)")
    else:
        print(f"  {name}: row left out")
        return None
    TORCHAO_MODULE_SWAP[0] = module_swap
    t0 = time.time()
    losses = [run_step().detach().clone() for _ in range(steps)]  # a copy: CUDA graphs reuse it
    last = torch.stack(losses[-10:]).mean().item()  # synchronises; 10 batches: less noise than one
    dt = (time.time() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    tokens = cfg.batch_size * cfg.block_size
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak_flops = peak_flops or next((f for key, f in qgpt.PEAK_FLOPS.items() if key in gpu), None)
    mfu = qgpt.flops_per_token(model, cfg) * tokens / dt / peak_flops if peak_flops else None
    parts = breakdown(run_step, device, profile_steps) if profile_steps else None
    busy = sum(parts.values()) if parts else None
    count = linear_step_kernels(lambda n_in, n_out: linear_of(name, cfg, n_in, n_out, device),
                                tokens, cfg.n_embd, 4 * cfg.n_embd, device)[0]
    label = name + (" (swap)" if peer and module_swap else "")
    return Row(label, tokens / dt, dt * 1000, busy, peak, last, mfu, count, parts)


def make_step(model, optimizer, batches, device, compile_mode):
    """One training step on the next batch; returns the loss."""
    run_model = torch.compile(model, mode=compile_mode) if compile_mode else model
    graphs = compile_mode == "reduce-overhead" and device.type == "cuda"  # CUDA graphs replay it
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    state = {"i": 0}

    def run_step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's buffers may go
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        with precision(device):
            loss = run_model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return run_step


def linear_of(name, cfg, n_in, n_out, device):
    """One Linear (c_fc's shape) configured as the run configures the model's."""
    holder = nn.Sequential(nn.Linear(n_in, n_out))
    if name == RUNS[TORCHAO][0]:
        torchao_swap(holder, TORCHAO_MODULE_SWAP[0])
    elif any(f.quantized for f in qgpt.make_formats(cfg).values()):
        qgpt.quantize_model(holder, cfg, qgpt.select_backend(cfg, device), device)
    return holder[0]


# ----------------------------------------------------------------------------------------------
# The fused low-bit AdamW (kernels.py) against QAdamW's PyTorch step (qgpt.py): both files.

def adamw(device):
    """The fused kernel against the PyTorch step (exact under the interpreter), then on a GPU one
    step over GPT-2 small's 2-D weights: torch's fused AdamW vs the fused low-bit kernel."""
    ok = True
    for bits in (8, 4):
        results = []
        for fused in (False, True):
            torch.manual_seed(0)
            p = nn.Parameter(torch.randn(37, 50, device=device) * 0.02)
            opt = qgpt.QAdamW([p], lr=1e-2, weight_decay=0.1, m_bits=bits, v_bits=bits,
                              min_size=1, fused=fused)
            for _ in range(3):
                p.grad = torch.randn_like(p) * 0.01
                opt.step()
            results.append([p.detach(), opt.state[p]["m"]["codes"], opt.state[p]["v"]["codes"]])
        for name, got, want in zip(["parameter", "m codes", "v codes"], results[1], results[0]):
            # exact under the interpreter; on a GPU PyTorch's own kernels round some steps apart
            tol = 0 if device.type == "cpu" else (1e-5 if name == "parameter" else 1)
            ok &= kernels.compare(f"adamw_lowbit_step {bits}-bit {name}", got.double(),
                                  want.double(), rtol=tol, atol=tol * 1e-3)
    if device.type != "cuda":
        return 0 if ok else 1
    from triton.testing import do_bench
    shapes = [(50304, 768)] + [(768, 2304), (768, 768), (3072, 768), (768, 3072)] * 12
    print(f"AdamW step over GPT-2 small's {len(shapes)} weight matrices (fp32 parameters)")
    for name, make, state_bytes in [
            ("torch.optim.AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), 16),
            ("QAdamW 8-bit (Triton)", lambda ps: qgpt.QAdamW(ps, lr=1e-3, m_bits=8, v_bits=8), 4),
            ("QAdamW 4-bit (Triton)", lambda ps: qgpt.QAdamW(ps, lr=1e-3, m_bits=4, v_bits=4), 2)]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
        for q in params:
            q.grad = torch.randn_like(q) * 1e-3
        opt = make(params)
        n = sum(q.numel() for q in params)
        ms = do_bench(opt.step, return_mode="median")
        moved = n * (8 + 4 + state_bytes)  # p read + write, grad read, m and v read + write
        print(f"  {name:26s} {n / 1e6:.1f}M parameters: {ms:6.2f} ms, {moved / ms / 1e6:6.0f} GB/s")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="bf16 vs int8 training speed (README.md).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="gpt2")
    parser.add_argument("--layers", type=int, default=0, help="override the model's layer count")
    parser.add_argument("--batch_size", type=int, default=0, help="override the sequences a step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--dataset", default="", help="train on this prepared dataset, not random")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile every configuration")
    parser.add_argument("--compile_mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune"],
                        help="with --compile: torch.compile's mode; reduce-overhead replays each "
                             "step as CUDA graphs, so no Python launches a kernel")
    parser.add_argument("--fuse_quantizers", action="store_true",
                        help="with --compile: the int8 recipe quantizes in PyTorch ops inductor fuses")
    parser.add_argument("--token_group", type=int, default=qgpt.Config.token_group,
                        help="the int8 recipe's tokens per dW scale (qgpt.py --token_group)")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="the device's peak for MFU (default: a known GPU's bf16 dense peak)")
    parser.add_argument("--profile_steps", type=int, default=2,
                        help="steps profiled for the breakdown and GPU-busy time (0 = none)")
    parser.add_argument("--runs", default=",".join(str(i) for i in range(len(RUNS))),
                        help="which configurations, by index: " + ", ".join(
                            f"{i} {n}" for i, (n, _) in enumerate(RUNS)))
    parser.add_argument("--adamw", action="store_true",
                        help="only the fused low-bit AdamW: check against QAdamW, then its speed")
    args = parser.parse_args(argv)
    try:
        device = qgpt.pick_device(args.device)
        if args.adamw:
            return adamw(device)
        sizes = {**MODELS[args.model], **({"n_layer": args.layers} if args.layers else {}),
                 **({"batch_size": args.batch_size} if args.batch_size else {})}
        base = dataclasses.replace(qgpt.Config(), **sizes, device=str(device),
                                   token_group=args.token_group,
                                   fuse_quantizers=args.fuse_quantizers)
        qgpt.validate_config(dataclasses.replace(base, **qgpt.PRESETS["int8"]))
        gen = torch.Generator().manual_seed(0)
        if args.dataset:
            cfg = dataclasses.replace(base, dataset=args.dataset, data_dir=args.data_dir)
            data, meta = qgpt.load_data(cfg)
            vocab_size = meta["vocab_size"]
            batches = [qgpt.get_batch(data["train"], base.batch_size, base.block_size, gen, device)
                       for _ in range(args.warmup + args.steps)]
        else:
            vocab_size = 50304
            tokens = torch.randint(vocab_size, (8, base.batch_size, base.block_size + 1),
                                   generator=gen).to(device)
            batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    except qgpt.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    driver = f", driver {driver_version()}" if device.type == "cuda" else ""
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"{gpu}{driver}, torch {torch.__version__}, triton {version('triton')}, torchao "
          f"{version('torchao')}, {precision}; {args.model}: {base.n_layer} layers, width "
          f"{base.n_embd}, batch {base.batch_size} x {base.block_size} tokens, {args.steps} timed "
          f"steps" + (f", torch.compile ({args.compile_mode})" if args.compile else "")
          + (", quantizers fused by inductor" if args.fuse_quantizers else "")
          + f", token groups of {args.token_group}"
          + f", {'data ' + args.dataset if args.dataset else 'random tokens'}")
    rows = []
    for index in [int(i) for i in args.runs.split(",")]:
        name, preset = RUNS[index]
        cfg = dataclasses.replace(base, **preset)
        row = bench_one(name, cfg, vocab_size, batches, args.steps, args.warmup, device,
                        args.compile_mode if args.compile else None, args.profile_steps,
                        args.peak_tflops * 1e12)
        if row is not None:
            rows.append(row)
            print(f"  {name}: {row.tokens_per_s:.0f} tokens/s, {row.ms:.1f} ms/step", flush=True)
    if not rows:
        return 0
    first = rows[0]
    print("busy ms: the profiled ops' own time (a GPU's kernels; the gap to ms/step is host time)"
          + ("; on a CPU, speeds vary by a third between runs" if device.type == "cpu" else ""))
    print(f"{'configuration':20s} {'kernels':>7s} {'tokens/s':>10s} {'ms/step':>8s} "
          f"{'busy ms':>7s} {'MFU':>5s} {'peak MiB':>8s} {'loss':>7s} | {'speed':>6s} "
          f"{'memory':>6s} {'loss':>6s}  (kernels: one Linear's micro-step; ratios to the first row)")

    def text(value, fmt, width):
        return format(value, fmt) if value is not None else f"{'-':>{width}s}"
    for r in rows:
        memory = r.peak_mib / first.peak_mib if r.peak_mib is not None else None
        print(f"{r.name:20s} {r.kernels:7d} {r.tokens_per_s:10.0f} {r.ms:8.1f} "
              f"{text(r.busy_ms, '7.1f', 7)} {text(r.mfu, '5.1%', 5)} {text(r.peak_mib, '8.0f', 8)} "
              f"{r.loss:7.4f} | {r.tokens_per_s / first.tokens_per_s:6.2f} {text(memory, '6.2f', 6)} "
              f"{r.loss / first.loss:6.3f}")
    if args.profile_steps:
        kinds = [b for b, _ in BUCKETS] + ["rest", "total"]
        unit = "device" if device.type == "cuda" else "CPU operator"
        print(f"\nwhere the time goes: {unit} ms per step, torch.profiler over "
              f"{args.profile_steps} steps" + ("; on a CPU the simulated quantizers and QAdamW's "
                                               "PyTorch ops count as 'rest'" if unit != "device"
                                               else ""))
        print(f"{'configuration':20s} " + " ".join(f"{k:>12s}" for k in kinds))
        for r in rows:
            parts = {**r.parts, "total": sum(r.parts.values())}
            print(f"{r.name:20s} " + " ".join(f"{parts[k]:12.2f}" for k in kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
