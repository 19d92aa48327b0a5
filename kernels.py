"""
kernels.py: Triton kernels for qgpt's int8 path, each beside a plain PyTorch reference.

    python kernels.py                  # GPU: correctness check, then the benchmark tables
                                       # CPU: says so, checks the kernels under Triton's interpreter
    python -m pytest test_qgpt.py -k "kernel or triton or fused_adam"   # compiled on a GPU, else interpreted

How it works:
 1. `quantize_rows`: one program per row reads the row once, takes its absmax, and writes int8
    codes and one fp32 scale: exactly qgpt.quantize(x, bits, "row") (same IEEE division, same
    round-half-to-even, clamp before the cast, NaN -> code 0 and a NaN scale).
 2. `quantize_columns` / `quantize_rows_and_columns`: column scales need every row, so the tensor is
    cut into tiles of ROWS x BLOCK_N over many programs. Pass 1 writes each tile's partial column
    (and row) maxima; PyTorch reduces those small tensors to the scales; pass 2 reads the tiles again
    and writes the codes, the column codes as the rows of X^T, K-major for dW = G^T X. The dual
    version gives both quantizations of X or G in two passes over it instead of three.
 3. `int8_matmul`: C = (A @ B) * a_scale[:, None] * b_scale[None, :] (+ bias). The int8 products are
    summed in int32 on tensor cores; the scales factor out of the sum because each runs along a
    dimension the sum does not cover (the `int8` recipe in qgpt.py), so they are applied once, in
    the epilogue, with the bias. A persistent kernel with tensor descriptors (TMA) serves K-major
    operands, a pointer kernel any strides. int32 holds the sum only for K < 2^17 (all codes -128:
    2^31 at K = 2^17); longer K is cut into chunks of MAX_K = 65,536 whose sums are added in fp32.
 4. `adamw_lowbit_step`: one AdamW step with 8/4-bit block-wise moments in one pass over memory
    (decode, update in fp32, new block absmax, encode); qgpt.QAdamW's PyTorch step is its reference.
 5. `TritonBackend` exposes them with qgpt.SimBackend's signatures, as PyTorch custom operators so
    that the int8 recipe traces with torch.compile(fullgraph=True).
Block sizes: autotuned on a GPU; fixed in Python under the interpreter (no driver there).
"""

import math
import os
import sys

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # qgpt.py still runs; the Triton backend reports itself unavailable
    triton = tl = None


# ----------------------------------------------------------------------------------------------
# References: plain PyTorch, same signatures as the kernels below.

