"""
qgpt: quantized pre-training of GPT-2, in one readable file.

Chitsaz, Fournier, Mordido, Chandar, "Exploring Quantization for Efficient Pre-Training of
Transformer Language Models" (EMNLP Findings 2024) quantizes the weights, activations and
gradients of GPT-2's Linear layers, and Adam's moments, and measures what each costs in loss. The
paper *simulates* quantization; qgpt runs that simulation, and also stores Adam's moments as real
8- and 4-bit codes and (with kernels.py, on a GPU) runs the Linears on int8 tensor cores.

    python prepare_data.py --tokenizer char        # offline Shakespeare, character level
    python qgpt.py                                  # CPU baseline, about 2 minutes
    python qgpt.py --wbits 8 --abits 8              # the paper's w8a8 (simulated)
    python qgpt.py --preset int8,adam8              # int8 matmuls, 8-bit Adam states
    python qgpt.py --preset fp8                     # fp8: e4m3 W and X, e5m2 G (simulated)
    python qgpt.py --mode sample --prompt "ROMEO:"  # sample from out/ckpt.pt
    python qgpt.py -h                               # every flag and preset
    python -m pytest test_qgpt.py                   # the tests (CPU)

How it works:
 1. `quantize` maps a float tensor to integer codes, one scale per tensor, row, column or group:
    scale = absmax / (2^(b-1) - 1), code = clamp(round(x / scale)); dynamic: recomputed each call.
 2. A number format says what one operand becomes: `IntFormat` (step 1, rounded to nearest or
    stochastically), `E4M3` / `E5M2` (fp8), `Float` (nothing); FORMATS names them for the flags.
 3. A Linear runs three matmuls: Y = X W^T, dX = G W, dW = G^T X (G = dL/dY). A recipe holds a
    format for each of W, X and G: `PaperRecipe` (the paper's simulation; its backward is the
    straight-through estimator) or `Int8Recipe` (int formats, every scale off the summed axis:
    int8 kernels compute it exactly). `quantize_model` swaps in `QLinear`s that follow it.
 4. `QAdamW` is AdamW with its two moments stored as 8- or 4-bit codes.
 5. `train` is nanoGPT's loop; the plumbing (flags, checks, resuming, processes) comes after it.
Course seams: the functions under a `# SEAM: <name>` comment (`python -m tools.course`).
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import textwrap
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from prepare_data import OneLineParser, UserError, check_prompt, load_codec, load_data, read_meta


def opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


SCALES = ["tensor", "row", "column", "group", "channel", "token"]  # channel, token: rows
STATE_SCALES = ["tensor", "row", "block"]


@dataclass
class Config:
    # what to do
    mode: str = opt("train", "train | sample (out_dir/ckpt.pt) | memory (the memory table)",
                    ["train", "sample", "memory"])
    preset: str = opt("", "comma-separated presets, applied before explicit flags (list below)")
    # I/O
    out_dir: str = opt("out", "folder for ckpt.pt")
    data_dir: str = opt("data", "folder holding the datasets made by prepare_data.py")
    dataset: str = opt("shakespeare_char", "dataset folder name under data_dir")
    init_from: str = opt("scratch", "scratch | resume (out_dir/ckpt.pt)", ["scratch", "resume"])
    eval_interval: int = opt(250, "steps between evaluations and checkpoints")
    eval_iters: int = opt(20, "batches per split in one evaluation")
    log_interval: int = opt(50, "steps between log lines")
    # model (GPT-2 shapes)
    n_layer: int = opt(4, "transformer blocks")
    n_head: int = opt(4, "attention heads")
    n_embd: int = opt(128, "model width")
    block_size: int = opt(64, "context length in tokens")
    dropout: float = opt(0.0, "dropout probability")
    bias: bool = opt(True, "biases in Linears and LayerNorms (GPT-2: yes)")
    # training
    batch_size: int = opt(12, "sequences per micro-step")
    grad_accum: int = opt(1, "micro-steps per optimizer step")
    max_iters: int = opt(2000, "optimizer steps (0: evaluate and sample only)")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr: float = opt(1e-4, "floor of the cosine decay")
    warmup_iters: int = opt(100, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (2-D weights only)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    skip_nonfinite: bool = opt(False, "skip steps with a non-finite loss instead of stopping")
    allow_config_change: bool = opt(False, "resume with another quantization than the checkpoint's")
    # system
    device: str = opt("auto", "auto | cpu | cuda | mps")
    dtype: str = opt("auto", "matmul precision: auto (bf16 autocast on GPUs with bf16 tensor "
                     "cores, fp16 with loss scaling on older ones, fp32 on CPU and MPS) | "
                     "float32 | bfloat16 | float16 (with loss scaling)",
                     ["auto", "float32", "bfloat16", "float16"])
    compile: bool = opt(False, "torch.compile the model")
    seed: int = opt(1337, "seed for init, batches and dropout")
    # quantized Linears (PaperRecipe, Int8Recipe): a format per operand W, X (the activation,
    # the Linear's input) and G (its output gradient); int with bits >= 16: not quantized
    recipe: str = opt("paper", "paper (simulated) | int8 (int8 kernels)", ["paper", "int8"])
    wbits: int = opt(32, "weight bits of the int format (2-8, or 16/32 = off)")
    abits: int = opt(32, "activation bits of the int format")
    gbits: int = opt(32, "output-gradient bits of the int format")
    w_format: str = opt("int", "weight format: int (--wbits) | e4m3 | e5m2 (fp8; paper recipe) "
                        "| a name added to qgpt.FORMATS")
    a_format: str = opt("int", "activation format (as --w_format)")
    g_format: str = opt("int", "output-gradient format (as --w_format)")
    g_rounding: str = opt("nearest", "G's int rounding: nearest (ties to even) | stochastic "
                          "(unbiased; its generator seeded by --seed)", ["nearest", "stochastic"])
    w_granularity: str = opt("row", "paper recipe: weight scales (row: per output channel)", SCALES)
    a_granularity: str = opt("row", "paper recipe: activation scales (row: per token)", SCALES)
    g_granularity: str = opt("row", "paper recipe: gradient scales (row: per token)", SCALES)
    group_size: int = opt(64, "paper recipe: elements per group for granularity 'group'")
    a_asymmetric: bool = opt(False, "paper recipe: asymmetric (zero point) activations")
    g_matmuls: str = opt("wgrad", "paper recipe: backward matmuls that take the quantized G",
                         ["wgrad", "dgrad", "both"])
    token_group: int = opt(1024, "int8 recipe: tokens a dW scale covers (0: the micro-batch)")
    quantize_head: bool = opt(True, "quantize the LM head too (--preset int8 does not: README)")
    backend: str = opt("auto", "sim (PyTorch) | triton (int8 recipe: kernels.py) | scaled_mm "
                       "(paper recipe, fp8 W and X: torch._scaled_mm) | auto (the fast one the "
                       "device has)", ["auto", "sim", "triton", "scaled_mm"])
    fuse_quantizers: bool = opt(False, "int8 recipe, --compile: inductor fuses the quantizers")
    diag_interval: int = opt(0, "print a quantization diagnostics table every N steps (0 = off)")
    # optimizer states (QAdamW)
    m_bits: int = opt(32, "Adam first-moment bits: 32, 16, 8, 4")
    v_bits: int = opt(32, "Adam second-moment bits: 32, 16, 8, 4")
    m_granularity: str = opt("block", "first-moment scales", STATE_SCALES)
    v_granularity: str = opt("block", "second-moment scales", STATE_SCALES)
    state_block_size: int = opt(128, "elements per scale for granularity 'block'")
    v_map: str = opt("sqrt", "second-moment code map: linear (the paper's) | zerofree | sqrt",
                     ["linear", "zerofree", "sqrt"])
    # sampling
    prompt: str = opt("\n", "start text for sampling (default: %(default)r)")
    num_samples: int = opt(1, "samples to draw")
    max_new_tokens: int = opt(200, "tokens per sample")
    temperature: float = opt(0.8, "sampling temperature")
    top_k: int = opt(50, "sample among the k most likely tokens (0 = all)")


# ----------------------------------------------------------------------------------------------
# Quantization primitives: linear, absmax-scaled, dynamic (the paper's Section 3). Pure functions.

ACT_FLOOR = 1e-5  # floor of max|x| for weights and activations
GRAD_FLOOR = 1e-9  # gradients are tiny: a 1e-5 floor on their absmax would zero whole rows


# SEAM: quantizer
def quantize(x, bits, granularity="tensor", symmetric=True, group_size=None,
             absmax_floor=ACT_FLOOR, rounding=torch.round):
    """Linear quantization of `x` to `bits`-bit signed integer codes (2 <= bits <= 8).

    Granularity: which elements share one scale. "tensor": all; "row" (aliases "channel" for a
    weight (out, in), "token" for an activation (tokens, features)): each row of a 2-D x;
    "column": each column; "group": each run of `group_size` consecutive elements of a row
    (group_size must divide the row length).
    Returns (codes, scale, zero_point):
      codes       int8, same shape as x, in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]
      scale       fp32, shaped to broadcast against x: () tensor, (R, 1) row, (1, C) column,
                  or (R, C // group_size, 1) group (against x viewed as (R, C // g, g))
      zero_point  None when symmetric; else fp32 integer values shaped like scale
    Symmetric: scale = max(absmax, absmax_floor) / qmax, codes = clamp(round(x / scale), qmin,
    qmax). Asymmetric: scale = max(max - min, absmax_floor) / (2^b - 1), zero_point = qmin -
    round(min / scale), codes = clamp(round(x / scale) + zero_point, qmin, qmax); x is recovered as
    (codes - zero_point) * scale. The floor applies to the max (or the range), before the
    division: an all-zero group gets scale = absmax_floor / qmax and codes 0, never 0 / 0 = NaN.
    Arithmetic in fp32; round() is `rounding` (torch.round: to nearest, ties to even; the zero
    point always takes torch.round); the clamp happens in float, before the int8 cast. A NaN
    gives code 0; its group's scale is NaN (a group holding +-inf: scale inf), so the NaN reaches
    whoever uses the scale.
    """
    granularity = {"channel": "row", "token": "row"}.get(granularity, granularity)
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 for int8 codes, got {bits}")
    xf = x.float()
    if granularity == "tensor":
        view, dims = xf, None
    elif granularity in ("row", "column", "group"):
        if x.dim() != 2:
            raise ValueError(f"granularity '{granularity}' needs a 2-D x, got {tuple(x.shape)}")
        view, dims = xf, (1 if granularity == "row" else 0)
        if granularity == "group":
            if not group_size or x.shape[1] % group_size:
                raise ValueError(f"group_size {group_size} must divide the row length {x.shape[1]}")
            view, dims = xf.view(x.shape[0], x.shape[1] // group_size, group_size), 2
    else:
        raise ValueError(f"unknown granularity '{granularity}'; use tensor, row, column or group")

    def reduce(fn, t):  # max or min over the elements that share one scale, kept broadcastable
        return fn(t) if dims is None else fn(t, dim=dims, keepdim=True)

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        absmax = reduce(torch.amax, view.abs()).clamp(min=absmax_floor)
        # fp32, one per group: () / (R, 1) / (1, C) / (R, C // g, 1). A tensor divisor, not a Python
        # number: CUDA divides by a number through its reciprocal (1 ulp off); tensors exactly.
        scale = absmax / torch.full_like(absmax, qmax)
        zero_point = None
        shifted = rounding(view / scale)
    else:
        low, high = reduce(torch.amin, view), reduce(torch.amax, view)
        scale = (high - low).clamp(min=absmax_floor) / torch.full_like(low, qmax - qmin)
        zero_point = qmin - torch.round(low / scale)
        shifted = rounding(view / scale) + zero_point
    # Clamp while still float: casting 128.0 to int8 would wrap around to -128. A NaN (in x, or in
    # a scale made NaN or inf by its group) gets code 0; the scale keeps the NaN or inf.
    codes = shifted.clamp(qmin, qmax).nan_to_num(0.0).to(torch.int8).view(x.shape)  # fp32 -> int8
    return codes, scale, zero_point


# SEAM: dequant
def dequantize(codes, scale, zero_point=None):
    """The inverse map of `quantize`: x_hat = (codes - zero_point) * scale, elementwise.

    codes: int8 codes of any shape; scale and zero_point (None: symmetric, no zero point) as
    `quantize` returns them: a () tensor, (R, 1) per row or (1, C) per column broadcast against the
    codes; a 3-D (R, C // g, 1) group scale (and zero point) applies to the codes viewed as
    (R, C // g, g), group j of row r covering columns j*g .. j*g + g - 1. The codes are converted
    to fp32 before anything else: codes - zero_point in int8 would wrap (-128 - 1 = 127).
    Returns fp32 with the codes' shape.
    """
    q = codes.float()
    if scale.dim() == 3:  # group scales (R, C // g, 1): view the codes as (R, C // g, g)
        q = q.view(scale.shape[0], scale.shape[1], -1)
    if zero_point is not None:
        q = q - zero_point
    return (q * scale).view(codes.shape)


# ----------------------------------------------------------------------------------------------
# Number formats: what one operand (W, X or G) of a matmul becomes. A recipe holds three; whether
# it quantizes at all is theirs to say (`quantized`), never the bit widths'. A new format is one
# small class: `quantize(x, generator)` returning dequantize's inputs, and a name in FORMATS.

def round_stochastic(y, generator):
    """Round fp32 y down or up at random, up with probability y - floor(y): the expected value is
    y itself (to fp32's precision of y - floor(y)), so errors average out over steps instead of
    piling up. Random bits from `generator` only: the run's other random streams stay as they
    are."""
    if generator is None:
        raise ValueError("stochastic rounding draws from a generator of its own: pass one")
    down = torch.floor(y)
    return down + (torch.rand(y.shape, generator=generator, device=y.device) < y - down).float()


class Format:
    """The base of a quantized format: subclasses define quantize(x, generator) -> (codes,
    scale, zero_point or None), which `dequantize` maps back."""
    quantized = True

    def fake_quantize(self, x, generator=None):
        """dequantize(quantize(x)) in x's dtype: what a simulated matmul sees. Detached: the
        backward of the Function that uses it decides the gradient (straight through)."""
        return dequantize(*self.quantize(x.detach(), generator)).to(x.dtype)


@dataclass(frozen=True)
class Float(Format):
    """No quantization: the operand enters its matmul as it is (in the matmul's dtype)."""
    quantized = False

    def fake_quantize(self, x, generator=None):
        return x

    def __str__(self):
        return "float"


@dataclass(frozen=True)
class IntFormat(Format):
    """The paper's: `bits`-bit integer codes from `quantize`, one absmax scale per granularity,
    rounded to nearest or stochastically (round_stochastic, from the recipe's generator)."""
    bits: int
    granularity: str = "row"
    group_size: int = 64
    symmetric: bool = True
    floor: float = ACT_FLOOR  # of max|x| (gradients: GRAD_FLOOR)
    rounding: str = "nearest"  # or "stochastic"

    def quantize(self, x, generator=None):
        def stochastic(y):
            return round_stochastic(y, generator)
        rounding = {"nearest": torch.round, "stochastic": stochastic}[self.rounding]
        return quantize(x, self.bits, self.granularity, self.symmetric, self.group_size,
                        self.floor, rounding)

    def largest_code(self):
        return 2 ** (self.bits - 1) - 1

    def __str__(self):
        return (f"int{self.bits} {self.granularity}" + " asymmetric" * (not self.symmetric) +
                " SR" * (self.rounding != "nearest"))


@dataclass(frozen=True)
class Float8(Format):
    """fp8 values in torch's float8 dtype, simulated: one fp32 scale per tensor, row, or 1 x
    group_size block of a row (DeepSeek-V3's fine-grained scaling: 1 x 128) maps the absmax to
    the largest fp8 value; the cast rounds to nearest (ties to even). Subclasses set the dtype."""
    dtype = None
    granularity: str = "tensor"
    group_size: int = 128
    floor: float = ACT_FLOOR

    def quantize(self, x, generator=None):
        """(codes: fp8, x's shape; scale: fp32 (1 or R, 1 or groups, 1) against x viewed as (1 or
        R, groups, elements), as dequantize takes group scales; None)"""
        if self.granularity not in ("tensor", "row", "channel", "token", "group"):
            raise ValueError(f"fp8 scales per tensor, row or group, not '{self.granularity}'")
        rows = 1 if self.granularity == "tensor" else x.shape[0]
        size = self.group_size if self.granularity == "group" else x.numel() // rows
        view = x.float().reshape(rows, -1, size)  # (1 | R, groups, elements) fp32
        top = torch.finfo(self.dtype).max
        absmax = view.abs().amax(-1, keepdim=True).clamp(min=self.floor)
        scale = absmax / torch.full_like(absmax, top)  # (1 | R, groups, 1) fp32
        codes = (view / scale).clamp(-top, top).to(self.dtype)  # clamp in float: no overflow
        return codes.view(x.shape), scale, None

    def largest_code(self):
        return torch.finfo(self.dtype).max

    def __str__(self):
        return f"{type(self).__name__.lower()} {self.granularity}"


class E4M3(Float8):
    dtype = torch.float8_e4m3fn  # 4 exponent bits, 3 mantissa bits: largest 448, no inf


class E5M2(Float8):
    dtype = torch.float8_e5m2  # 5 exponent bits, 2 mantissa bits: largest 57344


FORMATS = {"int": IntFormat, "e4m3": E4M3, "e5m2": E5M2}  # --w_format, --a_format, --g_format


# ----------------------------------------------------------------------------------------------
# The quantized Linear: Y = X W^T + b runs three matmuls, each operand quantized by a recipe.
# X is (M, K) tokens x in-features, W (N, K), G = dL/dY (M, N):
#   forward Y = X W^T sums over K;  dX = G W sums over N;  dW = G^T X sums over the M tokens.

def compute_dtype(x):
    """The dtype the matmuls run in: autocast's on x's device (bf16 on a GPU), else x's."""
    on = torch.is_autocast_enabled(x.device.type)
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


@dataclass(frozen=True)
class PaperRecipe:
    """The paper's simulation (its Section 3): fake quantization, float matmuls.
      forward  Y  = fq(X) fq(W)^T   (the formats x and w: by default per token, per output channel)
      backward dW = fq(G)^T X  and  dX = G W  (--g_matmuls moves or adds fq(G))
    The backward is the straight-through estimator: rounding has zero derivative almost everywhere,
    so the backward takes the quantizers for the identity and multiplies by the saved *unquantized*
    X and W, as the authors' code does (an absmax scale never clips, so no element falls outside
    the range and loses its gradient). It saves no memory and no time: it measures the loss.
    With backend kernels.Fp8Backend (fp8 W and X, scales per tensor or row) the forward sums the
    fp8 codes on torch._scaled_mm (fp8 tensor cores on sm89+), then scales: the same values.
    """
    uses_kernels = False  # no int8 kernels
    backend_op = "fp8_matmul"  # what a backend must have
    w: Format  # the formats of W, X and G
    x: Format
    g: Format
    g_matmuls: str = "wgrad"
    generator: object = field(default=None, compare=False)  # stochastic rounding's random bits
    backend: type = None  # None: simulated; kernels.Fp8Backend

    def grad_quantized(self, matmul):
        """Whether the backward matmul `matmul` ('wgrad' or 'dgrad') takes fq(G)."""
        return self.g.quantized and self.g_matmuls in (matmul, "both")

    def weight_codes(self, weight):
        return None  # W is quantized in each forward: no codes to keep between steps

    def linear(self, x, weight, bias, weight_codes=None):
        return PaperLinear.apply(x, weight, bias, self)


class PaperLinear(torch.autograd.Function):
    """Y = fq(X) fq(W)^T + b, the matmul in float; the backward is PaperRecipe's (see there)."""

    @staticmethod
    def forward(ctx, x, weight, bias, r):
        dtype = compute_dtype(x)
        ctx.recipe, ctx.has_bias, ctx.dtype = r, bias is not None, dtype
        ctx.save_for_backward(x, weight)  # the unquantized ones: the backward goes straight through
        bias = None if bias is None else bias.to(dtype)
        if r.backend is not None:  # fp8 codes (M, K), (N, K), scales (M or 1, 1), (N or 1, 1)
            x_codes, x_scale, _ = r.x.quantize(x.detach())
            w_codes, w_scale, _ = r.w.quantize(weight.detach())
            return r.backend.fp8_matmul(x_codes, x_scale.reshape(-1, 1), w_codes,
                                        w_scale.reshape(-1, 1), bias, dtype)
        x_hat = r.x.fake_quantize(x, r.generator)
        w_hat = r.w.fake_quantize(weight, r.generator)
        return F.linear(x_hat.to(dtype), w_hat.to(dtype), bias)

    @staticmethod
    # SEAM: straight_through
    def backward(ctx, grad_out):
        """The straight-through estimator of PaperRecipe: gradients as if nothing were quantized,
        except for fq(G) in the matmuls that PaperRecipe.grad_quantized names.

        Saved: X (M, K) and W (N, K), unquantized, in their own dtypes; ctx.recipe (r), ctx.dtype
        (the forward's matmul dtype), ctx.has_bias. grad_out: G (M, N).
          G_hat = r.g.fake_quantize(G, r.generator): G's format (symmetric, gradient floor
                  1e-9 as make_recipe builds it; stochastic rounding draws from r.generator)
          dX = (G_hat if r.grad_quantized("dgrad") else G) @ W         (M, N) @ (N, K)
          dW = (G_hat if r.grad_quantized("wgrad") else G)^T @ X       (N, M) @ (M, K)
          db = sum over the M tokens of the unquantized G, accumulated in W's dtype (fp32 master
               weights: fp32), or None without a bias
        Both matmuls run in ctx.dtype; returns (dX in X's dtype, dW in W's dtype, db, None).
        """
        r, dtype = ctx.recipe, ctx.dtype
        x, weight = ctx.saved_tensors
        g = grad_out
        g_hat = r.g.fake_quantize(g, r.generator)
        g_dx = g_hat if r.grad_quantized("dgrad") else g
        g_dw = g_hat if r.grad_quantized("wgrad") else g
        grad_x = g_dx.to(dtype) @ weight.to(dtype)  # (M, N) @ (N, K)
        grad_w = g_dw.t().to(dtype) @ x.to(dtype)  # (N, M) @ (M, K)
        grad_b = g.sum(0, dtype=weight.dtype) if ctx.has_bias else None  # (N,) full precision
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b, None


@dataclass(frozen=True)
class Int8Recipe:
    """W, X and G in int8 in all three matmuls, every scale along a dimension its matmul does NOT
    sum over, so the scales factor out of the integer sum and int8 kernels compute it exactly:
      forward  Y  = X W^T : X per row (token m),       W per row (output channel n); sums over K
      backward dX = G W   : G per row (token m),       W per column (input feature k); sums over N
               dW = G^T X : G per column (channel n),  X per column (feature k);       sums over M
    dW sums over the tokens, so its scales may change from one group of `token_group` consecutive
    tokens to the next: each group's int32 sum is promoted to fp32 with its own scales. X and G are
    quantized along both axes by one read; X's column codes are saved for dW instead of X (1 byte
    per element, not 2 or 4); W's codes come from QLinear, once per optimizer step (under
    torch.compile once per micro-step: a graph keeps no Python state). The backend
    runs the two operations, `quantize_dual` and `int8_matmul`: kernels.ReferenceBackend in PyTorch
    (the simulation), or kernels.TritonBackend on int8 tensor cores, to the same bits.
    """
    uses_kernels = True
    backend_op = "int8_matmul"
    w: IntFormat  # symmetric, nearest: their bits and floors (their scales: as said above)
    x: IntFormat
    g: IntFormat
    token_group: int = 1024
    fuse_quantizers: bool = False
    backend: type = kernels.ReferenceBackend

    def quantizers(self):
        """Who quantizes: the backend; under torch.compile with fuse_quantizers the PyTorch
        reference, which inductor fuses into the ops around it (the matmuls stay the backend's)."""
        fused = self.fuse_quantizers and torch.compiler.is_compiling()
        return kernels.ReferenceBackend if fused else self.backend

    def weight_codes(self, weight):
        """W's codes: rows (per output channel: forward) and columns (per input feature: dX)."""
        return self.quantizers().quantize_dual(weight, self.w.bits, self.w.floor)

    def matmul(self, a, b, bias, out_dtype, k_group=0):
        """a @ b^T (+ bias), written in out_dtype, for a = (codes (M, K), scales) and b = (codes
        (N, K), scales), scales per row (and per K-group of k_group)."""
        return self.backend.int8_matmul(a[0], a[1], b[0].t(), b[1], bias, out_dtype, k_group)

    def linear(self, x, weight, bias, weight_codes=None):
        needs_dw = torch.is_grad_enabled() and weight.requires_grad  # else no X^T codes to make
        return Int8Linear.apply(x, weight, bias, self, weight_codes, needs_dw)


class Int8Linear(torch.autograd.Function):
    """Y = X W^T + b on int8 codes: Int8Recipe's three matmuls (see there)."""

    @staticmethod
    def forward(ctx, x, weight, bias, r, w_codes, needs_dw):
        # X (M, K) -> row codes (M, K), scales (M, 1); column codes of X^T (K, M), scales (J, K)
        x_rows, x_cols = r.quantizers().quantize_dual(x, r.x.bits, r.x.floor, r.token_group,
                                                      columns=needs_dw)
        w_rows, w_cols = w_codes
        ctx.recipe, ctx.has_bias, ctx.dtypes = r, bias is not None, (x.dtype, weight.dtype)
        ctx.save_for_backward(*(x_cols or (None, None)), *w_cols)  # int8 codes: no float X
        return r.matmul(x_rows, w_rows, bias, compute_dtype(x))

    @staticmethod
    # SEAM: linear_backward
    def backward(ctx, g):
        """dX and dW of Int8Recipe from int8 codes whose scales lie off each matmul's summed axis.

        Saved: X^T's codes (K, M), scales (J, K) per input feature k and token group (None if W
        needs no gradient: then dW is None and G^T is not quantized); W^T's codes (K, N), scales
        (1, K) per input feature. ctx.recipe (r), ctx.has_bias, ctx.dtypes = (X's, W's dtype).
          G = g (M, N); its codes in one call, r.quantizers().quantize_dual(G, r.g.bits, r.g.floor
            (1e-9, never the activation floor), r.token_group, columns=dW needed): rows (M, N),
            scales (M, 1) per token; G^T's codes (N, M), scales (J, N) per channel and token group.
          dX = r.matmul(G's rows, W^T's codes, None, X's dtype): sums over N    (M, K)
          dW = r.matmul(G^T's codes, X^T's codes, None, W's dtype, r.token_group): sums over the
               M tokens, group by group                                         (N, K)
          db = G.sum(0, dtype=torch.float32): the unquantized G summed over the tokens, in fp32,
               cast to W's dtype; None without a bias.
        Returns (dX, dW, db, None, None, None).
        """
        r = ctx.recipe
        x_dtype, w_dtype = ctx.dtypes
        xt_codes, xt_scale, wt_codes, wt_scale = ctx.saved_tensors
        g_rows, g_cols = r.quantizers().quantize_dual(g, r.g.bits, r.g.floor, r.token_group,
                                                      columns=xt_codes is not None)
        grad_b = g.sum(0, dtype=torch.float32).to(w_dtype) if ctx.has_bias else None
        grad_x = r.matmul(g_rows, (wt_codes, wt_scale), None, x_dtype)  # G per token, W per k
        grad_w = None if g_cols is None else r.matmul(g_cols, (xt_codes, xt_scale), None, w_dtype,
                                                      r.token_group)
        return grad_x, grad_w, grad_b, None, None, None


RECIPES = {"paper": PaperRecipe, "int8": Int8Recipe}


class QLinear(nn.Linear):
    """nn.Linear whose matmuls follow a recipe; it shares the Linear's parameters it replaces."""
    cache_weight_codes = True

    def __init__(self, in_features, out_features, bias, recipe):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.recipe = recipe
        self.weight_cache = None  # ((version, address, device), W's codes)

    def weight_codes(self):
        """recipe.weight_codes(W), kept until the weight's version counter (bumped by every in-place
        op: the optimizer, load_state_dict) or its storage changes: one quantization per optimizer
        step, not per micro-step. Edits through `.data` bypass the counter."""
        w = self.weight.detach()
        if torch.compiler.is_compiling() or not self.cache_weight_codes:  # no Python-side state
            return self.recipe.weight_codes(w)
        key = (self.weight._version, w.data_ptr(), w.device)
        if self.weight_cache is None or self.weight_cache[0] != key:
            self.weight_cache = (key, self.recipe.weight_codes(w))
        return self.weight_cache[1]

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])  # (B, T, C) -> (B*T, C)
        y = self.recipe.linear(x2, self.weight, self.bias, self.weight_codes())
        return y.view(*x.shape[:-1], -1)


def quantize_model(model, cfg, backend=kernels.ReferenceBackend, device="cpu"):
    """Swap every nn.Linear (the LM head too, unless cfg.quantize_head is False) for a QLinear
    with cfg's recipe. The QLinear takes over the same Parameter objects, so the tied wte/lm_head
    weight stays tied and the optimizer and checkpoints see the same parameters. Returns the
    names swapped."""
    recipe = make_recipe(cfg, backend, device)
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or (child_name == "lm_head" and not cfg.quantize_head):
                continue
            name = f"{parent_name}.{child_name}".lstrip(".")
            check_group_size(recipe, name, child)
            q = QLinear(child.in_features, child.out_features, child.bias is not None, recipe)
            q.weight, q.bias = child.weight, child.bias
            setattr(parent, child_name, q)
            swapped.append(name)
    return swapped


# ----------------------------------------------------------------------------------------------
# The GPT-2 model (nanoGPT's layout and names).

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # (B, nh, T, hs)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # float
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.block_size = cfg.block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias)))
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input embedding and LM head
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # B, T, C
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, generator=None):
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.block_size:])
            logits = logits[:, -1, :].float() / max(temperature, 1e-6)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits[logits < kth] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx


