"""
tools/study.py: the paper's study (which of W, A, G and Adam states tolerate 8 or 4 bits) in one command.

    python prepare_data.py --tokenizer char && python -m tools.study           # full grid, CPU, 70 minutes
    python -m tools.study --quick                                              # 9 runs, 15 minutes
    python -m tools.study --scale gpu                                          # BPE data, larger model, GPU

Each run trains qgpt.py's default character-level model (or a larger BPE one with --scale gpu)
with one quantization preset and seed. Writes to --out (default study_out/):
  results.csv   name, group, seed, final train/val loss, divergence step, tokens/s, wall time,
                m-sharpness (baseline, w8, w4)
  curves.json   validation-loss curves;  val_curves.png  the curves grouped by what is quantized
  diagnostics.txt  activation outliers and gradient sparsity measured on the trained baseline
"""

import argparse
import contextlib
import csv
import dataclasses
import json
import multiprocessing
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python tools/x.py too
import qgpt  # noqa: E402

# (name, group, presets): the paper's configurations, qgpt.PRESETS names joined by commas
GRID = [
    ("baseline", "baseline", "baseline"),
    ("w8 per-channel", "weights", "w8"), ("w8 per-tensor", "weights", "w8t"),
    ("w4 per-channel", "weights", "w4"), ("w4 per-tensor", "weights", "w4t"),
    ("a8 per-token", "activations", "a8"), ("a8 per-tensor", "activations", "a8t"),
    ("a4 per-token", "activations", "a4"), ("a4 per-tensor", "activations", "a4t"),
    ("g8 per-token", "gradients", "g8"), ("g8 per-tensor", "gradients", "g8t"),
    ("m8 per-tensor", "optimizer", "m8"), ("m8 per-channel", "optimizer", "m8c"),
    ("m4 per-tensor", "optimizer", "m4"), ("m4 per-channel", "optimizer", "m4c"),
    ("v8 linear map", "optimizer", "v8"), ("v8 sqrt map", "optimizer", "v8sqrt"),
    ("w8a8", "combined", "w8a8"), ("w8a8g8", "combined", "w8a8g8"), ("w8a8g8 + m8", "combined", "w8a8g8,m8"),
    ("a8 per-feature", "activations", "a8col"),  # the authors' code's "per-token": scales shared over the batch
    ("int8 recipe", "int8 path", "int8"), ("int8 + adam4", "int8 path", "int8,adam4"),  # what the kernels run
    # formats beyond the paper: stochastic rounding of G; fp8 (e4m3 W and X, e5m2 G), simulated
    ("g8 per-token SR", "formats", "g8,sr"), ("g4 per-token", "formats", "g4"), ("g4 per-token SR", "formats", "g4,sr"),
    ("fp8 per-tensor", "formats", "fp8"), ("fp8 per-row", "formats", "fp8row"),
]
QUICK = ["baseline", "w8 per-channel", "w4 per-channel", "a8 per-token", "a4 per-tensor", "g8 per-token",
         "g8 per-tensor", "v8 linear map", "w8a8g8 + m8"]
SHARPNESS = ["baseline", "w8 per-channel", "w4 per-channel"]
SCALES = {"cpu": {}, "gpu": dict(dataset="shakespeare", n_layer=6, n_head=6, n_embd=384, block_size=256,
                                 batch_size=32, max_iters=3000, lr=6e-4, min_lr=6e-5, eval_interval=250)}


def run_one(job):
    """Train one configuration in this (worker) process; returns a results row and its curve."""
    name, group, presets, seed, args = job
    torch.set_num_threads(args.threads)
    argv = ["--preset", presets, "--seed", str(seed), "--out_dir", os.path.join(args.out, "runs", f"{presets}_{seed}"),
            "--max_new_tokens", "0", "--data_dir", args.data_dir]
    log_path = os.path.join(args.out, "logs", f"{presets.replace(',', '+')}_{seed}.log")
    t0 = time.time()
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        cfg = dataclasses.replace(qgpt.parse_config(argv), **SCALES[args.scale],
                                  **({"max_iters": args.max_iters} if args.max_iters else {}))
        model, history = qgpt.train(cfg)
        data, device = qgpt.load_data(cfg)[0], next(model.parameters()).device
        sharp = ""
        if name in SHARPNESS and history["diverged_at"] is None:
            sharp = m_sharpness(model, data, cfg, device)
        diagnostics = measure_outliers_and_sparsity(model, data, cfg, device) if name == "baseline" and seed == args.seeds[0] else None
    final = history["evals"][-1]
    row = {"name": name, "group": group, "presets": presets, "seed": seed, "steps": final[0],
           "train_loss": round(final[1], 4), "val_loss": round(final[2], 4),
           "diverged_at": "" if history["diverged_at"] is None else history["diverged_at"],
           "tokens_per_s": round(history["tokens_per_s"]), "wall_s": round(time.time() - t0, 1),
           "m_sharpness": "" if sharp == "" else round(sharp, 4)}
    print(f"{name:18s} seed {seed}: val {row['val_loss']}, {row['wall_s']} s" +
          (f", diverged at {row['diverged_at']}" if row["diverged_at"] != "" else ""), flush=True)
    return row, [(it, val) for it, _, val in history["evals"]], diagnostics