def quantize_rows_reference(x, bits=8, absmax_floor=1e-5):
    """(M, K) float -> int8 codes (M, K), fp32 scale (M, 1); symmetric, one scale per row."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = absmax_scale(xf.abs().amax(dim=1, keepdim=True), absmax_floor, qmax)  # (M, 1) fp32
    codes = torch.round(xf / scale).clamp(-qmax - 1, qmax).nan_to_num(0.0).to(torch.int8)  # clamp, then cast
    return codes, scale


def absmax_scale(absmax, absmax_floor, qmax):
    """qgpt.quantize's scale: max(absmax, floor) / qmax (amax keeps NaN). A tensor divisor, as CUDA
    divides by a Python number through its reciprocal, 1 ulp off IEEE division."""
    absmax = absmax.clamp(min=absmax_floor)
    return absmax / torch.full_like(absmax, qmax)


def quantize_columns_reference(x, bits=8, absmax_floor=1e-5):
    """(M, N) float -> int8 codes (M, N), fp32 scale (1, N); one scale per column."""
    codes, scale = quantize_rows_reference(x.t(), bits, absmax_floor)
    return codes.t(), scale.t()


def int8_matmul_reference(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32):
    """(A @ B) * a_scale[:, None] * b_scale[None, :] + bias; A (M, K), B (K, N) int8.

    out_dtype=torch.int32 returns the raw int32 sums. float64 holds them exactly (|sum| < 2^53).
    """
    acc = a.double() @ b.double()  # (M, N) exact integer sums
    if out_dtype == torch.int32:
        if acc.abs().max() >= 2 ** 31:
            raise ValueError("the int32 sums overflow: ask for a float out_dtype")
        return acc.to(torch.int32)
    out = acc.float() * a_scale.view(-1, 1).float() * b_scale.view(1, -1).float()
    return (out if bias is None else out + bias.float()).to(out_dtype)


def compare(name, actual, expected, rtol=0.0, atol=0.0):
    """Print and return whether two tensors are exact, close (within rtol/atol), or differ."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.shape != expected.shape:
        print(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
        return False
    diff = (actual.double() - expected.double()).abs()
    max_diff = diff.max().item() if diff.numel() else 0.0
    exact = torch.equal(actual, expected)
    close = exact or bool((diff <= atol + rtol * expected.double().abs()).all())
    print(f"{name}: {'exact' if exact else 'close' if close else 'DIFFERENT'}, max |diff| {max_diff:.3g}")
    return close


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
        """int8 codes of x at one scale: qgpt.quantize's arithmetic, a NaN (x or scale) gives code 0."""
        # div_rn: IEEE division, as torch does; Triton's `/` on fp32 is approximate on GPUs.
        t = _round_half_even(tl.math.div_rn(x, scale))
        q = tl.minimum(tl.maximum(t, -qmax - 1.0), qmax)  # clamp before the cast; min/max drop NaN, so:
        return tl.where(t == t, q, 0.0).to(tl.int8)

    @triton.jit
    def _absmax(x, axis):
        """max |x| along axis, NaN if any element is NaN (tl.max alone skips NaN, torch.amax does not)."""
        has_nan = tl.max((x != x).to(tl.int32), axis=axis)
        return tl.where(has_nan > 0, float("nan"), tl.max(tl.abs(x), axis=axis))

    @triton.jit
    def _scale(absmax, absmax_floor, qmax):
        """absmax.clamp(min=floor) / qmax, as qgpt.quantize: a NaN absmax stays NaN."""
        return tl.math.div_rn(tl.where(absmax < absmax_floor, absmax_floor, absmax), qmax)

    # SEAM: kernel_quantize
    @triton.jit
    def quantize_rows_kernel(
            x_ptr, codes_ptr, scale_ptr,  # pointers
            M, K,  # sizes
            stride_xm, stride_xk, stride_cm, stride_ck,  # strides
            qmax, absmax_floor,  # quantizer
            BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr):  # meta-parameters
        row = tl.program_id(0)
        offs_k = tl.arange(0, BLOCK_K)
        x_row = x_ptr + row * stride_xm
        c_row = codes_ptr + row * stride_cm
        if SINGLE_PASS:  # the whole row fits in one block: one read, one write
            mask = offs_k < K
            x = tl.load(x_row + offs_k * stride_xk, mask=mask, other=0.0).to(tl.float32)
            scale = _scale(_absmax(x, 0), absmax_floor, qmax)
            tl.store(c_row + offs_k * stride_ck, _codes(x, scale, qmax), mask=mask)
        else:
            absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = k0 + offs_k < K
                x = tl.load(x_row + (k0 + offs_k) * stride_xk, mask=mask, other=0.0).to(tl.float32)
                absmax = tl.where((x != x) | (absmax != absmax), float("nan"), tl.maximum(absmax, tl.abs(x)))
            scale = _scale(_absmax(absmax, 0), absmax_floor, qmax)
            for k0 in range(0, K, BLOCK_K):
                mask = k0 + offs_k < K
                x = tl.load(x_row + (k0 + offs_k) * stride_xk, mask=mask, other=0.0).to(tl.float32)
                tl.store(c_row + (k0 + offs_k) * stride_ck, _codes(x, scale, qmax), mask=mask)
        tl.store(scale_ptr + row, scale)

    # SEAM: kernel_quantize
    @triton.jit
    def absmax_partials_kernel(
            x_ptr, col_part_ptr, row_part_ptr,  # x (M, N); partial maxima (grid_m, N) and (M, grid_n)
            M, N, stride_xm, stride_xn,
            ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_ROWS: tl.constexpr):
        # Pass 1 of the column (and dual) quantizer: a (ROWS, BLOCK_N) tile per program, so a tall
        # tensor is spread over many programs; each writes its columns' max |x| over its ROWS rows
        # (and, for the dual quantizer, each row's max over its BLOCK_N columns).
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_max = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(pid_m * ROWS, pid_m * ROWS + ROWS, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
            x = x.to(tl.float32)
            tile_max = _absmax(x, 0)
            col_max = tl.where((tile_max != tile_max) | (col_max != col_max), float("nan"),
                               tl.maximum(col_max, tile_max))
            if WITH_ROWS:
                tl.store(row_part_ptr + offs_m * tl.num_programs(1) + pid_n, _absmax(x, 1), mask=offs_m < M)
        tl.store(col_part_ptr + pid_m * N + offs_n, col_max, mask=offs_n < N)

    # SEAM: kernel_quantize
    @triton.jit
    def quantize_tiles_kernel(
            x_ptr, col_scale_ptr, colt_codes_ptr, row_scale_ptr, row_codes_ptr,
            M, N, stride_xm, stride_xn, qmax,
            ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_ROWS: tl.constexpr):
        # Pass 2: the same tiles read again, codes written with the finished scales. Column codes go
        # to X^T (N, M), rows contiguous, so dW = G^T X reads both operands K-major.
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_scale = tl.load(col_scale_ptr + offs_n, mask=offs_n < N, other=1.0)
        for m0 in range(pid_m * ROWS, pid_m * ROWS + ROWS, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
            x = x.to(tl.float32)
            tl.store(colt_codes_ptr + offs_n[None, :] * M + offs_m[:, None], _codes(x, col_scale[None, :], qmax),
                     mask=mask)
            if WITH_ROWS:
                row_scale = tl.load(row_scale_ptr + offs_m, mask=offs_m < M, other=1.0)
                tl.store(row_codes_ptr + offs_m[:, None] * N + offs_n[None, :], _codes(x, row_scale[:, None], qmax),
                         mask=mask)

    # SEAM: kernel_matmul
    @triton.jit
    def int8_matmul_kernel(
            a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,  # pointers
            M, N, K,  # sizes
            stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,  # strides
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # meta-parameters
            GROUP_M: tl.constexpr, DEQUANT: tl.constexpr, HAS_BIAS: tl.constexpr):
        # Grouped tile order: GROUP_M row-tiles share their B columns while they sit in L2.
        pid = tl.program_id(0)
        num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_m = group_id * GROUP_M
        group_rows = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % num_pid_in_group) % group_rows
        pid_n = (pid % num_pid_in_group) // group_rows
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # int32: int8 products never overflow it
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (k0 + offs_k[None, :] < K), other=0)
            b = tl.load(b_ptrs, mask=(k0 + offs_k[:, None] < K) & (offs_n[None, :] < N), other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # (BLOCK_M, BLOCK_N) int32 on tensor cores
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        mask_m, mask_n = offs_m < M, offs_n < N
        if DEQUANT:  # epilogue: int32 -> fp32, times both scales, plus bias, to the output dtype
            a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
            b_scale = tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0)
            out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
            if HAS_BIAS:
                out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            out = out.to(c_ptr.dtype.element_ty)
        else:
            out = acc
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, out,
                 mask=mask_m[:, None] & mask_n[None, :])


    @triton.jit
    def int8_matmul_tma_kernel(
            a_ptr, bt_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,  # A (M, K), B^T (N, K): rows contiguous
            M, N, K,
            stride_am, stride_btn, stride_cm,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, DEQUANT: tl.constexpr, HAS_BIAS: tl.constexpr):
        # Persistent: one program per SM walks the tiles tile, tile + NUM_SMS, ...; tensor descriptors
        # let the copy engine (TMA) move whole tiles and zero-fill past the edges, so no masks.
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
        bt_desc = tl.make_tensor_descriptor(bt_ptr, [N, K], [stride_btn, 1], [BLOCK_N, BLOCK_K])
        c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [stride_cm, 1], [BLOCK_M, BLOCK_N])
        num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=True):
            group_id = tile // num_pid_in_group
            first_m = group_id * GROUP_M
            group_rows = min(num_pid_m - first_m, GROUP_M)
            pid_m = first_m + (tile % num_pid_in_group) % group_rows
            pid_n = (tile % num_pid_in_group) // group_rows
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                a = a_desc.load([pid_m * BLOCK_M, k0])
                bt = bt_desc.load([pid_n * BLOCK_N, k0])
                acc = tl.dot(a, bt.T, acc, out_dtype=tl.int32)
            if DEQUANT:
                offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
                offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
                b_scale = tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
                out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
                if HAS_BIAS:
                    out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(c_ptr.dtype.element_ty))
            else:
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc)


    @triton.jit
    def _decode_moment(codes_ptr, scale_ptr, rows, cols, row_mask,
                       BITS: tl.constexpr, SIGNED: tl.constexpr, V_MAP: tl.constexpr, BLOCK: tl.constexpr):
        """(ROWS, BLOCK) fp32 moment from its codes: qgpt.decode_state's arithmetic."""
        if BITS == 8:
            q = tl.load(codes_ptr + rows[:, None] * BLOCK + cols[None, :], mask=row_mask[:, None], other=0)
        else:  # two codes a byte, element 2j in the low nibble of byte j
            half = tl.arange(0, BLOCK // 2)
            packed = tl.load(codes_ptr + rows[:, None] * (BLOCK // 2) + half[None, :], mask=row_mask[:, None], other=0)
            q = tl.reshape(tl.join(packed & 15, packed >> 4), (rows.shape[0], BLOCK))
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
        q = q.to(tl.float32)
        if SIGNED:
            return (q - 2.0 ** (BITS - 1)) * scale
        x = (q + (0.0 if V_MAP == 0 else 1.0)) * scale  # zero-free maps: code c means (c + 1) * scale
        return x * x if V_MAP == 2 else x

    @triton.jit
    def _encode_moment(x, codes_ptr, scale_ptr, rows, cols, row_mask,
                       BITS: tl.constexpr, SIGNED: tl.constexpr, V_MAP: tl.constexpr, BLOCK: tl.constexpr):
        """Store qgpt.encode_state's codes and per-block scales of the (ROWS, BLOCK) moment x."""
        if SIGNED:  # symmetric absmax codes, offset by 2^(b-1) into unsigned
            qmax = 2.0 ** (BITS - 1) - 1
            scale = _scale(_absmax(x, 1), 1e-30, qmax)
            q = _codes(x, scale[:, None], qmax).to(tl.int32) + 2 ** (BITS - 1)
        else:  # v >= 0: all 2^b levels on [0, max] (linear), shifted up one step (zero-free), or of sqrt(v)
            u = tl.sqrt_rn(x) if V_MAP == 2 else x
            offset = 0.0 if V_MAP == 0 else 1.0
            levels = 2.0 ** BITS - 1
            scale = _scale(_absmax(u, 1), 1e-30, levels + offset)
            t = _round_half_even(tl.math.div_rn(u, scale[:, None])) - offset
            q = tl.minimum(tl.maximum(t, 0.0), levels).to(tl.int32)
        tl.store(scale_ptr + rows, scale, mask=row_mask)
        if BITS == 8:
            tl.store(codes_ptr + rows[:, None] * BLOCK + cols[None, :], q.to(tl.uint8), mask=row_mask[:, None])
        else:
            low, high = tl.split(tl.reshape(q, (rows.shape[0], BLOCK // 2, 2)))
            half = tl.arange(0, BLOCK // 2)
            tl.store(codes_ptr + rows[:, None] * (BLOCK // 2) + half[None, :], (low | (high << 4)).to(tl.uint8),
                     mask=row_mask[:, None])

    @triton.jit
    def adamw_lowbit_kernel(
            p_ptr, g_ptr, m_codes_ptr, m_scale_ptr, v_codes_ptr, v_scale_ptr,  # pointers
            n, n_blocks,  # elements, blocks of BLOCK elements (the last one padded)
            decay, w1, c2, beta2, neg_step_size, bias_correction2_sqrt, eps,  # the step's scalars
            M_BITS: tl.constexpr, V_BITS: tl.constexpr, V_MAP: tl.constexpr, SMALL_W1: tl.constexpr,
            BLOCK: tl.constexpr, ROWS: tl.constexpr):
        # One pass over memory: a program takes ROWS blocks of BLOCK elements (one scale each), loads
        # the parameter, the gradient and both moments' codes, decodes, does the AdamW update in fp32,
        # and re-encodes the moments with their new block absmax. Operations in QAdamW's order, with
        # fused multiply-adds where PyTorch's lerp_ and addcmul_ have them, so the results are equal.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_mask = rows < n_blocks
        idx = rows[:, None] * BLOCK + cols[None, :]
        mask = idx < n
        p = tl.load(p_ptr + idx, mask=mask, other=0.0)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        m = _decode_moment(m_codes_ptr, m_scale_ptr, rows, cols, row_mask, M_BITS, True, V_MAP, BLOCK)
        v = _decode_moment(v_codes_ptr, v_scale_ptr, rows, cols, row_mask, V_BITS, False, V_MAP, BLOCK)
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
        _encode_moment(m, m_codes_ptr, m_scale_ptr, rows, cols, row_mask, M_BITS, True, V_MAP, BLOCK)
        _encode_moment(v, v_codes_ptr, v_scale_ptr, rows, cols, row_mask, V_BITS, False, V_MAP, BLOCK)


# ----------------------------------------------------------------------------------------------
# Launchers: check inputs, allocate, launch.

def _check_launchable(*tensors):
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton, or use the references")
    if tensors[0].device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1, set before kernels.py "
                           "is imported")


_AUTOTUNED = {}


MATMUL_CONFIGS = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps
    (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 256, 128, 4, 8), (256, 128, 128, 4, 8),
    (128, 256, 64, 4, 8), (256, 128, 64, 4, 8), (128, 128, 128, 4, 8), (128, 128, 128, 4, 4),
    (128, 128, 128, 5, 4), (128, 128, 64, 5, 4), (128, 128, 256, 3, 8), (64, 256, 128, 4, 4),
    (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (64, 64, 128, 5, 4)]


MAX_K = 2 ** 16  # int32 holds a sum of K int8 products (each |.| <= 2^14) for K < 2^17; longer K is chunked
SMALL_MATMUL = 2 ** 28  # M * N * K below this: one fixed config (autotuning would cost more than it saves)
SMALL_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_stages=3, num_warps=4)


# On a GPU, no multiply-add contracted into an fma behind our back: the epilogues and the AdamW
# update then round exactly as their PyTorch references (explicit tl.fma calls stay fused).
EXACT = dict(enable_fp_fusion=False)


def _prune(configs, named_args, **kwargs):
    """Skip tiles much larger than the problem (they only pad)."""
    M, N = named_args["M"], named_args["N"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, M) and c.kwargs["BLOCK_N"] <= max(64, N)]
    return keep or configs


def _tuned(name):
    """A matmul kernel wrapped in triton.autotune, built on first GPU use (never on CPU)."""
    if name not in _AUTOTUNED:
        from triton.testing import do_bench
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                 num_stages=stages, num_warps=warps)
                   for bm, bn, bk, stages, warps in MATMUL_CONFIGS]
        kernel = int8_matmul_kernel if name == "pointer" else int8_matmul_tma_kernel
        keys = ["M", "N", "K"] + (["stride_ak", "stride_bk"] if name == "pointer" else [])
        _AUTOTUNED[name] = triton.autotune(
            configs=configs, key=keys, prune_configs_by={"early_config_prune": _prune},
            do_bench=lambda fn, quantiles: do_bench(fn, warmup=5, rep=20, quantiles=quantiles))(kernel)
    return _AUTOTUNED[name]


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_ok(a, b, c):
    """TMA needs A and B^T with contiguous rows, 16-byte aligned row strides and base addresses."""
    return (a.stride(1) == 1 and b.stride(0) == 1 and c.stride(1) == 1
            and all(t.data_ptr() % 16 == 0 for t in (a, b, c))
            and all((s * e) % 16 == 0 for s, e in [(a.stride(0), 1), (b.stride(1), 1), (c.stride(0), c.element_size())]))


def quantize_rows(x, bits=8, absmax_floor=1e-5):
    """Triton: (M, K) float -> int8 codes (M, K), fp32 scale (M, 1). Any strides."""
    _check_launchable(x)
    M, K = x.shape
    codes = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(K), 8192 if x.is_cuda else 128)
    quantize_rows_kernel[(M,)](x, codes, scale, M, K, x.stride(0), x.stride(1), codes.stride(0), codes.stride(1),
                               float(2 ** (bits - 1) - 1), absmax_floor, BLOCK_K=block, SINGLE_PASS=block >= K,
                               num_warps=8 if block >= 2048 else 4)
    return codes, scale


def quantize_columns(x, bits=8, absmax_floor=1e-5):
    """Triton: (M, N) float -> int8 codes (M, N), fp32 scale (1, N). Any strides.

    The codes are stored as the rows of X^T (N, M) and returned as its (M, N) view.
    """
    (colt_codes, col_scale), _ = _quantize_tiles(x, bits, absmax_floor, with_rows=False)
    return colt_codes.t(), col_scale


def quantize_rows_and_columns(x, bits=8, absmax_floor=1e-5):
    """Triton: both quantizations of (M, N) x in two passes over it (separately: three passes).

    Returns ((row codes (M, N), row scale (M, 1)), (column codes as X^T (N, M), column scale (N, 1))):
    each pair is the row quantization of x or of x^T, codes contiguous.
    """
    (colt_codes, col_scale), rows = _quantize_tiles(x, bits, absmax_floor, with_rows=True)
    return rows, (colt_codes, col_scale.t())


def _quantize_tiles(x, bits, absmax_floor, with_rows):
    _check_launchable(x)
    M, N = x.shape
    qmax = 2 ** (bits - 1) - 1
    rows, block_m, block_n = (512, 64, 128) if x.is_cuda else (16, 8, 16)
    grid = (triton.cdiv(M, rows), triton.cdiv(N, block_n))
    meta = dict(ROWS=rows, BLOCK_M=block_m, BLOCK_N=block_n, WITH_ROWS=with_rows)
    col_part = torch.empty((grid[0], N), dtype=torch.float32, device=x.device)
    row_part = torch.empty((M, grid[1]) if with_rows else (1,), dtype=torch.float32, device=x.device)
    absmax_partials_kernel[grid](x, col_part, row_part, M, N, x.stride(0), x.stride(1), **meta)

    # the maxima of the partial maxima, then qgpt.quantize's scale
    col_scale = absmax_scale(col_part.amax(dim=0, keepdim=True), absmax_floor, qmax)  # (1, N)
    row_scale = absmax_scale(row_part.amax(dim=1, keepdim=True), absmax_floor, qmax) if with_rows else col_scale
    colt_codes = torch.empty((N, M), dtype=torch.int8, device=x.device)
    row_codes = torch.empty((M, N) if with_rows else (1,), dtype=torch.int8, device=x.device)
    quantize_tiles_kernel[grid](x, col_scale, colt_codes, row_scale, row_codes, M, N, x.stride(0), x.stride(1),
                                float(qmax), **meta)
    return (colt_codes, col_scale), ((row_codes, row_scale) if with_rows else None)


def int8_matmul(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32, use_tma=None):
    """Triton: (A @ B) * a_scale[:, None] * b_scale[None, :] + bias; A (M, K), B (K, N) int8, any strides.

    out_dtype=torch.int32 skips the epilogue and returns the raw int32 sums. use_tma=None picks the
    persistent TMA kernel on a GPU when A's rows and B's columns are contiguous (K-major), else the
    pointer kernel; True/False forces one (the interpreter runs both).
    """
    _check_launchable(a, b)
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.shape[1] != b.shape[0]:
        raise ValueError(f"int8_matmul needs int8 A (M, K) and B (K, N), got {a.dtype} {tuple(a.shape)} and "
                         f"{b.dtype} {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[1]
    if K > MAX_K:  # chunks whose int32 sums cannot overflow, added in fp32
        if out_dtype == torch.int32:
            raise ValueError(f"int8_matmul: K = {K} > {MAX_K}, the int32 sums could overflow: ask for a float "
                             f"out_dtype (it sums chunks of {MAX_K} in fp32)")
        acc = sum(int8_matmul(a[:, k0:k0 + MAX_K], a_scale, b[k0:k0 + MAX_K], b_scale, out_dtype=torch.int32,
                              use_tma=use_tma).float() for k0 in range(0, K, MAX_K))
        out = acc * a_scale.reshape(-1, 1).float() * b_scale.reshape(1, -1).float()
        return (out if bias is None else out + bias.float()).to(out_dtype)
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    dequant = out_dtype != torch.int32
    a_scale = a_scale.reshape(-1).float()  # (M,)
    b_scale = b_scale.reshape(-1).float()  # (N,)
    bias_arg = a_scale if bias is None else bias  # any pointer when HAS_BIAS is off
    args = (a, b, c, a_scale, b_scale, bias_arg, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1))
    tiles = lambda meta: triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])  # noqa: E731
    bk = 32 if K <= 256 else 512  # interpreter: fewer, longer steps along a long K
    if use_tma is None:
        use_tma = a.is_cuda and _tma_ok(a, b, c)
    if use_tma:
        tma_args = (a, b, c, a_scale, b_scale, bias_arg, M, N, K, a.stride(0), b.stride(1), c.stride(0))
        if a.is_cuda:
            # device-side tensor descriptors need scratch memory; the allocator is per thread (the
            # backward runs in autograd's own thread), so it is set at every launch
            triton.set_allocator(_scratch)
            sms = torch.cuda.get_device_properties(a.device).multi_processor_count
            if M * N * K < SMALL_MATMUL:
                int8_matmul_tma_kernel[(min(sms, tiles(SMALL_CONFIG)),)](
                    *tma_args, NUM_SMS=sms, DEQUANT=dequant, HAS_BIAS=bias is not None, **SMALL_CONFIG, **EXACT)
            else:
                _tuned("tma")[lambda meta: (min(sms, tiles(meta)),)](*tma_args, NUM_SMS=sms, DEQUANT=dequant,
                                                                     HAS_BIAS=bias is not None, **EXACT)
        else:  # interpreter: fixed blocks, two "SMs"
            int8_matmul_tma_kernel[(2,)](*tma_args, BLOCK_M=32, BLOCK_N=32, BLOCK_K=bk, GROUP_M=4, NUM_SMS=2,
                                         DEQUANT=dequant, HAS_BIAS=bias is not None)
    elif a.is_cuda and M * N * K < SMALL_MATMUL:
        int8_matmul_kernel[(tiles(SMALL_CONFIG),)](*args, DEQUANT=dequant, HAS_BIAS=bias is not None, **SMALL_CONFIG,
                                                   **EXACT)
    elif a.is_cuda:
        _tuned("pointer")[lambda meta: (tiles(meta),)](*args, DEQUANT=dequant, HAS_BIAS=bias is not None, **EXACT)
    else:  # interpreter: small fixed blocks (autotune needs a driver)
        grid = (triton.cdiv(M, 32) * triton.cdiv(N, 32),)
        int8_matmul_kernel[grid](*args, BLOCK_M=32, BLOCK_N=32, BLOCK_K=bk, GROUP_M=4, DEQUANT=dequant,
                                 HAS_BIAS=bias is not None)
    return c


