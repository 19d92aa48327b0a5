"""
tools/plot.py: the loss curves of one or more runs on one PNG, from their metrics.jsonl.

    python -m tools.plot out                       # one run: out/metrics.jsonl -> out/loss.png
    python -m tools.plot out_bf16 out_int8 --out compare.png   # several runs, one figure

Every training run writes metrics.jsonl in its out_dir (qgpt.py: a first line with the config,
versions and device, then one line per log step and per evaluation). Left: training loss per log
step; right: validation loss per evaluation; both against tokens seen. Each run is labelled by its
folder and its recipe (the config line). Without matplotlib it says so in one line.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python tools/x.py
from prepare_data import OneLineParser, UserError  # noqa: E402
import qgpt  # noqa: E402
from tools.study import pyplot  # noqa: E402


def read_metrics(out_dir):
    """(the run's config line, [train records], [eval records]) of out_dir/metrics.jsonl."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{path} not found: train into that --out_dir first")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    run = next((r for r in records if r["kind"] == "run"), {"config": {}})
    return (run, [r for r in records if r["kind"] == "train"],
            [r for r in records if r["kind"] == "eval"])


def label(out_dir, run):
    """The folder's name and what it trained: full precision, or the recipe and its bits."""
    cfg, name = run["config"], os.path.basename(os.path.normpath(out_dir))
    if not cfg:
        return name
    names = [cfg.get(f"{a}_format", "int") for a in "wag"]
    if any(n not in qgpt.FORMATS for n in names):  # a format registered by the run's own script
        return f"{name} ({cfg['recipe']}: W {names[0]}, X {names[1]}, G {names[2]})"
    formats = qgpt.make_formats(qgpt.checkpoint_config({"config": cfg}))
    quantized = any(f.quantized for f in formats.values())
    what = (f"{cfg['recipe']}: " + qgpt.formats_text(formats) if quantized
            else "full precision") + (f", Adam m{cfg['m_bits']} v{cfg['v_bits']}"
                                 if min(cfg["m_bits"], cfg["v_bits"]) < 32 else "")
    return f"{name} ({what}, {run.get('dtype', '?')})"


def main(argv=None):
    parser = OneLineParser(description="Loss curves of qgpt runs (their metrics.jsonl) on one PNG.")
    parser.add_argument("out_dirs", nargs="+", help="run folders (each with metrics.jsonl)")
    parser.add_argument("--out", default="", help="the PNG (default: loss.png in the first folder)")
    args = parser.parse_args(argv)
    try:
        runs = [(d, *read_metrics(d)) for d in args.out_dirs]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plt = pyplot("the curves are in each run's metrics.jsonl")
    if plt is None:
        return 1
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for out_dir, run, train, evals in runs:
        name = label(out_dir, run)
        left.plot([r["tokens"] for r in train], [r["loss"] for r in train], label=name)
        right.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label=name)
    for ax, title in [(left, "training loss (per log step)"), (right, "validation loss")]:
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = args.out or os.path.join(args.out_dirs[0], "loss.png")
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