# ----------------------------------------------------------------------------------------------
# QAdamW: AdamW whose moments are stored as real 8- or 4-bit codes (the paper quantizes them too).

# SEAM: pack4
def pack_4bit(codes):
    """uint8 codes in [0, 15], flat (n,) -> uint8 bytes (ceil(n / 2),), two codes a byte: byte j
    holds code 2j in its low nibble (bits 0-3) and code 2j + 1 in its high nibble (bits 4-7);
    an odd n is padded with one code 0 (the last byte's high nibble)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


# SEAM: pack4
def unpack_4bit(packed, numel):
    """Inverse of pack_4bit: uint8 bytes (ceil(n / 2),) -> uint8 codes (numel,): byte j gives
    code 2j (its low nibble) then code 2j + 1 (its high nibble); codes past numel are dropped."""
    return torch.stack([packed & 15, packed >> 4], dim=1).view(-1)[:numel]


def round_stochastic_bf16(x, generator):
    """fp32 -> bf16 rounded up with probability equal to the dropped fraction (stochastic rounding):
    round-to-nearest absorbs any change below half of bf16's step, so a v decaying by beta2 = 0.999
    would never decay; this is unbiased. Add 16 random bits below the 16 bf16 keeps, truncate."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    bits = (x.float().contiguous().view(torch.int32) + noise) & -(1 << 16)
    return bits.view(torch.float32).to(torch.bfloat16)


