"""
kernels.py: Triton kernels for qgpt's int8 recipe, each beside a plain PyTorch reference.

    python kernels.py           # GPU: the kernels against their references, then the tables
                                # CPU: says so, checks the kernels under Triton's interpreter
    python -m tools.bench --adamw   # the fused AdamW against qgpt.QAdamW's step (needs both files)
    python kernels.py --tune    # GPU: time matmul tiles at GPT-2's shapes, print this GPU's table
    python -m tools.gate        # no GPU needed: compile every launch for sm90/sm80/sm89, check it
    python -m pytest test_qgpt.py -k "kernel or triton"   # compiled on a GPU, else interpreted

How it works, for one Linear Y = X W^T (X: M tokens x K features, W: N x K, G = dL/dY: M x N):
 1. `quantize_dual` reads X once and writes two int8 copies of it: row codes with one scale per
    token, for Y = X W^T, and column codes with one scale per feature *and per group of
    `token_group` consecutive tokens*, stored as X^T, for dW = G^T X. One launch: the programs
    that take a tile of rows and those that take one group's columns are interleaved, so a group's
    column programs find its rows in L2, just read from memory by its row programs. G gets the
    same. Codes and scales are exactly qgpt.quantize's (IEEE division, round half to even, clamp
    before the cast, NaN -> code 0 with a NaN scale). One group of all tokens: plain per-column.
 2. `int8_matmul`: C = sum over K-groups g of (A_g @ B_g) * a_scale_g[:, None] * b_scale_g[None, :]
    (+ bias). int8 products are summed in int32 on tensor cores; the scales factor out of each
    group's sum because each runs along a dimension the sum does not cover. The forward and dX have
    one group (the scales apply once, in the epilogue, with the bias); dW = G^T X sums over tokens,
    one group per token group, each group's int32 sum promoted to fp32 in the main loop. A
    persistent kernel with tensor descriptors (TMA) serves K-major operands, a pointer kernel any
    strides. Every launch's kernel, tiles, stages and warps come from a plan function
    (int8_matmul_plan, quantize_dual_plan, adamw_lowbit_plan): a table per GPU architecture, fitted
    to the output's element size, the K-groups, the strides and the GPU's shared memory, and
    compiled for each architecture without a GPU by tools/gate.py (no autotuning unless asked).
 3. `adamw_lowbit_step`: one AdamW step with 8/4-bit block-wise moments in one pass over memory
    (decode, update in fp32, new block absmax, encode); qgpt.QAdamW's PyTorch step is its reference.
 4. `ReferenceBackend` and `TritonBackend`: the two operations qgpt's int8 recipe needs
    (`quantize_dual`, `int8_matmul`), in PyTorch or on the kernels; the kernels are PyTorch custom
    operators, so the recipe traces with torch.compile(fullgraph=True).
int32 holds a sum of K products of int8 codes only for K < 2^17 (all codes -128: 2^31 at K = 2^17),
so a K-group is at most MAX_K = 65,536 long; a longer single group is cut into groups of MAX_K
that share its scales.
"""

import math
import os
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # qgpt.py still runs on the references; the Triton backend says it is missing
    triton = tl = None

MAX_K = 2 ** 16  # longest K-group: |int8 x int8| <= 2^14, so 2^16 of them fit in int32
MIN_K_GROUP = 32  # shortest: an int8 tl.dot on a GPU needs K blocks of 32 or more


# ----------------------------------------------------------------------------------------------
# References: plain PyTorch, the same signatures as the launchers below.

def absmax_scale(absmax, absmax_floor, qmax):
    """qgpt.quantize's scale: max(absmax, floor) / qmax (amax keeps NaN). A tensor divisor: CUDA
    divides by a Python number through its reciprocal, 1 ulp off IEEE division."""
    absmax = absmax.clamp(min=absmax_floor)
    return absmax / torch.full_like(absmax, qmax)