def m_sharpness(model, data, cfg, device, rho=0.05, batches=8):
    """The paper's m-sharpness: loss increase after one SAM ascent step of radius rho, averaged.

    Per batch: g = grad L(w); L(w + rho * g / ||g||) - L(w). Dropout off; weights restored after.
    """
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    params = [p for p in model.parameters() if p.requires_grad]
    increases = []
    for _ in range(batches):
        x, y = qgpt.get_batch(data["train"], cfg.batch_size, cfg.block_size, gen, device)
        loss = model(x, y)[1]
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).clamp(min=1e-12)
        with torch.no_grad():
            steps = [rho * g / norm for g in grads]
            for p, e in zip(params, steps):
                p.add_(e)
            increases.append(model(x, y)[1].item() - loss.item())
            for p, e in zip(params, steps):
                p.sub_(e)
    model.train()
    return sum(increases) / len(increases)


def measure_outliers_and_sparsity(model, data, cfg, device):
    """On the trained baseline: per-layer activation outliers and gradient entries rounded to 0 at 8 bits."""
    operands = {}  # {layer: {"X": x, "G": g}}, from qgpt's hooks
    x, y = qgpt.get_batch(data["train"], cfg.batch_size, cfg.block_size, torch.Generator().manual_seed(0), device)
    with qgpt.operand_hooks(model, lambda name, m, operand, t: operands.setdefault(name, {}).__setitem__(operand, t)):
        model(x, y)[1].backward()
    model.zero_grad(set_to_none=True)
    lines = [f"{'layer':28s} {'X absmax/median':>16s} {'a8 err tensor':>14s} {'a8 err token':>13s} "
             f"{'G->0 tensor':>12s} {'G->0 token':>11s}"]
    for name, ops in operands.items():
        x, g = ops["X"], ops["G"]
        col_absmax = x.abs().amax(dim=0)  # per input feature: outlier features stand out here
        ratio = (col_absmax.max() / col_absmax.median()).item()
        stats = {gran: qgpt.quantization_stats(x, qgpt.IntFormat(8, gran)) for gran in ("tensor", "row")}
        gstats = {gran: qgpt.quantization_stats(g, qgpt.IntFormat(8, gran, floor=qgpt.GRAD_FLOOR))
                  for gran in ("tensor", "row")}
        lines.append(f"{name:28s} {ratio:16.1f} {stats['tensor']['rel_err']:14.4f} {stats['row']['rel_err']:13.4f} "
                     f"{gstats['tensor']['zeroed']:12.3f} {gstats['row']['zeroed']:11.3f}")
    return "\n".join(lines)