V_MAPS = {"linear": 0, "zerofree": 1, "sqrt": 2}


def adamw_lowbit_step(p, grad, m_state, v_state, m_bits, v_bits, v_map, block_size, step, lr, beta1, beta2, eps,
                      weight_decay):
    """Triton: one AdamW step of p in place, with 8/4-bit block-wise moments {"codes", "scale"} updated in
    place; qgpt.QAdamW's PyTorch step is the reference. block_size: a power of two >= 2."""
    _check_launchable(p)
    n = p.numel()
    n_blocks = m_state["scale"].shape[0]
    rows = 8 if p.is_cuda else 4
    w1 = float(torch.tensor(1 - beta1, dtype=torch.float32))  # the fp32 weight PyTorch's lerp_ compares
    adamw_lowbit_kernel[(triton.cdiv(n_blocks, rows),)](
        p, grad, m_state["codes"], m_state["scale"], v_state["codes"], v_state["scale"], n, n_blocks,
        1 - lr * weight_decay, 1 - beta1, 1 - beta2, beta2, -lr / (1 - beta1 ** step),
        math.sqrt(1 - beta2 ** step), eps, M_BITS=m_bits, V_BITS=v_bits, V_MAP=V_MAPS[v_map],
        SMALL_W1=abs(w1) < 0.5, BLOCK=block_size, ROWS=rows, **(EXACT if p.is_cuda else {}))
    torch.autograd.graph.increment_version(p)  # p changed behind autograd's back: say so (weight caches)


