"""
tools/bench.py: end-to-end training speed and memory of qgpt, bf16 baseline vs the int8 recipe, one process.

    python -m tools.bench --model gpt2 --compile                 # GPU: GPT-2 small, 16 x 1024 tokens per step
    python -m tools.bench --model gpt2-medium --compile          # GPU: GPT-2 medium, 8 x 1024
    python -m tools.bench --compile --compile_mode reduce-overhead   # GPU: each step replayed as CUDA graphs
    python -m tools.bench --model gpt2 --dataset shakespeare --steps 300   # real data: compare the losses too
    python -m tools.bench --model tiny --device cpu --steps 5    # a smoke run anywhere

Every configuration trains the same model from the same initialisation on the same batches (random
tokens, or --dataset), in this one process, one after the other: the bf16 (autocast) baseline, the
int8 recipe (qgpt's `--preset int8`: w8a8g8 in all three matmuls, Triton kernels when a GPU allows),
and the int8 recipe with 8-bit Adam states. Prints tokens/s, ms/step, peak GPU memory, the final
loss (mean of the last 10 steps), and each ratio to the baseline, with the GPU, torch and Triton versions and the shapes.
"""

import argparse
import dataclasses
import importlib.metadata
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python tools/x.py too
import qgpt  # noqa: E402

MODELS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, batch_size=8),
}
RUNS = [("baseline", {}), ("int8 recipe", qgpt.PRESETS["int8"]),
        ("int8 + 8-bit Adam", {**qgpt.PRESETS["int8"], **qgpt.PRESETS["adam8"]})]


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def flops_per_token(model, cfg):
    """nanoGPT's estimate (PaLM appendix B): 6 N + 12 L H Q T per token, forward and backward."""
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