def sqrt_rn(x):
    """fp32 square root, correctly rounded everywhere (PyTorch's CPU kernel can be 1 ulp off; the
    fused AdamW of kernels.py is exact, and 8/4-bit states must not depend on where they ran):
    float64's root rounded to fp32, or, on a device without float64, the same bits from integer
    arithmetic (kernels.sqrt_rn_integer)."""
    x = x.float()
    return x.double().sqrt().float() if has_float64(x.device) else kernels.sqrt_rn_integer(x)


def has_float64(device):
    """Apple's GPUs (MPS) have no float64."""
    return device.type != "mps"


def _state_rows(x, granularity, block_size):
    """View a state tensor as 2-D rows that share one scale each (padding the last block)."""
    flat = x.reshape(-1)
    if granularity == "tensor":
        return flat.view(1, -1)
    if granularity == "row":
        return flat.view(x.shape[0], -1)
    pad = (-flat.numel()) % block_size
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, block_size)


# SEAM: adam_state
def encode_state(x, bits, signed, granularity="block", block_size=128, v_map="linear"):
    """fp32 moment -> {"codes": uint8, "scale": fp32 (rows, 1)} at 8 or 4 bits (4: two a byte).

    Layout: x is flattened and cut into rows that share one scale: granularity "tensor" gives one
    row, "row" one per row of a 2-D x, "block" rows of block_size elements (the last one padded
    with zeros). codes holds rows * row_length codes in that order (4 bits: element 2j in the low
    nibble of byte j); scale holds one fp32 per row, shape (rows, 1).
    Signed (first moment m): symmetric absmax codes from `quantize` (absmax floored at 1e-30),
    stored with an offset of 2^(b-1) as unsigned bytes (or nibbles); scale = step between levels.
    Unsigned (second moment v >= 0): all 2^b levels cover [0, max], none wasted on negatives:
      'linear':   level c means c * scale, scale = max / (2^b - 1); 0 is a level (the paper's map:
                  small v round to 0 and m / (sqrt(0) + eps) explodes);
      'zerofree': level c means (c + 1) * scale, scale = max / 2^b; the smallest level is one step;
      'sqrt':     as 'zerofree' on u = sqrt_rn(v), correctly rounded (scale is the step in the
                  sqrt domain; decoding squares), which also halves the dynamic range.
    The max (of v, or of sqrt(v)) is floored at 1e-30 before the division. Every code rounds
    x / scale to the nearest integer with ties to even (torch.round, as `quantize`: 2.5 -> 2,
    3.5 -> 4, -0.5 -> 0), in fp32, then clamps to [0, 2^b - 1] (after the offset) before the cast.
    """
    rows = _state_rows(x.float(), granularity, block_size)
    if signed:
        codes, scale, _ = quantize(rows, bits, "row", absmax_floor=1e-30)
        codes = (codes.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)  # into [0, 2^b)
    else:
        u = sqrt_rn(rows) if v_map == "sqrt" else rows
        offset = 0 if v_map == "linear" else 1  # zero-free maps: code c means (c + 1) * scale
        levels = 2 ** bits - 1
        absmax = u.amax(dim=1, keepdim=True).clamp(min=1e-30)
        scale = absmax / torch.full_like(absmax, levels + offset)  # a tensor divisor: exact on CUDA
        codes = (torch.round(u / scale) - offset).clamp(0, levels).to(torch.uint8)
    codes = codes.view(-1)  # (rows * cols,) uint8
    return {"codes": pack_4bit(codes) if bits == 4 else codes, "scale": scale}