# PyTorch custom operators: torch.compile sees each launcher as one opaque op (with a fake version
# that only says the output shapes), so the int8 recipe traces with fullgraph=True.

@torch.library.custom_op("qgpt::quantize_rows", mutates_args=())
def quantize_rows_op(x: torch.Tensor, bits: int, absmax_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(x, bits, absmax_floor)


@quantize_rows_op.register_fake
def _(x, bits, absmax_floor):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@torch.library.custom_op("qgpt::quantize_columns", mutates_args=())
def quantize_columns_op(x: torch.Tensor, bits: int, absmax_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of x^T: codes (K, M) contiguous, scales (K, 1)."""
    codes, scale = quantize_columns(x, bits, absmax_floor)
    return codes.t(), scale.t()


@quantize_columns_op.register_fake
def _(x, bits, absmax_floor):
    return x.new_empty((x.shape[1], x.shape[0]), dtype=torch.int8), x.new_empty((x.shape[1], 1), dtype=torch.float32)


@torch.library.custom_op("qgpt::int8_matmul", mutates_args=())
def int8_matmul_op(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return int8_matmul(a, a_scale, b, b_scale, bias, out_dtype)


@int8_matmul_op.register_fake
def _(a, a_scale, b, b_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


@torch.library.custom_op("qgpt::quantize_both", mutates_args=())
def quantize_both_op(x: torch.Tensor, bits: int, absmax_floor: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor, torch.Tensor]:
    """Row codes of x (M, K) and of x^T (K, M), contiguous, with their scales: two passes over x."""
    (codes, scale), (t_codes, t_scale) = quantize_rows_and_columns(x, bits, absmax_floor)
    return codes, scale, t_codes, t_scale


@quantize_both_op.register_fake
def _(x, bits, absmax_floor):
    M, K = x.shape
    return (x.new_empty((M, K), dtype=torch.int8), x.new_empty((M, 1), dtype=torch.float32),
            x.new_empty((K, M), dtype=torch.int8), x.new_empty((K, 1), dtype=torch.float32))


class TritonBackend:
    """qgpt's int8 backend on Triton kernels; same signatures as qgpt.SimBackend.

    inductor_quantize: under torch.compile, quantize with the PyTorch reference instead of the Triton
    kernels, so that inductor can fuse X's quantization into the LayerNorm or GELU producing X (one
    pass over X fewer); the int8 matmuls stay Triton. Off by default: inductor's generated division
    may round differently from the kernels' IEEE division, so codes can differ at rounding ties.
    """
    name = "triton"
    inductor_quantize = False

    @staticmethod
    def quantize_rows(x, bits, absmax_floor):
        if TritonBackend.inductor_quantize and torch.compiler.is_compiling():
            codes, scale = quantize_rows_reference(x, bits, absmax_floor)
            return codes.contiguous(), scale  # K-major for the matmul, as the kernels store them
        return quantize_rows_op(x, bits, absmax_floor)

    @staticmethod
    def quantize_columns(x, bits, absmax_floor):
        if TritonBackend.inductor_quantize and torch.compiler.is_compiling():
            return TritonBackend.quantize_rows(x.t(), bits, absmax_floor)
        return quantize_columns_op(x, bits, absmax_floor)

    @staticmethod
    def quantize_both(x, bits, absmax_floor):
        if TritonBackend.inductor_quantize and torch.compiler.is_compiling():
            return TritonBackend.quantize_rows(x, bits, absmax_floor), TritonBackend.quantize_columns(x, bits,
                                                                                                    absmax_floor)
        codes, scale, t_codes, t_scale = quantize_both_op(x, bits, absmax_floor)
        return (codes, scale), (t_codes, t_scale)

    @staticmethod
    def int8_matmul(a_codes, a_scale, b_codes, b_scale, bias=None, out_dtype=torch.float32):
        return int8_matmul_op(a_codes, a_scale, b_codes, b_scale, bias, out_dtype)


# ----------------------------------------------------------------------------------------------
# python kernels.py: correctness check, then (GPU) the benchmark table.

def check(device):
    """Every kernel against its reference, exact where the math is exact; prints each comparison."""
    torch.manual_seed(0)
    ok = True
    for M, K, N in [(1, 1, 1), (37, 70, 19), (130, 96, 67), (200, 96, 80)] + ([(4096, 768, 3072)] if device == "cuda" else []):
        x = torch.randn(M, K, device=device) * torch.rand(M, 1, device=device) * 3
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=device)
        b = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=device).t()  # column-major B
        a_scale, b_scale = torch.rand(M, device=device), torch.rand(N, device=device)
        shape = f"{M}x{K}x{N}"
        for name, got, want in [
                (f"quantize_rows {shape}", quantize_rows(x), quantize_rows_reference(x)),
                (f"quantize_columns {shape}", quantize_columns(x), quantize_columns_reference(x)),
                (f"int8_matmul int32 {shape}", [int8_matmul(a, a_scale, b, b_scale, out_dtype=torch.int32)],
                 [int8_matmul_reference(a, a_scale, b, b_scale, out_dtype=torch.int32)])]:
            parts = ["codes", "scale"] if len(got) == 2 else [""]
            ok &= all(compare(f"{name} {part}".strip(), g, w) for part, g, w in zip(parts, got, want))
        c = torch.empty(M, N, device=device)
        if _tma_ok(a, b, c) and _tma_ok(a, b, c.int()):  # the persistent TMA kernel, where its layout allows
            ok &= compare(f"int8_matmul tma int32 {shape}", int8_matmul(a, a_scale, b, b_scale, out_dtype=torch.int32,
                                                                          use_tma=True),
                          int8_matmul_reference(a, a_scale, b, b_scale, out_dtype=torch.int32))
            ok &= compare(f"int8_matmul tma epilogue {shape}", int8_matmul(a, a_scale, b, b_scale, use_tma=True),
                          int8_matmul_reference(a, a_scale, b, b_scale), rtol=1e-6, atol=1e-6)
        # the epilogue: the same fp32 operations; 1e-6 leaves room for a fused multiply-add
        ok &= compare(f"int8_matmul epilogue {shape}", int8_matmul(a, a_scale, b, b_scale),
                      int8_matmul_reference(a, a_scale, b, b_scale), rtol=1e-6, atol=1e-6)
        (rows, row_scale), (cols_t, col_scale) = quantize_rows_and_columns(x)
        ok &= all(compare(f"quantize_rows_and_columns {shape} {name}", got, want) for name, got, want in
                  [("rows", rows, quantize_rows_reference(x)[0]), ("columns", cols_t, quantize_rows_reference(x.t())[0]),
                   ("row scales", row_scale, quantize_rows_reference(x)[1]),
                   ("column scales", col_scale, quantize_rows_reference(x.t())[1])])
    return ok & check_adamw(device)


def check_adamw(device):
    """The fused AdamW kernel against qgpt.QAdamW's PyTorch step, 3 steps, 8 and 4 bits, a ragged size."""
    import qgpt
    ok = True
    for bits in (8, 4):
        results = []
        for fused in (False, True):
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(37, 50, device=device) * 0.02)
            opt = qgpt.QAdamW([p], lr=1e-2, weight_decay=0.1, m_bits=bits, v_bits=bits, min_size=1, fused=fused)
            for _ in range(3):
                p.grad = torch.randn_like(p) * 0.01
                opt.step()
            results.append([p.detach(), opt.state[p]["m"]["codes"], opt.state[p]["v"]["codes"]])
        for name, got, want in zip(["parameter", "m codes", "v codes"], results[1], results[0]):
            # exact under the interpreter; on a GPU PyTorch's own kernels round some steps differently
            tol = 0 if device == "cpu" else (1e-5 if name == "parameter" else 1)
            ok &= compare(f"adamw_lowbit_step {bits}-bit {name}", got.double(), want.double(), rtol=tol, atol=tol * 1e-3)
    return ok