def pyplot(what):
    """matplotlib's pyplot drawing to files, or None with one line saying what is not drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, no plot: pip install matplotlib ({what})")
        return None
    return plt


def plot(curves, rows, path):
    """Top: validation loss (mean over seeds); bottom: its difference to the baseline of the same seed."""
    plt = pyplot("results.csv is written")
    if plt is None:
        return
    groups = ["weights", "activations", "gradients", "optimizer", "combined", "int8 path", "formats"]
    seeds = sorted({r["seed"] for r in rows})
    names = list(dict.fromkeys(r["name"] for r in rows))

    def mean_curve(name, minus_baseline=False):
        steps = [it for it, _ in curves[(name, seeds[0])]]
        values = [sum(curves[(name, s)][i][1] - (curves[("baseline", s)][i][1] if minus_baseline else 0)
                      for s in seeds) / len(seeds) for i in range(len(steps))]
        return steps[1:], values[1:]  # skip step 0 (all at ln(vocab))

    fig, axes = plt.subplots(2, len(groups), figsize=(4 * len(groups), 7), sharex=True)
    for col, group in enumerate(groups):
        axes[0, col].plot(*mean_curve("baseline"), "k--", label="baseline")
        axes[1, col].axhline(0.0, color="k", linestyle="--")
        for name in names:
            if next(r["group"] for r in rows if r["name"] == name) != group:
                continue
            final = mean_curve(name, True)[1][-1]
            label = name + (f" (off the chart: {final:+.2f})" if final > 0.15 else "")
            axes[0, col].plot(*mean_curve(name), label=label)
            axes[1, col].plot(*mean_curve(name, True), label=label)
        axes[0, col].set_title(group)
        axes[0, col].set_ylim(1.8, 2.6)
        axes[1, col].set_ylim(-0.03, 0.15)
        axes[1, col].set_xlabel("step")
        axes[0, col].legend(fontsize=7)
    axes[0, 0].set_ylabel(f"validation loss (mean of {len(seeds)} seeds)")
    axes[1, 0].set_ylabel("minus the baseline of the same seed")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def markdown_table(rows):
    """results.csv's rows as a markdown table: per run, the val loss per seed and its mean, the
    difference to the baseline of the same seed (same initialisation and batches) per seed and its
    mean, m-sharpness, tokens/s."""
    seeds = sorted({r["seed"] for r in rows})
    base = {r["seed"]: float(r["val_loss"]) for r in rows if r["name"] == "baseline"}
    lines = ["| run | group | final val loss, per seed | mean | paired diff. vs baseline, per seed | "
             "mean diff. | m-sharpness | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["name"] for r in rows):
        runs = {r["seed"]: r for r in rows if r["name"] == name}
        if sorted(runs) != seeds or sorted(base) != seeds:
            continue  # a row needs every seed, and the baseline of each
        loss = [float(runs[s]["val_loss"]) for s in seeds]
        diff = [v - base[s] for v, s in zip(loss, seeds)]
        sharp = [float(runs[s]["m_sharpness"]) for s in seeds if runs[s]["m_sharpness"] != ""]
        sharp_text = f"{sum(sharp) / len(sharp):.3f} ({', '.join(f'{v:.3f}' for v in sharp)})" if sharp else "-"
        speed = sum(float(runs[s]["tokens_per_s"]) for s in seeds) / len(seeds)
        lines.append(f"| {name} | {runs[seeds[0]]['group']} | {' / '.join(f'{v:.4f}' for v in loss)} | "
                     f"{sum(loss) / len(loss):.4f} | {' / '.join(f'{v:+.4f}' for v in diff)} | "
                     f"**{sum(diff) / len(diff):+.4f}** | {sharp_text} | {speed:.0f} |")
    return "\n".join(lines)


def replot(out):
    """Draw the plot again from results.csv and curves.json (no training)."""
    with open(os.path.join(out, "results.csv")) as f:
        rows = [dict(r, seed=int(r["seed"])) for r in csv.DictReader(f)]
    with open(os.path.join(out, "curves.json")) as f:
        curves = {(key.split("|")[0], int(key.split("|")[1])): c for key, c in json.load(f).items()}
    plot(curves, rows, os.path.join(out, "val_curves.png"))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the paper's quantization grid (README.md, 'The paper's study').",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     epilog="names for --only: " + ", ".join(f"'{name}'" for name, _, _ in GRID))
    parser.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} runs, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338], help="seeds for every run")
    parser.add_argument("--scale", choices=list(SCALES), default="cpu", help="cpu: char model; gpu: BPE, 6x384")
    parser.add_argument("--max_iters", type=int, default=0, help="override the steps per run (0: the default)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--only", nargs="+", default=None, help="run only these names from the grid")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--out", default="study_out", help="output folder")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --out's files")
    parser.add_argument("--table", action="store_true", help="only print --out's results.csv as a markdown table")
    args = parser.parse_args(argv)
    if args.replot:
        replot(args.out)
        return 0
    if args.table:
        with open(os.path.join(args.out, "results.csv")) as f:
            print(markdown_table([dict(r, seed=int(r["seed"])) for r in csv.DictReader(f)]))
        return 0
    unknown = [name for name in args.only or [] if name not in [g[0] for g in GRID]]
    if unknown:
        print(f"error: --only {', '.join(unknown)}: not in the grid; names: {', '.join(g[0] for g in GRID)}",
              file=sys.stderr)
        return 2
    grid = [g for g in GRID if (not args.quick or g[0] in QUICK) and (not args.only or g[0] in args.only)]
    if args.quick:
        args.seeds = args.seeds[:1]
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    try:
        qgpt.load_data(dataclasses.replace(qgpt.Config(), data_dir=args.data_dir, **SCALES[args.scale]))
    except qgpt.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = [(name, group, presets, seed, args) for seed in args.seeds for name, group, presets in grid]
    print(f"{len(jobs)} runs, {args.jobs} at a time, {args.threads} thread(s) each; logs in {args.out}/logs")
    t0 = time.time()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(run_one, jobs, chunksize=1)
    rows = [r for r, _, _ in results]
    curves = {(r["name"], r["seed"]): c for r, c, _ in results}
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "curves.json"), "w") as f:
        json.dump({f"{name}|{seed}": c for (name, seed), c in curves.items()}, f)
    diagnostics = [d for _, _, d in results if d]
    if diagnostics:
        with open(os.path.join(args.out, "diagnostics.txt"), "w") as f:
            f.write(diagnostics[0] + "\n")
    plot(curves, rows, os.path.join(args.out, "val_curves.png"))
    print(f"wrote {args.out}/results.csv; {len(jobs)} runs in {(time.time() - t0) / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
