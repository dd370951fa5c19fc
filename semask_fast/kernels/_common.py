"""``@triton.jit`` helpers shared by every kernel module, and the row-dot and ordered-sum kernels."""

import torch
import triton
import triton.language as tl

from . import Plan, p2


@triton.jit
def mm(a, b, DOT_FP32: tl.constexpr):
    """a @ b accumulated in fp32; fp32 operands use IEEE products (no tf32) to keep 1e-4 parity on GPUs.

    DOT_FP32 is the interpreter-only bf16 workaround (triton issue 11584, see ``semask_fast.kernels``):
    the operands are upcast just for the product.
    """
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def softmax_step(m_i, l_i, s):
    """One online-softmax update by the fp32 logits tile ``s`` (rows x keys).

    Returns (m_new, alpha, p, l_new): the new running row max, the factor that rescales what
    was accumulated under the old max, exp(s - m_new) and the new running row sum.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row whose logits so far are all -inf (masked, e.g. mask_value=-inf) keeps m = -inf: its
    # exps are taken against 0 (giving 0), not against -inf (-inf - -inf = NaN).
    m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_exp)
    p = tl.exp(s - m_exp[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


def seed_tensor(seed, device) -> torch.Tensor:
    """The dropout seed as the kernels take it: a 0-d int64 tensor they load (the op passes the one
    it drew on the inputs' device, which a CUDA-graph replay refills; an int is wrapped)."""
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor(seed, dtype=torch.int64, device=device)


@triton.jit
def load_seed(SEED, DROPOUT: tl.constexpr):
    """The dropout seed from device memory (see ``seed_tensor``), as int32: 31-bit seeds key Philox
    as an int32 argument did.  Loaded only with dropout (0 otherwise)."""
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED).to(tl.int32)
    return seed


@triton.jit
def dropout_keep(seed, plane, rows, cols, NROWS, NCOLS, dropout_p):
    """Keep-mask of elements (plane, row, col) of a (planes, NROWS, NCOLS) score tensor: Philox
    (``tl.rand``) keyed by the element's flat index, so backward replays the forward's mask.
    ``plane`` (int64), ``rows`` and ``cols`` come broadcastable to the tile's shape."""
    return tl.rand(seed, (plane * NROWS + rows) * NCOLS + cols) >= dropout_p


@triton.jit
def dropped(x, keep, dropout_p):
    """Inverted dropout of ``x`` with the keep-mask ``keep``."""
    return tl.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)


@triton.jit
def load_rows(base, rows, cols, row_stride, row_ok, col_ok):
    """(rows, cols) tile of a row-major matrix: base[rows * row_stride + cols], zero outside the masks."""
    return tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0)


@triton.jit
def load_cols(base, rows, cols, row_stride, row_ok, col_ok):
    """The transposed tile (cols, rows) of the same matrix, for products with rows as the inner dim."""
    return tl.load(base + rows[None, :] * row_stride + cols[:, None], mask=col_ok[:, None] & row_ok[None, :],
                   other=0.0)


@triton.jit
def store_rows(base, rows, cols, row_stride, row_ok, col_ok, x):
    """Stores the (rows, cols) tile ``x`` in base's dtype (the inverse of :func:`load_rows`)."""
    tl.store(base + rows[:, None] * row_stride + cols[None, :], x.to(base.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def chunked_dot(A, B, rows_a, rows_b, a_ok, b_ok, INNER, a_stride, b_stride, BLOCK_I: tl.constexpr,
                DOT_FP32: tl.constexpr):
    """fp32 (rows_a, rows_b) tile of A B^T for two row-major matrices sharing their inner dim (length
    INNER, unit stride; row strides a_stride, b_stride), summed over INNER in BLOCK_I chunks."""
    acc = tl.zeros([rows_a.shape[0], rows_b.shape[0]], dtype=tl.float32)
    for i0 in range(0, INNER, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        c_ok = cols < INNER
        acc += mm(load_rows(A, rows_a, cols, a_stride, a_ok, c_ok), load_cols(B, rows_b, cols, b_stride, b_ok, c_ok),
                  DOT_FP32)
    return acc


@triton.jit
def row_dots(A, B, rows, row_ok, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 sum over c of A[r, c] * B[r, c] for rows ``rows`` of two contiguous (R, C) matrices, over all
    of C in BLOCK_C chunks (attention backward's D = rowsum(dO * O))."""
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_ok = cols < C
        a = load_rows(A, rows, cols, C, row_ok, c_ok).to(tl.float32)
        acc += tl.sum(a * load_rows(B, rows, cols, C, row_ok, c_ok).to(tl.float32), 1)
    return acc


@triton.jit
def row_dot_kernel(A, B, OUT, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[r] = fp32 sum over c of A[r, c] * B[r, c]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(OUT + rows, row_dots(A, B, rows, rows < R, C, BLOCK_R, BLOCK_C), mask=rows < R)


def row_dot_plan(cols: int) -> Plan:
    return Plan(dict(BLOCK_R=16, BLOCK_C=p2(cols, hi=128)), num_warps=4, num_stages=2)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 sum over the last dim of a * b, both contiguous and of the same shape."""
    cols = a.shape[-1]
    rows = a.numel() // max(cols, 1)
    out = torch.empty(a.shape[:-1], device=a.device, dtype=torch.float32)
    plan = row_dot_plan(cols)
    row_dot_kernel[(triton.cdiv(rows, plan["BLOCK_R"]),)](a, b, out, rows, cols, **plan.launch())
    return out


@triton.jit
def ordered_sum_kernel(PARTS, OUT, C, M, BLOCK: tl.constexpr):
    """OUT[m] = sum over c = 0, 1, ..., C - 1 (in this order) of PARTS[c, m], in OUT's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(0, C):
        acc += tl.load(PARTS + c * M + offs, mask=offs < M, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=offs < M)


ORDERED_SUM_PLAN = Plan(dict(BLOCK=128), num_warps=4, num_stages=1)


def ordered_sum(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum of a contiguous fp32 (C, ...) tensor over its first dim in a fixed order, cast to ``dtype``
    (the last level of the deterministic reductions: one launch, bitwise reproducible)."""
    out = torch.empty(parts.shape[1:], dtype=dtype, device=parts.device)
    m = out.numel()
    ordered_sum_kernel[(triton.cdiv(m, ORDERED_SUM_PLAN["BLOCK"]),)](parts, out, parts.shape[0], m,
                                                                     **ORDERED_SUM_PLAN.launch())
    return out