# SEAM: adam_state
def decode_state(state, shape, bits, signed, v_map="linear"):
    """Inverse of encode_state: {"codes", "scale"} -> fp32 tensor of `shape`.

    The layout is recovered from the state itself: the number of rows is scale.shape[0], the row
    length is (number of codes) // rows (4 bits: unpack first, 2 codes a byte); the padding past
    prod(shape) elements is dropped. Signed: (code - 2^(b-1)) * scale. Unsigned: code * scale
    ('linear'), (code + 1) * scale ('zerofree'), ((code + 1) * scale)^2 ('sqrt').
    """
    scale = state["scale"]
    codes = unpack_4bit(state["codes"], 2 * state["codes"].numel()) if bits == 4 else state["codes"]
    rows = scale.shape[0]
    q = codes[:codes.numel() // rows * rows].view(rows, -1).float()  # drop an odd last nibble
    if signed:
        x = (q - 2 ** (bits - 1)) * scale
    else:
        x = (q + (0 if v_map == "linear" else 1)) * scale
        x = x * x if v_map == "sqrt" else x
    return x.view(-1)[:math.prod(shape)].view(shape)


class QAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with moments stored in m_bits / v_bits.

    Each step decodes m and v to fp32, does torch.optim.AdamW's arithmetic in its order (at 32 bits:
    torch's bits), and encodes them again. state[p] = {"step", "m", "v"}, a moment {"value"} at 32
    or 16 bits (bf16, rounded stochastically), or encode_state's {"codes", "scale"}. Only 2-D
    tensors of min_size elements or more are quantized (biases, LayerNorms: fp32, a few KB).
    fused (None: on CUDA) sends block-wise 8/4-bit states through kernels.py's one-pass kernel,
    whose reference this step is. load_state_dict trusts the format (check_resume checks it).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, m_bits=32,
                 v_bits=32, m_granularity="block", v_granularity="block", block_size=128,
                 v_map="sqrt", min_size=4096, fused=None):
        for bits in (m_bits, v_bits):
            if bits not in (4, 8, 16, 32):
                raise ValueError(f"state bits must be 4, 8, 16 or 32, got {bits}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, m_bits=m_bits,
                        v_bits=v_bits, m_granularity=m_granularity, v_granularity=v_granularity,
                        block_size=block_size, v_map=v_map, min_size=min_size)
        super().__init__(params, defaults)
        self.fused = fused
        self.generators = {}  # bf16 states: the stochastic rounding's random streams, per device
        for group in self.param_groups:  # states exist from the start, so memory can be measured
            for p in group["params"]:
                m_bits, v_bits = self.state_bits(p, group)
                zeros = torch.zeros_like(p, dtype=torch.float32)
                self.state[p] = {"step": torch.tensor(0.0),
                                 "m": self._encode(zeros, m_bits, True, group),
                                 "v": self._encode(zeros.clone(), v_bits, False, group)}

    def state_bits(self, p, group):
        """(m bits, v bits) of p's moments: 32 for 1-D and small tensors."""
        quantized = p.dim() == 2 and p.numel() >= group["min_size"]
        return (group["m_bits"], group["v_bits"]) if quantized else (32, 32)

    def _fused(self, p, group):
        """Whether kernels.py's one-pass kernel updates p: block-wise 8/4-bit states on a CUDA
        GPU Triton compiles for (sm80+)."""
        size = group["block_size"]
        on_gpu = p.is_cuda and torch.cuda.get_device_capability(p.device) >= (8, 0)  # Triton's
        return (bool(on_gpu if self.fused is None else self.fused) and kernels.triton is not None
                and set(self.state_bits(p, group)) <= {4, 8} and p.is_contiguous()
                and group["m_granularity"] == group["v_granularity"] == "block"
                and size >= 2 and not size & (size - 1))

    def _generator(self, device):
        if str(device) not in self.generators:
            self.generators[str(device)] = torch.Generator(device).manual_seed(0)
        return self.generators[str(device)]

    def _encode(self, x, bits, signed, group):
        if bits == 32:  # the decoded tensor itself, updated in place
            return {"value": x}
        if bits == 16:  # bf16, rounded stochastically
            return {"value": round_stochastic_bf16(x, self._generator(x.device))}
        granularity = group["m_granularity"] if signed else group["v_granularity"]
        if granularity == "row" and x.dim() != 2:
            granularity = "tensor"
        return encode_state(x, bits, signed, granularity, group["block_size"], group["v_map"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in [p for p in group["params"] if p.grad is not None]:
                state, (m_bits, v_bits) = self.state[p], self.state_bits(p, group)
                grad = p.grad.float()
                state["step"] += 1
                step = state["step"].item()
                if self._fused(p, group):  # decode, update and encode in one pass over memory
                    kernels.adamw_lowbit_step(p, grad.contiguous(), state["m"], state["v"], m_bits,
                                              v_bits, group["v_map"], group["block_size"], step, lr,
                                              beta1, beta2, eps, wd)
                    continue
                m, v = [state[k]["value"].float() if bits >= 16 else
                        decode_state(state[k], p.shape, bits, k == "m", group["v_map"])
                        for k, bits in (("m", m_bits), ("v", v_bits))]
                # the arithmetic of torch.optim.AdamW (single-tensor path), operation by operation
                p.mul_(1 - lr * wd)
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1 ** step)
                root = v.sqrt() if min(m_bits, v_bits) >= 16 else sqrt_rn(v)  # fp32/bf16: torch's
                denom = (root / math.sqrt(1 - beta2 ** step)).add_(eps)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-step_size)
                state["m"] = self._encode(m, m_bits, True, group)
                state["v"] = self._encode(v, v_bits, False, group)
        return loss

    def state_dict(self):
        rounding = {d: g.get_state() for d, g in self.generators.items()}
        return {**super().state_dict(), "rounding": rounding}

    def load_state_dict(self, state_dict):
        """Our own loader: torch's would cast every state tensor (the uint8 codes too) to the
        parameter's dtype."""
        sizes = [len(group["params"]) for group in self.param_groups]
        if [len(group["params"]) for group in state_dict["param_groups"]] != sizes:
            raise UserError(f"the optimizer state does not fit this model's {sum(sizes)} "
                            f"parameter tensors")
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
            for p, i in zip(group["params"], saved_group["params"]):
                saved = state_dict["state"][i]
                self.state[p] = {"step": saved["step"].cpu(), **{
                    k: {name: t.to(p.device) for name, t in saved[k].items()} for k in ("m", "v")}}
        for device, rng_state in state_dict.get("rounding", {}).items():  # the same random stream
            self._generator(device).set_state(rng_state)