def benchmark():
    """Throughput of every matmul path at GPT-2 shapes, in one run; then the quantize kernels' bandwidth."""
    from triton.testing import do_bench
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}; Y[M,N] = X[M,K] @ W[K,N], "
          f"operands K-major; TFLOP/s (bf16, fp8) or TOP/s (int8), median of do_bench")
    print(f"{'M':>6} {'K':>6} {'N':>6} | {'bf16':>5} {'_int_mm':>7} {'fp8':>5} {'ptr':>5} {'tma':>5} | "
          f"{'ptr/bf16':>8} {'tma/bf16':>8}  use")
    shapes = [(16384, 768, 2304), (16384, 768, 3072), (16384, 3072, 768), (3072, 16384, 768),
              (16384, 768, 50304), (8192, 8192, 8192)]
    for M, K, N in shapes:
        x, wt = torch.randn(M, K, device="cuda", dtype=torch.bfloat16), torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        w = wt.t()  # (K, N), K-major, as a Linear's weight
        a, a_scale = quantize_rows(x)
        bt, b_scale = quantize_rows(wt)
        b = bt.t()
        rate = lambda fn: 2 * M * N * K / do_bench(fn, return_mode="median") / 1e9  # noqa: E731
        t_bf16 = rate(lambda: x @ w)
        t_int = rate(lambda: torch._int_mm(a, b))
        try:
            x8, w8 = x.to(torch.float8_e4m3fn), wt.to(torch.float8_e4m3fn).t()
            one = torch.ones((), device="cuda")
            t_fp8 = rate(lambda: torch._scaled_mm(x8, w8, one, one, out_dtype=torch.bfloat16))
        except (RuntimeError, AttributeError):
            t_fp8 = float("nan")
        t_ptr = rate(lambda: int8_matmul(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, use_tma=False))
        t_tma = rate(lambda: int8_matmul(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, use_tma=True))
        best = "tma" if t_tma >= t_ptr else "ptr"
        print(f"{M:>6} {K:>6} {N:>6} | {t_bf16:5.0f} {t_int:7.0f} {t_fp8:5.0f} {t_ptr:5.0f} {t_tma:5.0f} | "
              f"{t_ptr / t_bf16:8.2f} {t_tma / t_bf16:8.2f}  {best}", flush=True)
    for name in ("pointer", "tma"):
        for key, config in getattr(_AUTOTUNED.get(name), "cache", {}).items():
            print(f"  best {name} config for {key[:3]}: {config}")
    for M, K in [(16384, 768), (16384, 3072)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        moved = x.numel() * 3  # bf16 read + int8 write (scales are noise)
        for name, fn in [("quantize_rows", quantize_rows), ("quantize_columns", quantize_columns),
                         ("reference rows (eager)", quantize_rows_reference),
                         ("reference rows (compiled)", torch.compile(quantize_rows_reference))]:
            ms = do_bench(lambda: fn(x), return_mode="median")
            print(f"{name:26s} {M}x{K} bf16: {ms * 1e3:6.1f} us, {moved / ms / 1e9:5.2f} TB/s", flush=True)
        ms = do_bench(lambda: quantize_rows_and_columns(x), return_mode="median")  # reads x twice, writes 2 codes
        print(f"{'quantize_rows_and_columns':26s} {M}x{K} bf16: {ms * 1e3:6.1f} us, "
              f"{x.numel() * 6 / ms / 1e9:5.2f} TB/s", flush=True)
    benchmark_adamw()


def benchmark_adamw():
    """One optimizer step over GPT-2 small's 2-D weights: torch's fused AdamW (fp32 states) vs the
    fused low-bit kernel, in GB/s of parameter, gradient and state traffic."""
    import qgpt
    from triton.testing import do_bench
    shapes = [(50304, 768)] + [(768, 2304), (768, 768), (3072, 768), (768, 3072)] * 12
    print(f"AdamW step over GPT-2 small's {len(shapes)} weight matrices (fp32 parameters and gradients)")
    for name, make, state_bytes in [
            ("torch.optim.AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), 16),
            ("QAdamW 8-bit (Triton)", lambda ps: qgpt.QAdamW(ps, lr=1e-3, m_bits=8, v_bits=8), 4),
            ("QAdamW 4-bit (Triton)", lambda ps: qgpt.QAdamW(ps, lr=1e-3, m_bits=4, v_bits=4), 2)]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
        for q in params:
            q.grad = torch.randn_like(q) * 1e-3
        opt = make(params)
        n = sum(q.numel() for q in params)
        ms = do_bench(opt.step, return_mode="median")
        moved = n * (8 + 4 + state_bytes)  # p read + write, grad read, m and v read + write
        print(f"  {name:26s} {n / 1e6:.1f}M parameters: {ms:6.2f} ms, {moved / ms / 1e6:6.0f} GB/s", flush=True)


def main():
    if triton is None:
        print("triton is not installed: pip install triton")
        return 1
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":  # the interpreter must be on before the kernels exist
            print("no CUDA GPU: checking the kernels under Triton's interpreter (no benchmark)")
            os.execve(sys.executable, [sys.executable, __file__], {**os.environ, "TRITON_INTERPRET": "1"})
        ok = check("cpu")
        print("every kernel matches its reference" if ok else "SOME KERNELS DIFFER from their references (see above)")
        return 0 if ok else 1
    if not check("cuda"):
        print("SOME KERNELS DIFFER from their references (see above)")
        return 1
    print("every kernel matches its reference")
    benchmark()
    return 0


if __name__ == "__main__":
    sys.exit(main())