BUCKETS = [("quantize", ("quantize", "absmax")), ("int8 matmul", ("int8_matmul",)),
           ("attention", ("flash", "attention", "fmha", "sdpa", "cudnn")),
           ("other matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "aten::mm", "addmm", "bmm")),
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


def bench_one(cfg, vocab_size, batches, steps, warmup, device, compile_mode=None, profile_steps=0, peak_flops=None):
    """Train `warmup + steps` steps; returns (tokens/s, ms/step, peak MiB or None, mean loss of the last
    10 steps, MFU, breakdown)."""
    model = qgpt.build_model(cfg, vocab_size, device)
    optimizer = qgpt.make_optimizer(model, cfg)
    run_model = torch.compile(model, mode=compile_mode) if compile_mode else model
    graphs = compile_mode == "reduce-overhead" and device.type == "cuda"  # CUDA graphs replay the step
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    state = {"i": 0}

    def run_step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new training step: the last one's buffers may go
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        with qgpt.autocast_context(device):
            loss = run_model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        run_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.time()
    losses = [run_step().detach().clone() for _ in range(steps)]  # a copy: CUDA graphs reuse the output
    last = torch.stack(losses[-10:]).mean().item()  # synchronises; 10 batches: less noise than one
    dt = (time.time() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    tokens = cfg.batch_size * cfg.block_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak_flops = peak_flops or next((f for key, f in PEAK_FLOPS.items() if key in name), None)
    mfu = flops_per_token(model, cfg) * tokens / dt / peak_flops if peak_flops else None
    parts = breakdown(run_step, device, profile_steps) if profile_steps else None
    return tokens / dt, dt * 1000, peak, last, mfu, parts


def main(argv=None):
    parser = argparse.ArgumentParser(description="bf16 vs int8 training speed (README.md, 'Performance').",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="gpt2")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--dataset", default="", help="train on this prepared dataset instead of random tokens")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile every configuration")
    parser.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="with --compile: torch.compile's mode; reduce-overhead replays each step as CUDA graphs, "
                             "so no Python launches a kernel")
    parser.add_argument("--inductor_quantize", action="store_true",
                        help="with --compile: quantize in PyTorch ops that inductor fuses (kernels.TritonBackend)")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="the device's peak for MFU (default: the bf16 dense peak of a known GPU; none on CPU)")
    parser.add_argument("--profile_steps", type=int, default=2, help="steps profiled for the breakdown (0 = none)")
    parser.add_argument("--runs", default=",".join(str(i) for i in range(len(RUNS))),
                        help="which configurations, by index: " + ", ".join(f"{i} {n}" for i, (n, _) in enumerate(RUNS)))
    args = parser.parse_args(argv)
    if args.inductor_quantize:
        import kernels
        kernels.TritonBackend.inductor_quantize = True
    try:
        device = qgpt.pick_device(args.device)
        base = dataclasses.replace(qgpt.Config(), **MODELS[args.model], device=str(device))
        gen = torch.Generator().manual_seed(0)
        if args.dataset:
            data, meta = qgpt.load_data(dataclasses.replace(base, dataset=args.dataset, data_dir=args.data_dir))
            vocab_size = meta["vocab_size"]
            batches = [qgpt.get_batch(data["train"], base.batch_size, base.block_size, gen, device)
                       for _ in range(args.warmup + args.steps)]
        else:
            vocab_size = 50304
            tokens = torch.randint(vocab_size, (8, base.batch_size, base.block_size + 1), generator=gen).to(device)
            batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    except qgpt.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    try:
        triton_version = importlib.metadata.version("triton")  # installed, whether or not imported yet
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"{gpu}, torch {torch.__version__}, triton {triton_version}, {precision}; {args.model}: {base.n_layer} layers, "
          f"width {base.n_embd}, batch {base.batch_size} x {base.block_size} tokens, {args.steps} timed steps"
          + (f", torch.compile ({args.compile_mode})" if args.compile else "")
          + f", {'data ' + args.dataset if args.dataset else 'random tokens'}")
    rows = []
    for index in [int(i) for i in args.runs.split(",")]:
        name, preset = RUNS[index]
        cfg = dataclasses.replace(base, **preset)
        rows.append((name, *bench_one(cfg, vocab_size, batches, args.steps, args.warmup, device,
                                      args.compile_mode if args.compile else None,
                                      args.profile_steps, args.peak_tflops * 1e12)))
        print(f"  {name}: {rows[-1][1]:.0f} tokens/s, {rows[-1][2]:.1f} ms/step", flush=True)
    base_tps, _, base_peak, base_loss = rows[0][1:5]
    print(f"{'configuration':20s} {'tokens/s':>10s} {'ms/step':>8s} {'MFU':>5s} {'peak MiB':>8s} {'loss':>7s} | "
          f"{'speed':>6s} {'memory':>6s} {'loss':>6s}  (ratios to the first row)")
    for name, tps, ms, peak, loss, mfu, _ in rows:
        peak_text = f"{peak:8.0f}" if peak is not None else f"{'-':>8s}"
        mem_ratio = f"{peak / base_peak:6.2f}" if peak is not None else f"{'-':>6s}"
        mfu_text = f"{mfu:5.1%}" if mfu is not None else f"{'-':>5s}"
        print(f"{name:20s} {tps:10.0f} {ms:8.1f} {mfu_text} {peak_text} {loss:7.4f} | {tps / base_tps:6.2f} "
              f"{mem_ratio} {loss / base_loss:6.3f}")
    if args.profile_steps:
        kinds = [b for b, _ in BUCKETS] + ["rest", "total"]
        unit = "device" if device.type == "cuda" else "CPU operator"
        print(f"\nwhere the time goes: {unit} ms per step, torch.profiler over {args.profile_steps} steps"
              + ("; on a CPU the simulated quantizers and QAdamW's PyTorch ops count as 'rest'" if unit != "device" else ""))
        print(f"{'configuration':20s} " + " ".join(f"{k:>12s}" for k in kinds))
        for name, *_, parts in rows:
            parts = {**parts, "total": sum(parts.values())}
            print(f"{name:20s} " + " ".join(f"{parts[k]:12.2f}" for k in kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