def make_optimizer(model, cfg):
    """Weight decay on 2-D weights only (not on biases and LayerNorm), as GPT-2 / the paper. With
    32-bit moments, torch.optim.AdamW itself (fused on a GPU): QAdamW at 32 bits gives its bits."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.m_bits == cfg.v_bits == 32:
        fused = True if all(p.is_cuda for p in params) else None
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    return QAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), m_bits=cfg.m_bits,
                  v_bits=cfg.v_bits, m_granularity=cfg.m_granularity,
                  v_granularity=cfg.v_granularity, block_size=cfg.state_block_size,
                  v_map=cfg.v_map)


# ----------------------------------------------------------------------------------------------
# Training, evaluation, checkpoints, sampling (data: uint16 token files from prepare_data.py).

def get_batch(data, batch_size, block_size, generator, device):
    """(B, T) inputs and next-token targets from random offsets drawn with `generator`."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    return x.to(device), y.to(device)


def get_lr(it, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_iters."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.max_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def autocast_dtype(cfg, device):
    """The dtype the matmuls run in: --dtype, or auto's: bf16 on a CUDA GPU with bf16 tensor cores
    (sm80+), fp16 on an older one (a T4, a V100), fp32 on a CPU or a Mac (MPS)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def autocast_context(device, dtype=torch.float32):
    """Autocast to dtype on the device (fp32 master weights); fp32: plain, no autocast."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def make_scaler(device, dtype):
    """fp16's loss scaler (its 5 exponent bits underflow small gradients): the loss is multiplied
    by a scale before the backward, the gradients divided by it before the step; a step whose
    gradients overflow is skipped and the scale halved. Off (a no-op) for other dtypes."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


@torch.no_grad()
def evaluate(model, data, cfg, device):
    """Mean loss over cfg.eval_iters batches per split; its own generator leaves training's be."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(data[split], cfg.batch_size, cfg.block_size, gen, device)
            with autocast_context(device, autocast_dtype(cfg, device)):  # training's precision
                losses.append(model(x, y)[1].item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def train(cfg, stop_at=None):
    """Train cfg (validated); returns (model, {'losses': [per-step train loss], 'evals': [(step,
    train, val)], 'skipped': steps skipped, 'diverged_at': step or None, 'tokens_per_s': float}).
    stop_at: act as if interrupted at that step (evaluate, save, return), for tests. Under torchrun
    every process draws every micro-batch and computes those whose index falls to it, so N
    processes see exactly the global batch of one."""
    rank, world, device = setup_distributed(cfg)
    data, meta = load_data(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    model = build_model(cfg, meta["vocab_size"], device)
    optimizer = make_optimizer(model, cfg)
    dtype = autocast_dtype(cfg, device)
    scaler = make_scaler(device, dtype)
    print(f"matmuls in {str(dtype)[6:]}" + (" with loss scaling" if scaler.is_enabled() else ""))
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    start, best_val = 0, float("inf")
    if cfg.init_from == "resume":
        start, best_val = resume(ckpt_path, cfg, meta, model, optimizer, batch_gen, scaler)
    else:
        torch.manual_seed(cfg.seed)
    make_out_dir(cfg)
    print(memory_table(model, optimizer))
    metrics = open_metrics(cfg, start, model, device, dtype) if rank == 0 else None
    flops_per_step = flops_per_token(model, cfg) * cfg.batch_size * cfg.block_size * cfg.grad_accum
    run_model, step_model = wrap_model(model, cfg, world, device)  # compiled, and DDP
    rounding = rounding_generator(model)
    stop = {"signal": False}
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(signal=True))
    history = {"losses": [], "evals": [], "skipped": 0, "scaler_skips": 0, "diverged_at": None,
               "tokens_per_s": 0.0}
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    t0 = t_start = time.time()
    t0_step = start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for it in range(start, cfg.max_iters + 1):
            # all ranks stop together
            stop["signal"] = _all_reduce(stop["signal"] or it == stop_at, world) > 0
            if it % cfg.eval_interval == 0 or it == cfg.max_iters or stop["signal"]:
                losses = evaluate(run_model, data, cfg, device)
                history["evals"].append((it, losses["train"], losses["val"]))
                log_metrics(metrics, kind="eval", step=it, tokens=it * tokens_per_step,
                            train_loss=losses["train"], val_loss=losses["val"])
                best_val = min(best_val, losses["val"])
                print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if (it > start or stop["signal"]) and rank == 0:
                    save_checkpoint(ckpt_path, model, optimizer, cfg, it, best_val, batch_gen, meta,
                                    scaler)
                if stop["signal"]:
                    print(f"interrupted: saved step {it} to {ckpt_path}; continue with --init_from "
                          f"resume")
                    break
            if it == cfg.max_iters:
                break
            lr = get_lr(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            diag_step = cfg.diag_interval and it % cfg.diag_interval == 0
            loss_sum = 0.0
            with diagnose(model) if diag_step else nullcontext() as stats:
                for micro in range(cfg.grad_accum):
                    x, y = get_batch(data["train"], cfg.batch_size, cfg.block_size, batch_gen,
                                     device)
                    if micro % world != rank:
                        continue  # another process computes this micro-batch
                    if rounding is not None:  # stochastic rounding: this micro-step's own bits
                        rounding.manual_seed(hash((cfg.seed, it, micro)) % 2 ** 63)
                    last = micro + world >= cfg.grad_accum  # DDP syncs gradients on the last one
                    with nullcontext() if last or world == 1 else step_model.no_sync():
                        with autocast_context(device, dtype):
                            _, loss = step_model(x, y)
                        # DDP averages over processes; fp16: the scaled loss
                        scaler.scale(loss * world / cfg.grad_accum).backward()
                    loss_sum += loss.item() / cfg.grad_accum
            loss_sum = _all_reduce(loss_sum, world)
            clip = cfg.grad_clip or math.inf  # 0: no clipping
            scaler.unscale_(optimizer)  # fp16: the true gradients, before clipping them
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if not (math.isfinite(loss_sum) and torch.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                scaler.update()  # fp16: the overflow seen by unscale_ halves the scale (else no-op)
                # fp16 gradients that overflowed, the loss finite: loss scaling's ordinary skip,
                # unless the scale has fallen below 1 (then no scale helps: a divergence)
                if scaler.is_enabled() and math.isfinite(loss_sum) and scaler.get_scale() >= 1:
                    history["scaler_skips"] += 1
                    print(f"step {it}: fp16 gradients overflowed, step skipped, loss scale now "
                          f"{scaler.get_scale():g}")
                    continue
                if not cfg.skip_nonfinite:
                    history["diverged_at"] = it
                    hint = "; fp16's range? try --dtype bfloat16 or float32" * scaler.is_enabled()
                    print(f"step {it}: non-finite loss or gradient (recipe {cfg.recipe}: "
                          f"{formats_text(make_formats(cfg))}"
                          f"; m{cfg.m_bits} v{cfg.v_bits}); stopped, last good checkpoint kept"
                          f"{hint}")
                    break
                history["skipped"] += 1
                print(f"step {it}: non-finite loss or gradient, step skipped "
                      f"({history['skipped']} so far)")
                continue
            scaler.step(optimizer)  # optimizer.step(), the gradients unscaled already
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            history["losses"].append(loss_sum)
            if diag_step:
                print(diagnostics_table(stats))
            if (it + 1) % cfg.log_interval == 0:
                dt = (time.time() - t0) / (it + 1 - t0_step)  # skipped steps count (their time)
                t0, t0_step = time.time(), it + 1
                peak = peak_flops(device, dtype)
                mfu = flops_per_step / dt / (peak * world) if peak else None  # per GPU
                mem = peak_memory_mib(device)
                print(f"step {it + 1}: loss {loss_sum:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/step, "
                      f"{tokens_per_step / dt:.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu else "")
                      + (f", peak memory {mem:,.0f} MiB" if mem else "")
                      + (" (process)" if mem and device.type == "cpu" else ""))
                log_metrics(metrics, kind="train", step=it + 1, tokens=(it + 1) * tokens_per_step,
                            loss=loss_sum, lr=lr, ms_per_step=dt * 1000,
                            tokens_per_s=tokens_per_step / dt, mfu=mfu, peak_memory_mib=mem)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    elapsed = max(time.time() - t_start, 1e-9)
    history["tokens_per_s"] = max(1, len(history["losses"])) * tokens_per_step / elapsed
    return model, history


def sample(cfg, model=None, meta=None):
    """Decode cfg.num_samples continuations of cfg.prompt; from out_dir/ckpt.pt unless given one."""
    device = pick_device(cfg.device)
    if model is None:
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
        meta, trained = ckpt["meta"], checkpoint_config(ckpt)
        validate_config(dataclasses.replace(trained, compile=False, fuse_quantizers=False))
        model = build_model(trained, meta["vocab_size"], device)
        model.load_state_dict(ckpt["model"])
    check_prompt(cfg.prompt, meta)
    encode, decode = load_codec(meta)
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    start = torch.tensor([encode(cfg.prompt) or [0]], dtype=torch.long, device=device)
    texts = []
    for _ in range(cfg.num_samples):
        with autocast_context(device, autocast_dtype(cfg, device)):
            out = model.generate(start, cfg.max_new_tokens, cfg.temperature, cfg.top_k, gen)
        texts.append(decode(out[0].tolist()))
        print(texts[-1] + "\n" + "-" * 40)
    return texts


# ----------------------------------------------------------------------------------------------
# Diagnostics: each Linear's operands seen through hooks (the Linear holds none of it); memory.

@contextmanager
def operand_hooks(model, record, kind=nn.Linear):
    """While the block runs, call record(name, module, "X" or "G", tensor) with the input X and
    the output gradient G of every `kind` module, each as a 2-D (tokens, features) tensor."""
    def flat(t):
        return t.detach().reshape(-1, t.shape[-1])
    handles = [h for name, m in model.named_modules() if isinstance(m, kind) for h in (
        m.register_forward_pre_hook(lambda m, a, name=name: record(name, m, "X", flat(a[0]))),
        m.register_full_backward_hook(lambda m, _, g, name=name: record(name, m, "G", flat(g[0]))))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def quantization_stats(x, fmt):
    """What format `fmt` does to x: relative error, nonzeros made 0, and (formats with a
    largest_code) codes at the extreme level. Stochastic rounding draws from its own generator."""
    x = x.float()
    codes, scale, zero_point = fmt.quantize(x, torch.Generator(x.device).manual_seed(0))
    x_hat = dequantize(codes, scale, zero_point)
    nonzero = x != 0
    stats = {"rel_err": ((x - x_hat).norm() / x.norm().clamp(min=1e-30)).item(),
             "zeroed": ((x_hat == 0) & nonzero).sum().item() / max(nonzero.sum().item(), 1)}
    if hasattr(fmt, "largest_code"):
        stats["saturated"] = (codes.float().abs() >= fmt.largest_code()).float().mean().item()
    return stats


@contextmanager
def diagnose(model):
    """Measure, on the forward and backward run inside the block, what each QLinear's recipe does
    to its W, X and G. Yields {layer: {"W" | "X" | "G": quantization_stats}} (last micro-step's)."""
    stats = {}

    def record(name, module, operand, t):
        r, layer = module.recipe, stats.setdefault(name, {})
        pairs = [("W", module.weight.detach()), ("X", t)] if operand == "X" else [("G", t)]
        for what, tensor in pairs:
            fmt = {"W": r.w, "X": r.x, "G": r.g}[what]
            if fmt.quantized and not (what == "W" and "W" in layer):  # W: once, it holds still
                layer[what] = quantization_stats(tensor, fmt)

    with operand_hooks(model, record, QLinear):
        yield stats


def diagnostics_table(stats):
    """One line per quantized layer: relative error of W, X, G, X codes saturated, G zeroed."""
    columns = [("W", "rel_err"), ("X", "rel_err"), ("X", "saturated"), ("G", "rel_err"),
               ("G", "zeroed")]
    lines = [f"{'layer':28s} {'W err':>8s} {'X err':>8s} {'X sat':>8s} {'G err':>8s} {'G->0':>8s}"]
    for name, layer in stats.items():
        lines.append(f"{name:28s} " + " ".join(
            f"{layer[op][key]:8.4f}" if key in layer.get(op, {}) else f"{'-':>8s}"
            for op, key in columns))
    return "\n".join(lines)


def state_bytes(optimizer):
    """Bytes of each Adam moment: QAdamW's tensors as stored; torch.optim.AdamW's fp32 moments
    (4 bytes per parameter each; it makes them at its first step)."""
    if not isinstance(optimizer, QAdamW):
        n = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        return {"m": 4 * n, "v": 4 * n}
    return {k: sum(t.numel() * t.element_size() for state in optimizer.state.values()
                   for t in state[k].values()) for k in ("m", "v")}


def memory_table(model, optimizer):
    """Bytes per parameter of weights, gradients and each Adam state, measured on the tensors."""
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum((p.grad if p.grad is not None else p).numel() * p.element_size() for p in params)
    states = state_bytes(optimizer)
    lines = [f"memory for {n / 1e6:.2f}M parameters    MiB  bytes/param"]
    for name, b in [("weights", weights), ("gradients", grads), ("adam m", states["m"]),
                    ("adam v", states["v"]), ("total", weights + grads + sum(states.values()))]:
        lines.append(f"  {name:28s}{b / 2 ** 20:8.1f}  {b / n:6.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plumbing: presets, flags, validation, devices and backends, checkpoints and resuming, processes.

# Presets: model/training sizes and the paper's quantization configurations. Combine with commas.
PRESETS = {
    "cpu": {},  # the defaults: a 0.8M-parameter char model, about 2 minutes on 2 cores
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, grad_accum=32,
                 max_iters=300000, lr=6e-4, min_lr=6e-5, warmup_iters=1000, beta2=0.95,
                 dataset="shakespeare", eval_interval=1000, eval_iters=100, log_interval=10),
    "baseline": dict(wbits=32, abits=32, gbits=32),
    "w8": dict(wbits=8, w_granularity="row"), "w8t": dict(wbits=8, w_granularity="tensor"),
    "w4": dict(wbits=4, w_granularity="row"), "w4t": dict(wbits=4, w_granularity="tensor"),
    "a8": dict(abits=8, a_granularity="row"), "a8t": dict(abits=8, a_granularity="tensor"),
    "a4": dict(abits=4, a_granularity="row"), "a4t": dict(abits=4, a_granularity="tensor"),
    "a8col": dict(abits=8, a_granularity="column"),  # per feature over the batch (authors' code)
    "g8": dict(gbits=8, g_granularity="row"), "g8t": dict(gbits=8, g_granularity="tensor"),
    "g4": dict(gbits=4, g_granularity="row"),
    "sr": dict(g_rounding="stochastic"),  # with g8 or g4: G rounded stochastically
    # fp8: e4m3 W and X, e5m2 G; scales per tensor, per row or per 1 x 128 block of a row
    **{name: dict(w_format="e4m3", a_format="e4m3", g_format="e5m2", w_granularity=scale,
                  a_granularity=scale, g_granularity=scale, **extra) for name, scale, extra in [
        ("fp8", "tensor", {}), ("fp8row", "row", {}),
        ("fp8block", "group", {"group_size": 128, "quantize_head": False})]},  # vocab: not 128s
    "w8a8": dict(wbits=8, abits=8, w_granularity="row", a_granularity="row"),
    "w8a8g8": dict(wbits=8, abits=8, gbits=8, w_granularity="row", a_granularity="row",
                   g_granularity="row"),
    # the LM head stays bf16: over a 50k vocabulary an 8-bit row of its G keeps only the target
    "int8": dict(recipe="int8", wbits=8, abits=8, gbits=8, quantize_head=False),
    "m8": dict(m_bits=8, m_granularity="tensor"), "m8c": dict(m_bits=8, m_granularity="row"),
    "m4": dict(m_bits=4, m_granularity="tensor"), "m4c": dict(m_bits=4, m_granularity="row"),
    "v8": dict(v_bits=8, v_granularity="tensor", v_map="linear"),
    "v8sqrt": dict(v_bits=8, v_map="sqrt"),
    "adam8": dict(m_bits=8, v_bits=8), "adam4": dict(m_bits=4, v_bits=4),
}


def build_parser(show_defaults=True):
    """argparse from Config. With show_defaults=False, only flags given explicitly are returned."""
    rules = [f"{', '.join('--' + n for n in names)}: {what}" for names, _, what in RULES]
    rules += [rule for rule, _ in COMBINATIONS] + [GROUP_RULE]
    epilog = (textwrap.fill("presets (--preset a,b; each prints what it sets): " +
                            ", ".join(PRESETS), 96) +
              "\n\nrules (each checked before any work; a break is a one-line error):\n" +
              "\n".join(textwrap.fill(rule, 96, initial_indent="  - ", subsequent_indent="    ")
                        for rule in rules))
    parser = OneLineParser(
        description="qgpt: quantized GPT-2 pre-training. README.md explains the recipes.",
        epilog=epilog, formatter_class=HelpFormatter,
        argument_default=None if show_defaults else argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        kwargs = dict(help=f.metadata["help"])
        if show_defaults:
            kwargs["default"] = f.default
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = type(f.default)
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name, **kwargs)
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the epilog's lines kept."""


def parse_config(argv=None):
    """Defaults, then presets (each printed), then the flags given explicitly."""
    build_parser().parse_args(argv)  # -h, and errors for unknown flags or bad values
    given = vars(build_parser(show_defaults=False).parse_args(argv))
    cfg = Config()
    for name in [p for p in given.get("preset", "").split(",") if p]:
        if name not in PRESETS:
            raise UserError(f"unknown preset '{name}'; choose from: {', '.join(PRESETS)}")
        settings = ", ".join(f"{k}={v}" for k, v in PRESETS[name].items()) or "defaults"
        print(f"preset {name}: {settings}")
        cfg = dataclasses.replace(cfg, **PRESETS[name])
    return dataclasses.replace(cfg, **given)


# Every rule of the flags, in one place (-h prints them). RULES: one flag's value; COMBINATIONS:
# (the rule, a function giving the flags of a config that break it).
RULES = [  # (flags, the test each value must pass, what the error says it must be)
    (["n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_iters",
      "eval_interval", "log_interval", "state_block_size", "group_size", "num_samples"],
     lambda v: v > 0, "a positive integer"),
    (["max_iters", "warmup_iters", "diag_interval", "max_new_tokens", "top_k", "min_lr",
      "weight_decay", "grad_clip"], lambda v: v >= 0, ">= 0"),
    (["lr", "temperature"], lambda v: 0 < v < math.inf, "> 0"),
    (["beta1", "beta2", "dropout"], lambda v: 0 <= v < 1, "in [0, 1)"),
    (["wbits", "abits", "gbits"], lambda v: 2 <= v <= 8 or v in (16, 32),
     "in 2..8, or 16/32 for no quantization"),
    (["w_format", "a_format", "g_format"], lambda v: v in FORMATS,
     "a name in qgpt.FORMATS: " + ", ".join(FORMATS)),
    (["m_bits", "v_bits"], lambda v: v in (4, 8, 16, 32), "4, 8, 16 or 32"),
    (["token_group"], lambda v: v == 0 or (v & (v - 1) == 0 and
                                           kernels.MIN_K_GROUP <= v <= kernels.MAX_K),
     f"0 or a power of two in {kernels.MIN_K_GROUP}..{kernels.MAX_K}"),
]
ROWS = ("row", "channel", "token")


def operand_flags(cfg):
    """Per operand W, X, G: (its flags' letter, bits, format name, granularity, its Format)."""
    return [(letter, getattr(cfg, f"{letter}bits"), getattr(cfg, f"{letter}_format"),
             getattr(cfg, f"{letter}_granularity"), fmt)
            for letter, fmt in zip("wag", make_formats(cfg).values())]


def int8_misfits(cfg):
    """The flags that keep the int8 recipe from running (none for the paper recipe)."""
    if not RECIPES[cfg.recipe].uses_kernels:
        return []
    ops = operand_flags(cfg)
    return ([f"--{a}_format {f}" for a, _, f, _, _ in ops if FORMATS[f] is not IntFormat] +
            [f"--{a}_granularity {g}" for a, _, _, g, _ in ops if g not in ROWS] +
            [f"--{a}bits {b} (a float operand)" for a, b, f, _, fmt in ops
             if FORMATS[f] is IntFormat and not fmt.quantized] +
            ["--a_asymmetric"] * cfg.a_asymmetric +
            [f"--g_rounding {cfg.g_rounding}"] * (cfg.g_rounding != "nearest"))


def idle_settings(cfg):
    """Flags set away from their defaults that change nothing: the operand's format does not take
    them (a float operand takes none; fp8 has bits of its own), or --g_matmuls with G in float."""
    defaults, idle = Config(), []
    ops = operand_flags(cfg)
    for a, _, name, _, fmt in ops:
        fields = dataclasses.fields(fmt) if dataclasses.is_dataclass(fmt) else ()
        takes = {f.name for f in fields}
        takes |= {"bits"} if FORMATS[name] is IntFormat else set()  # int at 16/32 bits: Float()
        flags = [(f"{a}bits", "bits"), (f"{a}_granularity", "granularity")] + \
            {"a": [("a_asymmetric", "symmetric")], "g": [("g_rounding", "rounding")]}.get(a, [])
        idle += [f"--{flag} {getattr(cfg, flag)}" for flag, field_name in flags
                 if getattr(cfg, flag) != getattr(defaults, flag) and field_name not in takes]
    if cfg.g_matmuls != defaults.g_matmuls and not ops[2][4].quantized:  # G's format
        idle.append(f"--g_matmuls {cfg.g_matmuls}")
    return idle


def fp8_forward_misfits(cfg):
    """What keeps --backend scaled_mm from running the forward on fp8 tensor cores."""
    if cfg.backend != "scaled_mm":
        return []
    ops = operand_flags(cfg)[:2]
    fits = (not RECIPES[cfg.recipe].uses_kernels and
            all(isinstance(fmt, E4M3) and g in ("tensor",) + ROWS for *_, g, fmt in ops))
    return [] if fits else [f"{cfg.recipe} recipe, W {ops[0][4]}, X {ops[1][4]}"]


COMBINATIONS = [
    ("--n_embd must be divisible by --n_head",
     lambda c: [f"--n_embd {c.n_embd}, --n_head {c.n_head}"] * (c.n_embd % c.n_head != 0)),
    ("the int8 recipe (--preset int8) runs W, X and G in int formats of 2..8 bits, symmetric, per "
     "row, rounded to nearest; anything else needs --recipe paper", int8_misfits),
    ("an fp8 format scales per tensor, row or 1 x --group_size block of a row, not per column",
     lambda c: [f"--{a}_granularity column (with --{a}_format {f})"
                for a, _, f, g, fmt in operand_flags(c) if isinstance(fmt, Float8) and
                g == "column"]),
    ("a flag the operand's format does not take would change nothing (an operand is float, taking "
     "none, unless its --wbits/--abits/--gbits is 2..8 or its format e4m3/e5m2; fp8 has its own 8 "
     "bits): drop it, or give the operand a format that takes it", idle_settings),
    ("--backend triton runs the int8 recipe's kernels: add --recipe int8",
     lambda c: ["--backend triton"] * (c.backend == "triton" and
                                       not RECIPES[c.recipe].uses_kernels)),
    ("--backend scaled_mm runs the paper recipe's forward on torch._scaled_mm: W and X in e4m3 "
     "(--w_format e4m3 --a_format e4m3), scaled per tensor or per row", fp8_forward_misfits),
    ("--fuse_quantizers is for the int8 recipe only: add --recipe int8",
     lambda c: ["--fuse_quantizers"] * (c.fuse_quantizers and
                                        not RECIPES[c.recipe].uses_kernels)),
    ("--fuse_quantizers has inductor fuse the int8 quantizers: add --compile",
     lambda c: ["--fuse_quantizers"] * (c.fuse_quantizers and not c.compile)),
]


def validate_config(cfg):
    """Refuse configurations that cannot run, with one line that says what to change."""
    for names, valid, what in RULES:
        for name in names:
            if not valid(getattr(cfg, name)):
                raise UserError(f"--{name} must be {what}, got {getattr(cfg, name)}")
    for rule, broken_by in COMBINATIONS:
        if broken_by(cfg):
            raise UserError(f"{', '.join(broken_by(cfg))}: {rule}")


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else \
            "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible: use --device cpu")
    return torch.device(name)


def select_backend(cfg, device):
    """The recipe's fast path: the int8 recipe's Triton kernels on a CUDA GPU with int8 tensor
    cores; the paper recipe's fp8 forward (fp8 W and X, per tensor or row) on torch._scaled_mm
    where the GPU has fp8 tensor cores. None: the paper recipe's simulation."""
    if not RECIPES[cfg.recipe].uses_kernels:
        return select_fp8_backend(cfg, device)
    if cfg.backend == "sim":
        return kernels.ReferenceBackend
    reason = ("no CUDA device" if device.type != "cuda" else
              "Triton has no int8 tensor-core dot below sm80"
              if torch.cuda.get_device_capability(device) < (8, 0) else
              "triton is not installed" if kernels.triton is None else None)
    if reason is None:
        print("backend: Triton int8 kernels (kernels.py)")
        return kernels.TritonBackend
    if cfg.backend == "triton":
        raise UserError(f"--backend triton needs a CUDA GPU (sm80+) with triton: {reason}")
    print(f"backend: simulated int8 in PyTorch ({reason})")
    return kernels.ReferenceBackend


def select_fp8_backend(cfg, device):
    """kernels.Fp8Backend where torch._scaled_mm runs on fp8 tensor cores (e4m3 W and X; scales
    per tensor: sm89+; per row: sm90, bf16), or where asked (a CPU runs it too). Else None, the
    simulation, said in one line when W and X are fp8."""
    formats = make_formats(cfg)
    w, x = formats["W"], formats["X"]
    if cfg.backend == "sim" or not (isinstance(w, Float8) and isinstance(x, Float8)):
        return None
    rowwise = {w.granularity, x.granularity} != {"tensor"}
    need = (9, 0) if rowwise else (8, 9)
    gpu = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if not (isinstance(w, E4M3) and isinstance(x, E4M3)):
        reason = "torch._scaled_mm's forward takes e4m3 W and X"
    elif "group" in (w.granularity, x.granularity):
        reason = "scales per 1 x group_size block"
    elif gpu is None:
        reason = "no CUDA device"
    elif gpu < need:
        reason = f"fp8 tensor cores with these scales need sm{need[0]}{need[1]}+"
    elif rowwise and autocast_dtype(cfg, device) != torch.bfloat16:
        reason = "row-wise scales need --dtype bfloat16"
    else:
        reason = None
    if reason and cfg.backend == "scaled_mm" and gpu is not None:
        raise UserError(f"--backend scaled_mm: {reason}")
    if reason and cfg.backend == "auto":
        print(f"backend: simulated fp8 ({reason})")
        return None
    print(f"backend: the fp8 forward on torch._scaled_mm ({device.type})")
    return kernels.Fp8Backend


GROUP_RULE = ("--group_size divides the rows a group granularity splits: a Linear's input width "
              "for W and X, its output width for G (checked as the model is built)")


def check_group_size(recipe, name, linear):
    """GROUP_RULE: W's and X's rows are the inputs, G's the outputs."""
    widths = (linear.in_features, linear.in_features, linear.out_features)
    for flag, fmt, width in zip("wag", (recipe.w, recipe.x, recipe.g), widths):
        size = getattr(fmt, "group_size", None)
        if fmt.quantized and getattr(fmt, "granularity", None) == "group" and width % size:
            hint = ", or leave the head alone: --no-quantize_head" if name == "lm_head" else ""
            raise UserError(f"--group_size {size} does not divide the width {width} of {name} "
                            f"(--{flag}_granularity group): pick a divisor{hint}")


def make_format(name, **settings):
    """FORMATS[name] built with the settings its class takes (its dataclass fields); the int
    format at 16 or 32 bits is Float(): no quantization."""
    cls = FORMATS[name]
    if cls is IntFormat and settings["bits"] > 8:
        return Float()
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else ()
    return cls(**{k: v for k, v in settings.items() if k in fields})


def make_formats(cfg):
    """{"W", "X", "G": Format} from cfg's flags. The int8 recipe's scales run along rows."""
    rows = RECIPES[cfg.recipe].uses_kernels
    return {"W": make_format(cfg.w_format, bits=cfg.wbits, granularity="row" if rows else
                             cfg.w_granularity, group_size=cfg.group_size),
            "X": make_format(cfg.a_format, bits=cfg.abits, granularity="row" if rows else
                             cfg.a_granularity, group_size=cfg.group_size,
                             symmetric=not cfg.a_asymmetric),
            "G": make_format(cfg.g_format, bits=cfg.gbits, granularity="row" if rows else
                             cfg.g_granularity, group_size=cfg.group_size, floor=GRAD_FLOOR,
                             rounding=cfg.g_rounding)}


def formats_text(formats):
    """{"W": Format, ...} as one line: "W int8 row, X float, G e5m2 tensor"."""
    return ", ".join(f"{operand} {fmt}" for operand, fmt in formats.items())


def make_recipe(cfg, backend=None, device="cpu"):
    """cfg's recipe: its class, given cfg's formats, the Config fields it names, the backend, and
    (stochastic rounding) a generator on `device` seeded by cfg.seed."""
    cls = RECIPES[cfg.recipe]
    formats = make_formats(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: getattr(cfg, k) for k in names & {f.name for f in dataclasses.fields(Config)}
              if k != "backend"}
    values.update(w=formats["W"], x=formats["X"], g=formats["G"])
    if hasattr(backend, cls.backend_op):
        values["backend"] = backend
    if "generator" in names and any(getattr(f, "rounding", "") == "stochastic"
                                    for f in formats.values()):
        values["generator"] = torch.Generator(device).manual_seed(cfg.seed)
    return cls(**values)


def build_model(cfg, vocab_size, device):
    torch.manual_seed(cfg.seed)
    model = GPT(cfg, vocab_size)
    formats = make_formats(cfg)
    if any(f.quantized for f in formats.values()):
        backend = select_backend(cfg, device)
        swapped = quantize_model(model, cfg, backend, device)
        head = "" if cfg.quantize_head else "; the LM head stays full precision"
        print(f"quantized {len(swapped)} Linears ({cfg.recipe} recipe: " +
              formats_text(formats) + f"){head}")
    return model.to(device)


def flops_per_token(model, cfg):
    """nanoGPT's estimate (PaLM appendix B): 6 N + 12 L H Q T per token, forward and backward."""
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


# dense bf16 / fp16 tensor-core peaks with fp32 accumulation (FLOP/s) of the GPUs whose name holds
# the key, the first that matches (GeForce cards accumulate in fp32 at half their fp16 rate)
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12,
              "4090": 82.6e12, "3090": 35.6e12, "T4": 65e12, "V100": 125e12}


def peak_flops(device, dtype):
    """The GPU's tensor-core peak for 16-bit matmuls, or None (unknown GPU, fp32, no GPU)."""
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def peak_memory_mib(device):
    """The most memory held: the GPU allocator's peak since train() began on CUDA; on a Mac the
    memory Metal holds now; on a CPU the whole process's peak resident size (Python and torch
    included: compare runs with it, not with the model's bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2 ** 20
    if device.type != "cpu":
        return None
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def open_metrics(cfg, start, model, device, dtype):
    """out_dir/metrics.jsonl, one JSON object a line: a new run writes the first (config, versions,
    device); a resumed run keeps what the interrupted one logged up to its step (evaluations
    before it: the resumed run evaluates that step again) and appends."""
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if cfg.init_from == "resume" and os.path.exists(path):
        with open(path) as f:
            lines = f.read().splitlines()
        if lines and not lines[-1].endswith("}"):
            lines.pop()  # a line cut short by a hard kill
        records = [json.loads(line) for line in lines if line.strip()]
        kept = [r for r in records if r["kind"] == "run" or r["step"] < start
                or (r["kind"] == "train" and r["step"] == start)]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)  # a crash now leaves the old file whole
        return path
    triton = getattr(kernels.triton, "__version__", None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    with open(path, "w") as f:
        f.write(json.dumps({"kind": "run", "config": dataclasses.asdict(cfg),
                            "versions": {"torch": torch.__version__, "triton": triton,
                                         "python": sys.version.split()[0]},
                            "device": name, "dtype": str(dtype)[6:],
                            "parameters": sum(p.numel() for p in model.parameters())}) + "\n")
    return path


def log_metrics(path, **record):
    """Append one record to metrics.jsonl (None: not the logging process)."""
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def make_out_dir(cfg):
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {cfg.out_dir} ({e.strerror}): choose another --out_dir")
    if not os.access(cfg.out_dir, os.W_OK):
        raise UserError(f"output folder {cfg.out_dir} is not writable: choose another --out_dir")
    ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from == "scratch" and cfg.max_iters and os.path.exists(ckpt):
        print(f"note: this run replaces {ckpt} (another --out_dir keeps it)")


def save_checkpoint(path, model, optimizer, cfg, it, best_val, batch_gen, meta, scaler=None):
    """Write to a temporary file, then rename: a crash leaves the previous checkpoint intact."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": dataclasses.asdict(cfg), "iter": it, "best_val": best_val, "meta": meta,
            "rng_cpu": torch.get_rng_state(), "rng_batches": batch_gen.get_state(),
            "scaler": scaler.state_dict() if scaler is not None else {}}
    if torch.cuda.is_available():
        ckpt["rng_cuda"] = torch.cuda.get_rng_state_all()
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def rounding_generator(model):
    """The stochastic-rounding generator the model's QLinears share, or None. train reseeds it
    from (seed, step, micro-step) before each micro-batch: every process, and a resumed run,
    draws the bits an uninterrupted single process would."""
    return next((m.recipe.generator for m in model.modules() if isinstance(m, QLinear)
                 and getattr(m.recipe, "generator", None) is not None), None)


def load_checkpoint(path):
    """torch.load(weights_only=True): a checkpoint holds tensors and plain values, never code."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train first (python qgpt.py), or point "
                        f"--out_dir at one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or holding objects that are not plain data
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is corrupt or "
                        f"truncated")


def checkpoint_config(ckpt):
    """The Config a checkpoint was trained with (flags it predates take their defaults)."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in ckpt["config"].items() if k in names})


FORMAT_KEYS = ["wbits", "abits", "gbits", "w_format", "a_format", "g_format", "w_granularity",
               "a_granularity", "g_granularity", "group_size", "a_asymmetric", "g_rounding"]
SHAPE_KEYS = ["n_layer", "n_head", "n_embd", "block_size", "bias"]
STATE_KEYS = ["m_bits", "v_bits", "m_granularity", "v_granularity", "state_block_size", "v_map"]


def linear_keys(cfg):
    """The flags that decide what the quantized Linears compute: the formats' and the recipe's."""
    read = {f.name for f in dataclasses.fields(RECIPES[cfg.recipe])} - {"fuse_quantizers",
                                                                        "backend"}
    return ["recipe", "quantize_head"] + FORMAT_KEYS + [f.name for f in dataclasses.fields(Config)
                                                        if f.name in read]


def check_resume(ckpt, cfg, meta):
    """Refuse to resume into another model shape, vocabulary or (without the flag) quantization;
    returns the quantization keys that change (allowed by --allow_config_change)."""
    trained = checkpoint_config(ckpt)
    saved = dataclasses.asdict(trained)
    keys = SHAPE_KEYS + list(dict.fromkeys(linear_keys(trained) + linear_keys(cfg))) + STATE_KEYS
    changes = {k: f"{k} {saved[k]} -> {getattr(cfg, k)}" for k in keys
               if saved[k] != getattr(cfg, k)}
    shape = [change for k, change in changes.items() if k in SHAPE_KEYS]
    if shape:
        raise UserError(f"the checkpoint has another model shape ({', '.join(shape)}): use its "
                        f"flags to resume")
    if ckpt["meta"]["vocab_size"] != meta["vocab_size"]:
        raise UserError(f"dataset '{cfg.dataset}' has vocab {meta['vocab_size']} but the "
                        f"checkpoint was trained with vocab {ckpt['meta']['vocab_size']}: resume "
                        f"on the dataset it was trained on")
    if changes and not cfg.allow_config_change:
        raise UserError(f"the checkpoint was trained with another quantization "
                        f"({', '.join(changes.values())}): add --allow_config_change to switch it")
    return list(changes)


def resume(path, cfg, meta, model, optimizer, batch_gen, scaler=None):
    """Load a checkpoint into the model, optimizer and random streams; returns (step, best val)."""
    ckpt = load_checkpoint(path)
    changed = check_resume(ckpt, cfg, meta)
    model.load_state_dict(ckpt["model"])
    states = list(ckpt["optimizer"]["state"].values())
    older = not isinstance(optimizer, QAdamW) and states and "m" in states[0]  # QAdamW's fp32
    if set(changed) & set(STATE_KEYS) or older:
        print("optimizer states start afresh (their format changed)")
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng_cpu"])
    batch_gen.set_state(ckpt["rng_batches"])
    if scaler is not None and scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])  # fp16's loss scale goes on where it was
    if "rng_cuda" in ckpt and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    print(f"resumed from {path} at step {ckpt['iter']}")
    return ckpt["iter"], ckpt["best_val"]