def sqrt_rn_integer(x):
    """fp32 sqrt correctly rounded (tl.sqrt_rn's bits, float64's root rounded to fp32) from
    integer arithmetic, with no float64 (Apple's GPUs have none) and no arithmetic on subnormals:
     1. x's bits give x = m * 2^e with a 24-bit integer m (a subnormal normalized in integers);
     2. n = m * 2^24 (e even) or m * 2^23 (e odd) lies in [2^46, 2^48), so its integer square
        root q has 24 bits: fp32's sqrt as a first guess, one integer Newton step, then exact
        corrections to floor(sqrt(n));
     3. to nearest: sqrt(n) >= q + 1/2 exactly when n - q^2 > q (no ties: n is an integer);
     4. sqrt(x) = q * 2^((e + odd) / 2 - 12), a power of two applied exactly.
    +-0, inf and NaN are themselves; a negative x gives NaN."""
    bits = x.float().view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    field = magnitude >> 23
    raw = (magnitude & 0x7FFFFF).to(torch.int64)
    subnormal = (field == 0) & (raw > 0)
    top = ((raw.float().view(torch.int32) >> 23) & 255) - 127  # floor(log2 raw): exact, raw < 2^23
    shift = torch.where(subnormal, 23 - top, 0)
    m = torch.where(subnormal, raw << shift, raw | 0x800000)  # (M,) int64 in [2^23, 2^24)
    exponent = torch.where(subnormal, -149 - shift, field - 150)
    odd = exponent & 1
    n = m << (24 - odd)  # in [2^46, 2^48)
    q = torch.sqrt(n.float()).to(torch.int64)
    q = (q + n // q) >> 1  # Newton: within 1 of floor(sqrt(n)) from any guess a few ulps off
    for _ in range(2):
        q = q - (q * q > n).long()
        q = q + ((q + 1) * (q + 1) <= n).long()
    q = q + (n - q * q > q).long()
    scale = (((exponent + odd) // 2 - 12 + 127) << 23).to(torch.int32).view(torch.float32)
    root = q.float() * scale  # q <= 2^24 is exact in fp32; the scale is a power of two
    special = (magnitude == 0) | (magnitude >= 0x7F800000)  # +-0, inf, NaN: themselves
    root = torch.where(special, x.float(), root)
    return torch.where((bits < 0) & (magnitude != 0) & (magnitude <= 0x7F800000),
                       torch.full_like(root, float("nan")), root)


def quantize_rows_reference(x, bits=8, absmax_floor=1e-5):
    """(M, K) float -> int8 codes (M, K), fp32 scale (M, 1): qgpt.quantize(x, bits, "row")."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = absmax_scale(xf.abs().amax(dim=1, keepdim=True), absmax_floor, qmax)  # (M, 1) fp32
    codes = torch.round(xf / scale).clamp(-qmax - 1, qmax)  # clamp while float: 128.0 would wrap
    return codes.nan_to_num(0.0).to(torch.int8), scale


def token_groups(M, token_group):
    """(group length, number of groups) for M rows: token_group 0 (or >= M) is one group."""
    group = token_group if 0 < token_group < M else max(M, 1)
    return group, -(-M // group)


def quantize_dual_reference(x, bits=8, absmax_floor=1e-5, token_group=0, rows=True, columns=True):
    """Both quantizations a Linear needs of X or G (M, K), as (rows, columns):
      rows     int8 codes (M, K) and fp32 scale (M, 1): one scale per row (token)
      columns  int8 codes of X^T (K, M), contiguous, and fp32 scale (J, K): one scale per column
               and per group of `token_group` consecutive rows, J = ceil(M / token_group) groups
               (0: one group of all rows, the last one may be shorter)
    Each part is None when not asked for. Every group is quantize_rows_reference of its rows' x^T.
    """
    M, K = x.shape
    group, n_groups = token_groups(M, token_group)
    qmax = 2 ** (bits - 1) - 1
    row_part = quantize_rows_reference(x, bits, absmax_floor) if rows else None
    if not columns:
        return row_part, None
    xf = x.float()
    if n_groups * group != M:  # a shorter last group: pad with zero rows (they change no absmax)
        xf = F.pad(xf, (0, 0, 0, n_groups * group - M))
    blocks = xf.view(n_groups, group, K)
    scale = absmax_scale(blocks.abs().amax(dim=1), absmax_floor, qmax)  # (J, K) fp32
    codes = torch.round(blocks / scale[:, None, :]).clamp(-qmax - 1, qmax).nan_to_num(0.0)
    codes = codes.to(torch.int8).view(n_groups * group, K)[:M]  # (M, K) int8
    return row_part, (codes.t().contiguous(), scale)  # X^T (K, M): rows contiguous for dW


def int8_matmul_reference(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32, k_group=0):
    """A (M, K) and B (K, N) int8 codes; K cut into J groups of k_group (0: one group).
    a_scale (J, M) and b_scale (J, N) (one group: M and N elements in any shape):
        C = sum over groups j, in order, of fp32(A[:, Kj] @ B[Kj, :]) * a_scale[j][:, None]
            * b_scale[j][None, :]   (fp32, starting from 0), then + bias, then out_dtype.
    The integer sums are exact (int32 in the kernels; here fp32 matmuls of up to 1024 products,
    |sum| <= 2^24, added in int32). out_dtype=torch.int32 returns the raw sums of one group.
    """
    M, K = a.shape
    N = b.shape[1]
    group, n_groups = _k_groups(K, k_group)
    if out_dtype == torch.int32:
        if n_groups > 1:
            raise ValueError(f"int32 output needs one K-group of at most {MAX_K}: the int32 sums "
                             f"could overflow (K = {K}); ask for a float out_dtype")
        return _int_sums(a, b)
    a_scale = _group_scales(a_scale, n_groups, M)
    b_scale = _group_scales(b_scale, n_groups, N)
    with torch.autocast(a.device.type, enabled=False):  # fp32, also inside a bf16 autocast
        out = torch.zeros(M, N, device=a.device)
        for j in range(n_groups):
            ks = slice(j * group, (j + 1) * group)
            partial = _int_sums(a[:, ks], b[ks]).float()  # exact integers -> fp32 (rounded once)
            out = out + partial * a_scale[j].view(-1, 1) * b_scale[j].view(1, -1)
        return (out if bias is None else out + bias.float()).to(out_dtype)


def _int_sums(a, b, chunk=1024):
    """int8 A (M, K) @ B (K, N) as exact int32 sums, without int or float64 matmuls (neither runs
    everywhere: Apple's GPUs have no float64): fp32 matmuls over chunks of 1,024 along K, each
    exact (|sum| <= 1024 * 2^14 = 2^24), added in int32."""
    sums = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    with torch.autocast(a.device.type, enabled=False):
        for k0 in range(0, a.shape[1], chunk):
            sums += (a[:, k0:k0 + chunk].float() @ b[k0:k0 + chunk].float()).to(torch.int32)
    return sums


def _k_groups(K, k_group):
    """(group length, groups) along K; one group longer than MAX_K is cut into groups of MAX_K."""
    if k_group > MAX_K:
        raise ValueError(f"k_group {k_group} > {MAX_K}: its int32 sums could overflow")
    group, n_groups = token_groups(K, k_group)
    return (MAX_K, -(-K // MAX_K)) if group > MAX_K else (group, n_groups)


def _group_scales(scale, n_groups, size):
    """Scales as contiguous fp32 (groups, size); one set of scales is shared by every group."""
    scale = scale.reshape(-1, size).float().contiguous()
    if scale.shape[0] == n_groups:
        return scale
    if scale.shape[0] != 1:
        raise ValueError(f"{scale.shape[0]} groups of scales for {n_groups} K-groups")
    return scale.expand(n_groups, size).contiguous()


def compare(name, actual, expected, rtol=0.0, atol=0.0):
    """Print and return whether two tensors are exact, close (within rtol/atol), or differ; where
    they differ, the first index with both values."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.shape != expected.shape:
        print(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
        return False
    a, e = actual.double(), expected.double()
    same_nan = a.isnan() == e.isnan()
    diff = (a - e).abs().nan_to_num(0.0)
    bad = ~same_nan | (diff > atol + rtol * e.abs().nan_to_num(0.0))
    exact = torch.equal(a.nan_to_num(0.0), e.nan_to_num(0.0)) and bool(same_nan.all())
    max_diff = diff.max().item() if diff.numel() else 0.0
    verdict = "exact" if exact else "close" if not bad.any() else "DIFFERENT"
    where = ""
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        where = f"; first at {i}: got {actual[i].item()}, expected {expected[i].item()}"
    print(f"{name}: {verdict}, max |diff| {max_diff:.3g}{where}")
    return not bad.any()


# ----------------------------------------------------------------------------------------------
# Triton kernels.

if triton is not None:

    @triton.jit
    def _round_half_even(t):
        """torch.round's rounding (ties to even), from floor: libdevice.rint is not interpreted."""
        r = tl.floor(t + 0.5)
        r_is_odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(((r - t) == 0.5) & r_is_odd, r - 1.0, r)

    @triton.jit
    def _codes(x, scale, qmax):
        """int8 codes of x at one scale: qgpt.quantize's arithmetic; NaN (x or scale) -> code 0."""
        # div_rn: IEEE division, as torch does; Triton's `/` on fp32 is approximate on GPUs.
        t = _round_half_even(tl.math.div_rn(x, scale))
        q = tl.minimum(tl.maximum(t, -qmax - 1.0), qmax)  # clamp before the cast; min/max drop NaN:
        return tl.where(t == t, q, 0.0).to(tl.int8)

    @triton.jit
    def _absmax(x, axis):
        """max |x| along axis, NaN if any element is NaN (tl.max skips NaN, torch.amax does not)."""
        has_nan = tl.max((x != x).to(tl.int32), axis=axis)
        return tl.where(has_nan > 0, float("nan"), tl.max(tl.abs(x), axis=axis))

    @triton.jit
    def _running_absmax(acc, x):
        """Elementwise max(acc, |x|) that keeps a NaN once one is seen."""
        return tl.where((x != x) | (acc != acc), float("nan"), tl.maximum(acc, tl.abs(x)))

    @triton.jit
    def _scale(absmax, absmax_floor, qmax):
        """absmax.clamp(min=floor) / qmax, as qgpt.quantize: a NaN absmax stays NaN."""
        return tl.math.div_rn(tl.where(absmax < absmax_floor, absmax_floor, absmax), qmax)

    # SEAM: kernel_quantize_rows
    @triton.jit
    def _quantize_row_tile(x_ptr, codes_ptr, scale_ptr, rows, row_mask, K, stride_xm, stride_xk,
                           qmax, absmax_floor, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr):
        """Row quantization of the rows `rows` of x (M, K): qgpt.quantize(x, bits, "row") on them.

        rows: (ROWS,) int32 row indices, row_mask: (ROWS,) which of them exist (only those are
        read or written). x[m, k] is at x_ptr + m * stride_xm + k * stride_xk (any strides, any
        float dtype: compute in fp32). Writes, for each row m: the fp32 scale
        _scale(max_k |x[m, k]|, absmax_floor, qmax) at scale_ptr + m, and the int8 codes
        _codes(x[m, k], scale, qmax) at codes_ptr + m * K + k (a contiguous (M, K) output). The
        row is read in blocks of BLOCK_K columns (mask k < K): with SINGLE_PASS (BLOCK_K >= K) one
        block holds it; otherwise a first pass takes the absmax over the blocks, keeping a NaN of
        any block (_running_absmax), and a second pass writes the codes.
        """
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + rows[:, None] * stride_xm
        c_rows = codes_ptr + rows[:, None] * K
        if SINGLE_PASS:  # the whole row in one block: one read, one write
            mask = row_mask[:, None] & (offs_k[None, :] < K)
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            scale = _scale(_absmax(x, 1), absmax_floor, qmax)
            tl.store(c_rows + offs_k[None, :], _codes(x, scale[:, None], qmax), mask=mask)
        else:
            absmax = tl.zeros((rows.shape[0], BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = row_mask[:, None] & (k0 + offs_k[None, :] < K)
                x = tl.load(x_rows + (k0 + offs_k[None, :]) * stride_xk, mask=mask, other=0.0)
                absmax = _running_absmax(absmax, x.to(tl.float32))
            scale = _scale(_absmax(absmax, 1), absmax_floor, qmax)
            for k0 in range(0, K, BLOCK_K):  # the rows again: from L1/L2, just read
                mask = row_mask[:, None] & (k0 + offs_k[None, :] < K)
                x = tl.load(x_rows + (k0 + offs_k[None, :]) * stride_xk, mask=mask, other=0.0)
                codes = _codes(x.to(tl.float32), scale[:, None], qmax)
                tl.store(c_rows + k0 + offs_k[None, :], codes, mask=mask)
        tl.store(scale_ptr + rows, scale, mask=row_mask)

    # SEAM: kernel_quantize_columns
    @triton.jit
    def _quantize_column_tile(x_ptr, colt_ptr, scale_ptr, group, row_start, row_end, cols, M, K,
                              stride_xm, stride_xk, qmax, absmax_floor, BLOCK_M: tl.constexpr):
        """Column quantization of one token group: x[row_start:row_end, cols] of x (M, K).

        cols: (BLOCK_N,) int32 column indices (those >= K do not exist). x[m, k] is at
        x_ptr + m * stride_xm + k * stride_xk (any strides; compute in fp32). For each column k
        the scale is _scale(max |x[m, k]| over the group's rows, absmax_floor, qmax), NaN kept
        (_running_absmax), written at scale_ptr + group * K + k ((J, K) scales); the codes
        _codes(x[m, k], scale, qmax) go to X^T: colt_ptr + k * M + m (a contiguous (K, M)
        output, so dW = G^T X reads its operands K-major). Two passes over the group's rows in
        blocks of BLOCK_M (mask row < row_end): the absmax, then the codes.
        """
        col_mask = cols < K
        absmax = tl.zeros((BLOCK_M, cols.shape[0]), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask = (offs_m[:, None] < row_end) & col_mask[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask,
                        other=0.0).to(tl.float32)
            absmax = _running_absmax(absmax, x)
        scale = _scale(_absmax(absmax, 0), absmax_floor, qmax)  # (BLOCK_N,)
        tl.store(scale_ptr + group * K + cols, scale, mask=col_mask)
        for m0 in range(row_start, row_end, BLOCK_M):  # the group again, from L1/L2
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask = (offs_m[:, None] < row_end) & col_mask[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask,
                        other=0.0).to(tl.float32)
            codes = _codes(x, scale[None, :], qmax)
            tl.store(colt_ptr + cols[None, :] * M + offs_m[:, None], codes, mask=mask)

    @triton.jit
    def quantize_dual_kernel(
            x_ptr, row_codes_ptr, row_scale_ptr, colt_ptr, col_scale_ptr,  # pointers
            M, K, stride_xm, stride_xk,  # x (M, K)
            token_group, n_groups, row_items, col_items, lag,  # the schedule (see the launcher)
            qmax, absmax_floor,  # quantizer
            ROW_TILE: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
            COLUMNS: tl.constexpr):
        # Program `item` of the schedule: item // (row_items + col_items) is its block s; the
        # first row_items of a block take the row tiles of token group s, the next col_items the
        # column tiles of group s - lag (lag 1 when both are made): a group's column tiles run
        # just after its row tiles, so they read it from L2. No program waits for another.
        item = tl.program_id(0)
        block = item // (row_items + col_items)
        r = item % (row_items + col_items)
        if ROWS:
            if (r < row_items) & (block < n_groups):
                rows = block * token_group + r * ROW_TILE + tl.arange(0, ROW_TILE)
                row_mask = (rows < M) & (rows < (block + 1) * token_group)
                _quantize_row_tile(x_ptr, row_codes_ptr, row_scale_ptr, rows, row_mask, K,
                                   stride_xm, stride_xk, qmax, absmax_floor, BLOCK_K, SINGLE_PASS)
        if COLUMNS:
            group = block - lag
            if (r >= row_items) & (group >= 0):  # (the grid ends at group n_groups - 1)
                cols = (r - row_items) * BLOCK_N + tl.arange(0, BLOCK_N)
                row_start = group * token_group
                row_end = tl.minimum(row_start + token_group, M)
                _quantize_column_tile(x_ptr, colt_ptr, col_scale_ptr, group, row_start, row_end,
                                      cols, M, K, stride_xm, stride_xk, qmax, absmax_floor,
                                      BLOCK_M)

    @triton.jit
    def _promote(out, acc, a_scale_ptr, b_scale_ptr, j, M, N, offs_m, offs_n):
        """out + fp32(acc) * a_scale[j, offs_m][:, None] * b_scale[j, offs_n][None, :]."""
        a_scale = tl.load(a_scale_ptr + j * M + offs_m, mask=offs_m < M, other=0.0)
        b_scale = tl.load(b_scale_ptr + j * N + offs_n, mask=offs_n < N, other=0.0)
        return out + acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]

    # SEAM: kernel_matmul
    @triton.jit
    def int8_matmul_kernel(
            a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,  # pointers
            M, N, K, k_group,  # sizes; K is summed in groups of k_group (a multiple of BLOCK_K)
            stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,  # strides
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            GROUP_M: tl.constexpr, DEQUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
            K_GROUPS: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) tile of C = A @ B for int8 A (M, K), B (K, N), any strides.

        Tile order: program pid takes tile (pid_m, pid_n) in groups of GROUP_M tile-rows (they
        share B's columns in L2). K is walked in blocks of BLOCK_K (mask k < K, m < M, n < N;
        masked codes are 0), the products summed in an int32 accumulator (tl.dot with out_dtype
        int32: exact). With DEQUANT each K-group's sum is promoted to fp32 with its own scales:
        out += fp32(sum) * a_scale[j, m] * b_scale[j, n] (fp32, in that order, out starting at 0;
        j = the group's index; a_scale (J, M) at a_scale_ptr + j * M + m, b_scale (J, N) at
        b_scale_ptr + j * N + n). K_GROUPS (several groups of k_group): at the end of each group
        (the block that ends at a multiple of k_group, or at K), in the K loop, and the
        accumulator restarts; one group (not K_GROUPS): once, after the loop, with j = 0, so that
        the loop keeps one tile in registers. Then + bias[n] (HAS_BIAS), cast to C's dtype,
        stored at c_ptr + m * stride_cm + n * stride_cn. Without DEQUANT (one group only) the
        int32 sums are stored as they are.
        """
        pid = tl.program_id(0)
        num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        first_m = (pid // num_pid_in_group) * GROUP_M
        group_rows = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % num_pid_in_group) % group_rows
        pid_n = (pid % num_pid_in_group) // group_rows
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m, mask_n = offs_m < M, offs_n < N
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the fp32 sum of the groups
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # int32: exact for a group <= MAX_K
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=mask_m[:, None] & (ks[None, :] < K), other=0)
            b = tl.load(b_ptr + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                        mask=(ks[:, None] < K) & mask_n[None, :], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # on tensor cores
            if K_GROUPS:
                if ((k0 + BLOCK_K) % k_group == 0) | (k0 + BLOCK_K >= K):  # a group ends here
                    out = _promote(out, acc, a_scale_ptr, b_scale_ptr, k0 // k_group, M, N,
                                   offs_m, offs_n)
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        if DEQUANT:
            if not K_GROUPS:
                out = _promote(out, acc, a_scale_ptr, b_scale_ptr, 0, M, N, offs_m, offs_n)
            if HAS_BIAS:
                out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
        else:
            tl.store(c_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def int8_matmul_tma_kernel(
            a_ptr, bt_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,  # A (M, K), B^T (N, K)
            M, N, K, k_group,
            stride_am, stride_btn, stride_cm,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, DEQUANT: tl.constexpr,
            HAS_BIAS: tl.constexpr, K_GROUPS: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr):
        # int8_matmul_kernel's math for K-major A and B^T, persistent: one program per SM walks the
        # tiles tile, tile + NUM_SMS, ...; tensor descriptors let the copy engine (TMA) move whole
        # tiles and zero-fill past the edges, so no masks. The tile leaves in EPILOGUE_SPLIT
        # column halves (1 or 2): the store's staging buffer in shared memory is that much smaller.
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
        bt_desc = tl.make_tensor_descriptor(bt_ptr, [N, K], [stride_btn, 1], [BLOCK_N, BLOCK_K])
        c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [stride_cm, 1],
                                           [BLOCK_M, BLOCK_N // EPILOGUE_SPLIT])
        num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=True):
            first_m = (tile // num_pid_in_group) * GROUP_M
            group_rows = min(num_pid_m - first_m, GROUP_M)
            pid_m = first_m + (tile % num_pid_in_group) % group_rows
            pid_n = (tile % num_pid_in_group) // group_rows
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                a = a_desc.load([pid_m * BLOCK_M, k0])
                bt = bt_desc.load([pid_n * BLOCK_N, k0])
                acc = tl.dot(a, bt.T, acc, out_dtype=tl.int32)
                if K_GROUPS:
                    if ((k0 + BLOCK_K) % k_group == 0) | (k0 + BLOCK_K >= K):  # a group ends here
                        out = _promote(out, acc, a_scale_ptr, b_scale_ptr, k0 // k_group, M, N,
                                       offs_m, offs_n)
                        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            if DEQUANT:
                if not K_GROUPS:
                    out = _promote(out, acc, a_scale_ptr, b_scale_ptr, 0, M, N, offs_m, offs_n)
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
                    out += bias.to(tl.float32)[None, :]
                _store_tile(c_desc, out.to(c_ptr.dtype.element_ty), pid_m * BLOCK_M,
                            pid_n * BLOCK_N, BLOCK_M, BLOCK_N, EPILOGUE_SPLIT)
            else:
                _store_tile(c_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, BLOCK_M, BLOCK_N,
                            EPILOGUE_SPLIT)

    @triton.jit
    def _store_tile(c_desc, tile, row, col, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    SPLIT: tl.constexpr):
        """Store a (BLOCK_M, BLOCK_N) tile at (row, col) through a descriptor of SPLIT-th blocks."""
        tl.static_assert((SPLIT == 1) | (SPLIT == 2), "EPILOGUE_SPLIT is 1 or 2")
        if SPLIT == 1:
            c_desc.store([row, col], tile)
        else:  # (BLOCK_M, BLOCK_N) -> its left and right halves
            left, right = tl.split(tl.permute(tl.reshape(tile, (BLOCK_M, 2, BLOCK_N // 2)),
                                              (0, 2, 1)))
            c_desc.store([row, col], left)
            c_desc.store([row, col + BLOCK_N // 2], right)

    @triton.jit
    def _decode_moment(codes_ptr, scale_ptr, rows, cols, row_mask, BITS: tl.constexpr,
                       SIGNED: tl.constexpr, V_MAP: tl.constexpr, BLOCK: tl.constexpr):
        """(ROWS, BLOCK) fp32 moment from its codes: qgpt.decode_state's arithmetic."""
        if BITS == 8:
            q = tl.load(codes_ptr + rows[:, None] * BLOCK + cols[None, :], mask=row_mask[:, None],
                        other=0)
        else:  # two codes a byte, element 2j in the low nibble of byte j
            half = tl.arange(0, BLOCK // 2)
            packed = tl.load(codes_ptr + rows[:, None] * (BLOCK // 2) + half[None, :],
                             mask=row_mask[:, None], other=0)
            q = tl.reshape(tl.join(packed & 15, packed >> 4), (rows.shape[0], BLOCK))
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
        q = q.to(tl.float32)
        if SIGNED:
            return (q - 2.0 ** (BITS - 1)) * scale
        x = (q + (0.0 if V_MAP == 0 else 1.0)) * scale  # zero-free maps: code c is (c + 1) * scale
        return x * x if V_MAP == 2 else x

    @triton.jit
    def _encode_moment(x, codes_ptr, scale_ptr, rows, cols, row_mask, BITS: tl.constexpr,
                       SIGNED: tl.constexpr, V_MAP: tl.constexpr, BLOCK: tl.constexpr):
        """Store qgpt.encode_state's codes and per-block scales of the (ROWS, BLOCK) moment x."""
        if SIGNED:  # symmetric absmax codes, offset by 2^(b-1) into unsigned
            qmax = 2.0 ** (BITS - 1) - 1
            scale = _scale(_absmax(x, 1), 1e-30, qmax)
            q = _codes(x, scale[:, None], qmax).to(tl.int32) + 2 ** (BITS - 1)
        else:  # v >= 0: all 2^b levels on [0, max] (linear), up one step (zero-free), or of sqrt(v)
            u = tl.sqrt_rn(x) if V_MAP == 2 else x
            offset = 0.0 if V_MAP == 0 else 1.0
            levels = 2.0 ** BITS - 1
            scale = _scale(_absmax(u, 1), 1e-30, levels + offset)
            t = _round_half_even(tl.math.div_rn(u, scale[:, None])) - offset
            q = tl.minimum(tl.maximum(t, 0.0), levels).to(tl.int32)
        tl.store(scale_ptr + rows, scale, mask=row_mask)
        if BITS == 8:
            tl.store(codes_ptr + rows[:, None] * BLOCK + cols[None, :], q.to(tl.uint8),
                     mask=row_mask[:, None])
        else:
            low, high = tl.split(tl.reshape(q, (rows.shape[0], BLOCK // 2, 2)))
            half = tl.arange(0, BLOCK // 2)
            tl.store(codes_ptr + rows[:, None] * (BLOCK // 2) + half[None, :],
                     (low | (high << 4)).to(tl.uint8), mask=row_mask[:, None])

    @triton.jit
    def adamw_lowbit_kernel(
            p_ptr, g_ptr, m_codes_ptr, m_scale_ptr, v_codes_ptr, v_scale_ptr,  # pointers
            n, n_blocks,  # elements, blocks of BLOCK elements (the last one padded)
            decay, w1, c2, beta2, neg_step_size, bias_correction2_sqrt, eps,  # the step's scalars
            M_BITS: tl.constexpr, V_BITS: tl.constexpr, V_MAP: tl.constexpr,
            SMALL_W1: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        # One pass over memory: a program takes ROWS blocks of BLOCK elements (one scale each),
        # loads the parameter, the gradient and both moments' codes, decodes, does the AdamW
        # update in fp32, and re-encodes the moments with their new block absmax. Operations in
        # QAdamW's order, with fused multiply-adds where PyTorch's lerp_ and addcmul_ have them.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_mask = rows < n_blocks
        idx = rows[:, None] * BLOCK + cols[None, :]
        mask = idx < n
        p = tl.load(p_ptr + idx, mask=mask, other=0.0)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        m = _decode_moment(m_codes_ptr, m_scale_ptr, rows, cols, row_mask, M_BITS, True, V_MAP,
                           BLOCK)
        v = _decode_moment(v_codes_ptr, v_scale_ptr, rows, cols, row_mask, V_BITS, False, V_MAP,
                           BLOCK)
        p = p * decay  # p.mul_(1 - lr * wd)
        if SMALL_W1:  # m.lerp_(g, w1), PyTorch's two branches
            m = tl.fma(w1, g - m, m)
        else:
            m = tl.fma(w1 - 1.0, g - m, g)
        v = tl.fma(c2 * g, g, v * beta2)  # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = p + tl.math.div_rn(neg_step_size * m, denom)  # p.addcdiv_(m, denom, value=-step_size)
        tl.store(p_ptr + idx, p, mask=mask)
        m = tl.where(mask, m, 0.0)  # the padding of the last block encodes zeros, as encode_state's
        v = tl.where(mask, v, 0.0)
        _encode_moment(m, m_codes_ptr, m_scale_ptr, rows, cols, row_mask, M_BITS, True, V_MAP,
                       BLOCK)
        _encode_moment(v, v_codes_ptr, v_scale_ptr, rows, cols, row_mask, V_BITS, False, V_MAP,
                       BLOCK)


# ----------------------------------------------------------------------------------------------
# Launch plans and launchers. A plan function checks a launch's inputs, allocates its outputs (on
# their device: nothing on the meta device) and picks everything the launch needs, from the
# shapes, dtypes and strides and from the GPU: kernel, block sizes, stages, warps, grid, compile
# options. It returns (outputs, Launch); the launcher runs the Launch and picks nothing itself.
# `python -m tools.gate` calls the same plan functions with meta tensors and a GPU of GPUS and
# compiles each Launch for that GPU, with no GPU: so a plan is known to fit before a GPU runs it.

class GPU(NamedTuple):
    """What a plan needs to know of a GPU."""
    name: str  # its table: sm90 (Hopper and later), sm80 (A100) or sm89 (smaller Ampere, Ada)
    capability: tuple  # (major, minor)
    shared_memory: int  # bytes of shared memory one block may ask for (the opt-in limit)
    sms: int  # streaming multiprocessors: the persistent kernel runs one program on each


GPUS = {  # the architectures the tables cover and the compile gate checks
    "sm90": GPU("sm90", (9, 0), 232448, 132),  # H100, H200
    "sm80": GPU("sm80", (8, 0), 166912, 108),  # A100
    "sm89": GPU("sm89", (8, 9), 101376, 128),  # RTX 40xx, L4, L40; RTX 30xx and A10 (sm86) alike
}
_GPU_OF = {}


def gpu_of(device):
    """The GPU of a CUDA device, with its own limits; None elsewhere (the interpreter's plans).
    Its table: sm90 for Hopper, sm80 for the A100, sm89 for the other sm8x cards; a newer GPU gets
    the table its shared memory suits, and a line saying the compile gate has not checked it."""
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _GPU_OF:
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        if capability < (8, 0):
            raise ValueError(f"the int8 kernels need int8 tensor cores (sm80 or later), not "
                             f"sm{props.major}{props.minor}: use the sim backend")
        # the limit Triton itself checks a launch against
        shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
        name = {9: "sm90", 8: "sm80" if capability == (8, 0) else "sm89"}.get(props.major)
        if name is None:
            name = "sm90" if shared >= GPUS["sm90"].shared_memory else "sm89"
            print(f"kernels: sm{props.major}{props.minor} runs the {name} table, fitted to its "
                  f"{shared:,} B of shared memory; the compile gate has not checked it")
        _GPU_OF[index] = GPU(name, capability, shared, props.multi_processor_count)
    return _GPU_OF[index]


class Launch(NamedTuple):
    """One launch: kernel[grid](*args, **meta); meta holds the constexprs and compile options.
    scratch: the kernel makes tensor descriptors on the device, which need scratch memory."""
    kernel: object
    grid: tuple
    args: tuple
    meta: dict
    scratch: bool = False

    def __call__(self):
        if self.scratch and self.args[0].is_cuda:  # the allocator is per thread (the backward
            triton.set_allocator(_scratch)  # runs in autograd's): set it for each launch
        return self.kernel[self.grid](*self.args, **self.meta)


# Compile options of every GPU launch. No multiply-add is contracted into an fma behind our back:
# the epilogues and the AdamW update then round exactly as their PyTorch references (explicit
# tl.fma calls stay fused).
EXACT = dict(enable_fp_fusion=False)


def _check_launchable(*tensors):
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton, or use the references")
    if tensors[0].device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1, set before "
                           "kernels.py is imported")


# quantize_dual: ROW_ELEMENTS per row tile (BLOCK_K columns x ROW_TILE rows), column tiles of
# BLOCK_N columns read BLOCK_M rows at a time: 32 fp32 values a thread at 8 warps, no shared
# memory beyond the reductions', on every GPU. The interpreter's are smaller than most test
# shapes, so that the tests run the multi-pass and ragged paths.
QUANTIZE_BLOCKS = {
    "gpu": dict(BLOCK_K=4096, ROW_ELEMENTS=8192, BLOCK_M=64, BLOCK_N=128, warps=8),
    "interpreter": dict(BLOCK_K=64, ROW_ELEMENTS=1024, BLOCK_M=16, BLOCK_N=32, warps=4)}


def quantize_dual_plan(x, bits=8, absmax_floor=1e-5, token_group=0, rows=True, columns=True,
                       gpu=None):
    """quantize_dual's outputs, allocated, and its Launch (None for an empty x) on `gpu`."""
    _check_launchable(x)
    M, K = x.shape
    group, n_groups = token_groups(M, token_group)
    blocks = QUANTIZE_BLOCKS["interpreter" if gpu is None else "gpu"]
    block_k = min(triton.next_power_of_2(max(K, 1)), blocks["BLOCK_K"])
    row_tile = max(1, blocks["ROW_ELEMENTS"] // block_k)
    row_items = triton.cdiv(group, row_tile) if rows else 0
    col_items = triton.cdiv(K, blocks["BLOCK_N"]) if columns else 0
    lag = 1 if rows and columns else 0

    def empty(shape, dtype, wanted):
        return torch.empty(shape if wanted else (0,), dtype=dtype, device=x.device)
    row_codes, row_scale = empty((M, K), torch.int8, rows), empty((M, 1), torch.float32, rows)
    colt_codes = empty((K, M), torch.int8, columns)
    col_scale = empty((n_groups, K), torch.float32, columns)
    outputs = ((row_codes, row_scale) if rows else None,
               (colt_codes, col_scale) if columns else None)
    if M * K == 0:
        return outputs, None
    args = (x, row_codes, row_scale, colt_codes, col_scale, M, K, x.stride(0), x.stride(1), group,
            n_groups, row_items, col_items, lag, float(2 ** (bits - 1) - 1), absmax_floor)
    meta = dict(ROW_TILE=row_tile, BLOCK_K=block_k, SINGLE_PASS=block_k >= K,
                BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], ROWS=rows, COLUMNS=columns,
                num_warps=blocks["warps"], **({} if gpu is None else EXACT))
    return outputs, Launch(quantize_dual_kernel, ((n_groups + lag) * (row_items + col_items),),
                           args, meta)


def quantize_dual(x, bits=8, absmax_floor=1e-5, token_group=0, rows=True, columns=True):
    """Triton: quantize_dual_reference's (rows, columns) of x (M, K), any strides, one launch.

    The schedule: J = ceil(M / token_group) groups; block s of programs holds the row tiles of
    group s and the column tiles of group s - 1, so each group's column tiles run just after its
    row tiles and read it again from L2, not from memory.
    """
    outputs, launch = quantize_dual_plan(x, bits, absmax_floor, token_group, rows, columns,
                                         gpu_of(x.device))
    if launch is not None:
        launch()
    return outputs


def quantize_rows(x, bits=8, absmax_floor=1e-5):
    """Triton: (M, K) float -> int8 codes (M, K), fp32 scale (M, 1). Any strides."""
    return quantize_dual(x, bits, absmax_floor, rows=True, columns=False)[0]


# int8_matmul's tiles: (M, N, K) -> (kernel, BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps), a
# table per architecture. sm90: the fastest of 15 configurations at GPT-2 small's shapes on an
# H100 (run 4: the kernels before, bf16 outputs and one K-group; the dW shape 3072 x 768 x 16384
# was fastest on the pointer kernel). sm80 and sm89: no GPU has measured them yet: the default
# tile. `python kernels.py --tune` measures the table of the GPU it runs on. Other shapes take the
# architecture's default tile (small tiles below SMALL_MATMUL). Either way, _fit_tile then makes
# the tile fit the launch (it may change warps, tiles, stages: the gate compiles the result).
MATMUL_TABLES = {
    "sm90": {
        (16384, 2304, 768): ("tma", 128, 128, 256, 3, 8),
        (16384, 3072, 768): ("tma", 128, 256, 128, 3, 8),
        (16384, 768, 3072): ("tma", 128, 256, 128, 3, 8),
        (3072, 768, 16384): ("pointer", 128, 128, 64, 5, 4),
        (16384, 50304, 768): ("tma", 256, 128, 128, 3, 8),
        (4096, 3072, 768): ("tma", 128, 128, 128, 5, 4),
        (8192, 8192, 8192): ("tma", 128, 256, 128, 3, 8),
    },
    "sm80": {},
    "sm89": {},
}
MATMUL_DEFAULT = {  # (large, small)
    "sm90": (("tma", 128, 256, 128, 3, 8), ("tma", 64, 64, 64, 3, 4)),
    "sm80": (("pointer", 128, 128, 64, 4, 8), ("pointer", 64, 64, 64, 3, 4)),
    "sm89": (("pointer", 128, 128, 64, 3, 8), ("pointer", 64, 64, 64, 3, 4)),
}
SMALL_MATMUL = 2 ** 28  # M * N * K below this: small tiles
# Registers, measured by the compile gate: the int32 accumulator's values a thread holds,
# BLOCK_M x BLOCK_N / (32 x warps), that fit 255 registers beside the pipeline's. Hopper's wgmma
# reads A and B from shared memory; Ampere's mma.sync holds them in registers too. A K-grouped
# loop keeps the fp32 sums as well: half as many.
ACC_PER_THREAD = {"sm90": 128, "sm80": 64, "sm89": 64}
LOADS_PER_THREAD = 32  # int8 elements of A and B a thread loads a stage where strides are ragged


def matmul_entry(M, N, K, gpu):
    """The table's (or the default) entry of a shape on a GPU."""
    table, (large, small) = MATMUL_TABLES[gpu.name], MATMUL_DEFAULT[gpu.name]
    return table.get((M, N, K), small if M * N * K < SMALL_MATMUL else large)


def _fit_tile(kernel, bm, bn, bk, stages, warps, out_bytes, grouped, aligned, gpu):
    """A tile made to fit its launch and GPU, each step measured by the compile gate; returns
    (kernel, BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, EPILOGUE_SPLIT):
     1. no TMA below sm90;
     2. registers: at most ACC_PER_THREAD[gpu] accumulator values a thread (half if K-grouped):
        more warps (up to 8), then narrower tiles;
     3. ragged strides (a row stride or address not a multiple of 16 bytes) load element by
        element, a pointer each: BLOCK_K (down to 32), then the tile's wider side, cut to
        LOADS_PER_THREAD elements a thread a stage;
     4. shared memory: a 4-byte output leaves the TMA kernel in two halves; then stages (down to
        2), then BLOCK_K (down to 32) are cut until matmul_shared_memory fits the GPU."""
    if gpu.capability < (9, 0):
        kernel = "pointer"
    budget = ACC_PER_THREAD[gpu.name] // (2 if grouped else 1)
    while bm * bn // (32 * warps) > budget:
        if warps < 8:
            warps *= 2
        elif bn >= bm:
            bn //= 2
        else:
            bm //= 2
    while not aligned and (bm + bn) * bk // (32 * warps) > LOADS_PER_THREAD:
        if bk > MIN_K_GROUP:
            bk //= 2
        elif max(bm, bn) > 64:  # then the wider side of the tile
            bm, bn = (bm, bn // 2) if bn >= bm else (bm // 2, bn)
        else:
            break
    split = 2 if kernel == "tma" and out_bytes == 4 else 1
    while matmul_shared_memory(kernel, bm, bn, bk, stages, out_bytes, split, gpu) > \
            gpu.shared_memory:
        if stages > 2:
            stages -= 1
        elif bk > 32:
            bk //= 2
        else:
            break  # nothing left to cut: the compile gate reports it
    return kernel, bm, bn, bk, stages, warps, split


def matmul_shared_memory(kernel, bm, bn, bk, stages, out_bytes, split, gpu):
    """Bytes of shared memory a tile asks for, an estimate 2 KB above what the compile gate
    measures: A's and B's int8 blocks in `stages` buffers (stages - 1 below sm90: the pointer
    kernel's cp.async pipeline), the TMA kernel's staging buffer for one part of C, and the
    barriers (24 to 1,056 B measured)."""
    buffers = stages if gpu.capability >= (9, 0) else stages - 1
    epilogue = bm * bn // split * out_bytes if kernel == "tma" else 0
    return buffers * (bm + bn) * bk + epilogue + 2048


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_ok(a, b, c):
    """TMA needs A and B^T with contiguous rows, 16-byte aligned row strides and base addresses."""
    return (a.stride(1) == 1 and b.stride(0) == 1 and c.stride(1) == 1
            and all(t.data_ptr() % 16 == 0 for t in (a, b, c))
            and a.stride(0) % 16 == 0 and b.stride(1) % 16 == 0
            and (c.stride(0) * c.element_size()) % 16 == 0)


def int8_matmul_plan(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32, k_group=0,
                     use_tma=None, gpu=None):
    """int8_matmul's output, allocated, and its Launch on `gpu` (None: the interpreter's; None
    as well when there is nothing to launch: the output is then already filled)."""
    _check_launchable(a, b)
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.shape[1] != b.shape[0]:
        raise ValueError(f"int8_matmul needs int8 A (M, K) and B (K, N), got {a.dtype} "
                         f"{tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[1]
    group, n_groups = _k_groups(K, k_group)
    dequant = out_dtype != torch.int32
    if not dequant and n_groups > 1:
        raise ValueError(f"int32 output needs one K-group of at most {MAX_K}: the int32 sums "
                         f"could overflow (K = {K}); ask for a float out_dtype")
    if n_groups > 1 and (group & (group - 1) or group < MIN_K_GROUP):
        raise ValueError(f"k_group must be a power of two >= {MIN_K_GROUP}, got {group}")
    a_scale, b_scale = _group_scales(a_scale, n_groups, M), _group_scales(b_scale, n_groups, N)
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M * N == 0:
        return c, None
    if K == 0:
        return (c.zero_() if bias is None else c.copy_(bias.expand(M, N))), None
    bias_arg = a_scale if bias is None else bias.contiguous()  # any pointer without a bias
    if gpu is None:  # the interpreter: small fixed blocks; fewer, longer steps along a long K
        kernel, bm, bn, bk = "pointer", 32, 32, 32 if K <= 256 else 512
        split = 2 if out_dtype.itemsize == 4 else 1  # as on a GPU: the halves are tested too
        meta, sms = dict(GROUP_M=4), 2  # two "SMs"
    else:
        if use_tma and gpu.capability < (9, 0):
            raise ValueError(f"the TMA kernel needs sm90 or later, not sm{gpu.capability[0]}"
                             f"{gpu.capability[1]}")
        entry = matmul_entry(M, N, K, gpu)
        if use_tma is None:  # the kernel first, then the tile is fitted to it
            use_tma = entry[0] == "tma" and gpu.capability >= (9, 0) and _tma_ok(a, b, c)
        aligned = all(s % 16 == 0 for s in (*a.stride(), *b.stride()) if s != 1) and all(
            t.data_ptr() % 16 == 0 for t in (a, b))
        kernel, bm, bn, bk, stages, warps, split = _fit_tile(
            "tma" if use_tma else "pointer", *entry[1:], out_dtype.itemsize, n_groups > 1,
            aligned, gpu)
        meta, sms = dict(GROUP_M=8, num_stages=stages, num_warps=warps, **EXACT), gpu.sms
    if use_tma is None:  # the interpreter: the pointer kernel unless asked
        use_tma = False
    # several groups: BLOCK_K must divide the group (both are powers of two); one: any K
    meta.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(bk, group) if n_groups > 1 else bk,
                DEQUANT=dequant, HAS_BIAS=bias is not None, K_GROUPS=n_groups > 1)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if use_tma:
        return c, Launch(int8_matmul_tma_kernel, (min(sms, tiles),), (
            a, b, c, a_scale, b_scale, bias_arg, M, N, K, group, a.stride(0), b.stride(1),
            c.stride(0)), dict(meta, NUM_SMS=sms, EPILOGUE_SPLIT=split), scratch=True)
    return c, Launch(int8_matmul_kernel, (tiles,), (
        a, b, c, a_scale, b_scale, bias_arg, M, N, K, group, a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), c.stride(0), c.stride(1)), meta)


def int8_matmul(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32, k_group=0,
                use_tma=None):
    """Triton: int8_matmul_reference's C for A (M, K), B (K, N) int8, any strides; K in groups of
    k_group (0: one group; more than one: k_group a power of two, at most MAX_K).

    out_dtype=torch.int32 skips the epilogue and returns the raw int32 sums (one group).
    use_tma=None picks the persistent TMA kernel where the plan's tile says so (sm90 and later)
    and A's rows and B's columns are contiguous (K-major), else the pointer kernel; True/False
    forces one.
    """
    c, launch = int8_matmul_plan(a, a_scale, b, b_scale, bias, out_dtype, k_group, use_tma,
                                 gpu_of(a.device))
    if launch is not None:
        launch()
    return c


V_MAPS = {"linear": 0, "zerofree": 1, "sqrt": 2}


def adamw_lowbit_plan(p, grad, m_state, v_state, m_bits, v_bits, v_map, block_size, step, lr,
                      beta1, beta2, eps, weight_decay, gpu=None):
    """The Launch of adamw_lowbit_step on `gpu` (None: the interpreter's)."""
    _check_launchable(p)
    n = p.numel()
    n_blocks = m_state["scale"].shape[0]
    rows = 4 if gpu is None else 8  # 8 rows of 128 on 8 warps: 4 values a thread, no spills
    w1 = float(torch.tensor(1 - beta1, dtype=torch.float32))  # the fp32 weight lerp_ compares
    args = (p, grad, m_state["codes"], m_state["scale"], v_state["codes"], v_state["scale"], n,
            n_blocks, 1 - lr * weight_decay, 1 - beta1, 1 - beta2, beta2,
            -lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step), eps)
    meta = dict(M_BITS=m_bits, V_BITS=v_bits, V_MAP=V_MAPS[v_map], SMALL_W1=abs(w1) < 0.5,
                BLOCK=block_size, ROWS=rows, **({} if gpu is None else dict(num_warps=8, **EXACT)))
    return Launch(adamw_lowbit_kernel, (triton.cdiv(n_blocks, rows),), args, meta)


def adamw_lowbit_step(p, grad, m_state, v_state, m_bits, v_bits, v_map, block_size, step, lr,
                      beta1, beta2, eps, weight_decay):
    """Triton: one AdamW step of p in place, with 8/4-bit block-wise moments {"codes", "scale"}
    updated in place; qgpt.QAdamW's PyTorch step is the reference. block_size: a power of two."""
    adamw_lowbit_plan(p, grad, m_state, v_state, m_bits, v_bits, v_map, block_size, step, lr,
                      beta1, beta2, eps, weight_decay, gpu_of(p.device))()
    torch.autograd.graph.increment_version(p)  # p changed behind autograd's back: say so


# ----------------------------------------------------------------------------------------------
# The int8 recipe's two operations, on the references or on the kernels.

class ReferenceBackend:
    """qgpt's int8 recipe in plain PyTorch (the simulation): TritonBackend gives the same bits."""
    name = "sim"
    quantize_dual = staticmethod(quantize_dual_reference)
    int8_matmul = staticmethod(int8_matmul_reference)


if triton is not None:  # PyTorch custom operators: torch.compile sees each launcher as one op

    @torch.library.custom_op("qgpt::quantize_dual", mutates_args=())
    def quantize_dual_op(x: torch.Tensor, bits: int, absmax_floor: float, token_group: int,
                         rows: bool, columns: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # an operator returns tensors only: an empty pair for a part not asked for
        none = (x.new_empty((0,), dtype=torch.int8), x.new_empty((0,), dtype=torch.float32))
        row_part, column_part = quantize_dual(x, bits, absmax_floor, token_group, rows, columns)
        return (*(row_part or none), *(column_part or none))

    @quantize_dual_op.register_fake
    def _(x, bits, absmax_floor, token_group, rows, columns):
        M, K = x.shape
        n_groups = token_groups(M, token_group)[1]

        def empty(shape, dtype, wanted):
            return x.new_empty(shape if wanted else (0,), dtype=dtype)
        return (empty((M, K), torch.int8, rows), empty((M, 1), torch.float32, rows),
                empty((K, M), torch.int8, columns), empty((n_groups, K), torch.float32, columns))

    @torch.library.custom_op("qgpt::int8_matmul", mutates_args=())
    def int8_matmul_op(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                       b_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                       k_group: int) -> torch.Tensor:
        return int8_matmul(a, a_scale, b, b_scale, bias, out_dtype, k_group)

    @int8_matmul_op.register_fake
    def _(a, a_scale, b, b_scale, bias, out_dtype, k_group):
        return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


class TritonBackend:
    """qgpt's int8 recipe on the Triton kernels; the same signatures as ReferenceBackend."""
    name = "triton"

    @staticmethod
    def quantize_dual(x, bits, absmax_floor, token_group=0, rows=True, columns=True):
        row_codes, row_scale, colt_codes, col_scale = quantize_dual_op(
            x, bits, absmax_floor, token_group, rows, columns)
        return ((row_codes, row_scale) if rows else None,
                (colt_codes, col_scale) if columns else None)

    @staticmethod
    def int8_matmul(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32, k_group=0):
        return int8_matmul_op(a, a_scale, b, b_scale, bias, out_dtype, k_group)


# ----------------------------------------------------------------------------------------------
# The paper recipe's fp8 forward: torch._scaled_mm (fp8 tensor cores on sm89+), and its reference.

def fp8_matmul_reference(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32):
    """(a @ b^T) * a_scale * b_scale^T (+ bias) in fp32, written in out_dtype: a (M, K) and b
    (N, K) fp8 codes, scales fp32 (1, 1) per tensor or (M, 1) and (N, 1) per row. Products of fp8
    values are exact in fp32; the sums are fp32's, as on the tensor cores."""
    y = (a.float() @ b.float().t()) * a_scale * b_scale.reshape(1, -1)  # (M, N) fp32
    return (y if bias is None else y + bias).to(out_dtype)


FP8_REFERENCE_SHAPES = set()  # (K, N) that fp8_matmul has said run on its reference


def fp8_matmul(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32):
    """fp8_matmul_reference's result from torch._scaled_mm. Scales per tensor on both sides run
    tensor-wise (sm89+), else both row-wise (sm90; bf16 out). A CUDA shape whose K or N is not a
    multiple of 16 (the tensor cores' tile) runs the reference, said once."""
    (M, K), N = a.shape, b.shape[0]
    if a.is_cuda and (K % 16 or N % 16):
        if (K, N) not in FP8_REFERENCE_SHAPES:  # say it once per shape
            FP8_REFERENCE_SHAPES.add((K, N))
            print(f"fp8_matmul: K {K} and N {N} must be multiples of 16 for torch._scaled_mm; "
                  f"its reference runs them")
        return fp8_matmul_reference(a, a_scale, b, b_scale, bias, out_dtype)
    if a_scale.numel() == b_scale.numel() == 1:
        a_scale, b_scale = a_scale.reshape(()), b_scale.reshape(())
    else:  # row-wise: (M, 1) and (1, N)
        a_scale = a_scale.reshape(-1, 1).expand(M, 1).contiguous()
        b_scale = b_scale.reshape(1, -1).expand(1, N).contiguous()
    y = torch._scaled_mm(a, b.t(), a_scale, b_scale, out_dtype=out_dtype)  # (M, N)
    return y if bias is None else y + bias


class Fp8Backend:
    """qgpt's paper recipe with fp8 W and X: its forward matmul on torch._scaled_mm."""
    name = "scaled_mm"
    fp8_matmul = staticmethod(fp8_matmul)


# ----------------------------------------------------------------------------------------------
# python kernels.py: the check, then (GPU) the benchmark tables; --tune: the matmul table.

CHECK_SHAPES = [(1, 1, 1), (37, 70, 19), (130, 96, 67), (200, 300, 80)]  # (M, K, N)
CHECK_SHAPES_GPU = [(4096, 768, 3072)]  # on a GPU as well


def check_cases(device, gpu=None):
    """What check() compares: (name, launcher, args, kwargs, reference) for each kernel launch,
    the reference a function of no arguments. `gpu`: the GPU whose plans run (TMA from sm90)."""
    torch.manual_seed(0)
    tma = gpu is None or gpu.capability >= (9, 0)
    for M, K, N in CHECK_SHAPES + (CHECK_SHAPES_GPU if gpu is not None else []):
        x = torch.randn(M, K, device=device) * torch.rand(M, 1, device=device) * 3
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=device)
        b = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=device).t()  # K-major B
        a_scale, b_scale = torch.rand(M, device=device), torch.rand(N, device=device)
        shape = f"{M}x{K}x{N}"
        for group in (0, 64):
            yield (f"quantize_dual {M}x{K} group {group}", quantize_dual, (x,),
                   dict(token_group=group),
                   lambda x=x, g=group: quantize_dual_reference(x, 8, 1e-5, g))
        matmul = (a, a_scale, b, b_scale)
        yield (f"int8_matmul int32 {shape}", int8_matmul, matmul, dict(out_dtype=torch.int32),
               lambda m=matmul: int8_matmul_reference(*m, out_dtype=torch.int32))
        # the epilogue: the same fp32 operations in the same order: exact
        yield (f"int8_matmul epilogue {shape}", int8_matmul, matmul, {},
               lambda m=matmul: int8_matmul_reference(*m))
        if K > 32:  # K in groups of 32, scales per group
            groups = -(-K // 32)
            grouped = (a, torch.rand(groups, M, device=device), b,
                       torch.rand(groups, N, device=device))
            yield (f"int8_matmul 32-groups {shape}", int8_matmul, grouped, dict(k_group=32),
                   lambda m=grouped: int8_matmul_reference(*m, k_group=32))
        c = torch.empty(M, N, device=device)
        if tma and _tma_ok(a, b, c) and _tma_ok(a, b, c.int()):  # where its layout allows
            yield (f"int8_matmul tma epilogue {shape}", int8_matmul, matmul, dict(use_tma=True),
                   lambda m=matmul: int8_matmul_reference(*m))


def check(device):
    """Every kernel against its reference, exact where the math is exact; prints each comparison."""
    ok = True
    gpu = gpu_of(torch.device(device))
    for name, launcher, args, kwargs, reference in check_cases(device, gpu):
        got, want = launcher(*args, **kwargs), reference()
        if launcher is quantize_dual:  # ((row codes, scales), (column codes, scales))
            parts = ["row codes", "row scales", "column codes", "column scales"]
            for part, g, w in zip(parts, [*got[0], *got[1]], [*want[0], *want[1]]):
                ok &= compare(f"{name} {part}", g, w)
        else:
            ok &= compare(name, got, want)
    return ok


BENCH_SHAPES = [(16384, 768, 2304), (16384, 768, 3072), (16384, 3072, 768), (3072, 16384, 768),
                (16384, 768, 50304), (8192, 8192, 8192)]  # (M, K, N)


def benchmark():
    """Every matmul path at GPT-2 shapes, in one run; then the quantizers' bandwidth."""
    from triton.testing import do_bench
    props = torch.cuda.get_device_properties(0)
    hopper = gpu_of(torch.device("cuda")).capability >= (9, 0)  # TMA: sm90 and later
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}; Y[M,N] = "
          f"X[M,K] @ W[K,N], operands K-major; TFLOP/s (bf16, fp8) or TOP/s (int8), median")
    print(f"{'M':>6} {'K':>6} {'N':>6} | {'bf16':>5} {'_int_mm':>7} {'fp8':>5} {'ptr':>5} "
          f"{'tma':>5} | {'ptr/bf16':>8} {'tma/bf16':>8}")
    for M, K, N in BENCH_SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        wt = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        w = wt.t()  # (K, N), K-major, as a Linear's weight
        a, a_scale = quantize_rows(x)
        bt, b_scale = quantize_rows(wt)
        b = bt.t()

        def rate(fn):
            return 2 * M * N * K / do_bench(fn, return_mode="median") / 1e9
        t_bf16 = rate(lambda: x @ w)
        t_int = rate(lambda: torch._int_mm(a, b))
        try:
            x8, w8 = x.to(torch.float8_e4m3fn), wt.to(torch.float8_e4m3fn).t()
            one = torch.ones((), device="cuda")
            t_fp8 = rate(lambda: torch._scaled_mm(x8, w8, one, one, out_dtype=torch.bfloat16))
        except (RuntimeError, AttributeError):
            t_fp8 = float("nan")
        t_ptr = rate(lambda: int8_matmul(a, a_scale, b, b_scale, None, torch.bfloat16,
                                         use_tma=False))
        t_tma = rate(lambda: int8_matmul(a, a_scale, b, b_scale, None, torch.bfloat16,
                                         use_tma=True)) if hopper else float("nan")
        print(f"{M:>6} {K:>6} {N:>6} | {t_bf16:5.0f} {t_int:7.0f} {t_fp8:5.0f} {t_ptr:5.0f} "
              f"{t_tma:5.0f} | {t_ptr / t_bf16:8.2f} {t_tma / t_bf16:8.2f}", flush=True)
    print("quantize_dual: TB/s counts x read once and both codes written once")
    compiled_rows = torch.compile(quantize_rows_reference)
    for M, K in [(16384, 768), (16384, 3072)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        for name, fn, moved in [
                ("rows", lambda: quantize_rows(x), 3),
                ("rows + columns, groups of 1024", lambda: quantize_dual(x, token_group=1024), 4),
                ("reference rows (compiled)", lambda: compiled_rows(x), 3)]:
            ms = do_bench(fn, return_mode="median")
            print(f"  {name:32s} {M}x{K} bf16: {ms * 1e3:6.1f} us, "
                  f"{x.numel() * moved / ms / 1e9:5.2f} TB/s", flush=True)


def matmul_shapes(widths=(768, 1024, 1280, 1600), tokens=16384, token_group=1024):
    """The int8 matmuls of a training step of GPT-2's four Linears at these widths, as training
    asks for them: (M, N, K, out_dtype, k_group). Forward outputs bf16 (autocast); dX comes out
    in X's dtype: fp32 where X is LayerNorm's output (c_attn, c_fc), bf16 where it is attention's
    or GELU's (the two c_proj); dW fp32 (the weights), summed over tokens in token groups.
    (tools/gate.py records a real step's calls, and a test holds this list to them.)"""
    bf16, fp32 = torch.bfloat16, torch.float32
    shapes = []
    for d in widths:
        for n_in, n_out, x_dtype in [(d, 3 * d, fp32), (d, d, bf16), (d, 4 * d, fp32),
                                     (4 * d, d, bf16)]:
            shapes += [(tokens, n_out, n_in, bf16, 0), (tokens, n_in, n_out, x_dtype, 0),
                       (n_out, n_in, tokens, fp32, token_group)]
    return sorted(set(shapes), key=str)


def tune():
    """Time both matmul kernels over a grid of tiles at GPT-2's shapes, each shape with the
    output dtypes and K-groups training asks for (matmul_shapes), summed; print the fastest of
    each as this GPU's MATMUL_TABLES entry. A tile is timed as the plan fits it (_fit_tile), and
    only if it compiled without spills and fits this GPU's shared memory: the table never holds
    an entry the compile gate rejects."""
    from triton.testing import do_bench
    gpu = gpu_of(torch.device("cuda"))
    table = MATMUL_TABLES[gpu.name]
    grid = [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 256, 128, 4, 8),
            (128, 128, 256, 3, 8), (128, 128, 128, 4, 4), (128, 128, 64, 5, 4),
            (64, 256, 128, 4, 4), (128, 64, 128, 4, 4), (128, 128, 64, 4, 8)]
    kinds = ("tma", "pointer") if gpu.capability >= (9, 0) else ("pointer",)
    by_shape = {}
    for M, N, K, out_dtype, k_group in matmul_shapes():
        by_shape.setdefault((M, N, K), []).append((out_dtype, k_group))
    print(f"MATMUL_TABLES[\"{gpu.name}\"] = {{")
    for (M, N, K), variants in by_shape.items():
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda").t()
        timed, seen = [], set()
        for entry in [(kind, *blocks) for kind in kinds for blocks in grid]:
            table[(M, N, K)] = entry
            total, launches = 0.0, []
            for out_dtype, k_group in variants:
                J = _k_groups(K, k_group)[1]
                sa, sb = torch.rand(J, M, device="cuda"), torch.rand(J, N, device="cuda")
                launches.append(int8_matmul_plan(a, sa, b, sb, None, out_dtype, k_group, None,
                                                 gpu)[1])
            fitted = repr([(launch.kernel.__name__, sorted(launch.meta.items()))
                           for launch in launches])
            if fitted in seen:  # another entry that fits to the same launches
                continue
            seen.add(fitted)
            for launch in launches:
                try:
                    compiled = launch()
                except Exception as e:  # e.g. out of shared memory on this GPU
                    print(f"    # {(M, N, K)} {entry}: {type(e).__name__}")
                    total = math.inf
                    break
                if compiled.n_spills or compiled.metadata.shared > gpu.shared_memory:
                    print(f"    # {(M, N, K)} {entry}: {compiled.n_spills} spills, "
                          f"{compiled.metadata.shared} B of shared memory")
                    total = math.inf
                    break
                total += do_bench(launch, warmup=5, rep=20)
            if total < math.inf:
                timed.append((total, entry))
        if not timed:
            print(f"    # {(M, N, K)}: no configuration ran")
            table.pop((M, N, K))
            continue
        ms, best = min(timed)
        table[(M, N, K)] = best
        print(f"    ({M}, {N}, {K}): {best},  # {len(variants) * 2 * M * N * K / ms / 1e9:.0f} "
              f"TOP/s over {len(variants)} launches", flush=True)
    print("}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if triton is None:
        print("triton is not installed: pip install triton")
        return 1
    if not torch.cuda.is_available():
        if "--tune" in argv:
            print("--tune needs a CUDA GPU")
            return 1
        if os.environ.get("TRITON_INTERPRET") != "1":  # before the kernels are defined
            print("no CUDA GPU: checking the kernels under Triton's interpreter (no benchmark)")
            os.execve(sys.executable, [sys.executable, __file__, *argv],
                      {**os.environ, "TRITON_INTERPRET": "1"})
        ok = check("cpu")
        print("every kernel matches its reference" if ok else
              "SOME KERNELS DIFFER from their references (see above)")
        return 0 if ok else 1
    if "--tune" in argv:
        tune()
        return 0
    if not check("cuda"):
        print("SOME KERNELS DIFFER from their references (see above)")
        return 1
    print("every kernel matches its reference")
    benchmark()
    return 0


if __name__ == "__main__":
    sys.exit(main())