def wrap_model(model, cfg, world, device):
    """(the model to evaluate: compiled if asked; the model to step: under torchrun, DDP's)."""
    run_model = model
    if cfg.compile and rounding_generator(model) is not None:
        print("torch.compile: stochastic rounding's generator splits the graph at each quantized "
              "Linear (it runs, compiled in pieces)")
    if cfg.compile:
        try:
            run_model = torch.compile(model)
        except Exception as e:
            print(f"torch.compile unavailable ({type(e).__name__}); running eagerly")
    if world == 1:
        return run_model, run_model
    device_ids = [device.index] if device.type == "cuda" else None
    return run_model, nn.parallel.DistributedDataParallel(run_model, device_ids=device_ids)


def setup_distributed(cfg):
    """Under torchrun (RANK set): join the process group; returns (rank, world_size, device)."""
    device = pick_device(cfg.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if cfg.grad_accum % world:
        raise UserError(f"--grad_accum {cfg.grad_accum} must be a multiple of the {world} "
                        f"processes")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank > 0:  # logs, tables and checkpoints come from rank 0
        sys.stdout = open(os.devnull, "w")
    return rank, world, device


def _all_reduce(value, world):
    """Sum a float over the processes (identity in a single process)."""
    if world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item()


def main(argv=None):
    """Entry point; returns the exit code (0 done, 1 diverged, 2 bad input)."""
    try:
        cfg = parse_config(argv)
        validate_config(cfg)
        if cfg.mode == "sample":
            sample(cfg)
        elif cfg.mode == "memory":  # no data needed: the dataset's vocabulary if any, else GPT-2's
            meta_path = os.path.join(cfg.data_dir, cfg.dataset, "meta.json")
            vocab_size = int(read_meta(cfg)["vocab_size"]) if os.path.isfile(meta_path) else 50257
            model = build_model(cfg, vocab_size, torch.device("cpu"))
            print(memory_table(model, make_optimizer(model, cfg)))
        else:
            if cfg.max_new_tokens > 0:  # the sample after training: its prompt, before any work
                check_prompt(cfg.prompt, read_meta(cfg))
            model, history = train(cfg)
            if history["diverged_at"] is not None:
                return 1
            if cfg.max_new_tokens > 0:
                sample(cfg, model, read_meta(cfg))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
