"""Every test of ``window_attention`` (Swin W-MSA / SW-MSA), one section per backend:

* every backend (the ``kernel_backend`` fixture): the output and every gradient (dq, dk, dv,
  d(bias_table)) against the float64 reference through ``assert_parity``, which also asserts that
  the requested backend ran forward and backward.  The shape matrix covers N = 49 and 144 (one tile
  and the online-softmax key loop), non-square windows, shift on and off (mask computed in the
  kernel), an explicit (nW, N, N) mask, head_dim 16/20/32/48/64/128, batch 1 and odd batches, in
  fp32, fp16 and bf16; a mild mask value and peaked logits.
* triton, through the dispatcher: dropout replay, determinism of the table gradient, reasons.
* triton launchers (``semask_fast.kernels.window_attention``) called directly with explicit plans
  (helpers: ``tests/kernels/_launch_parity.py``): the GPU tiles, several windows per program, the
  table-gradient fold, lse, dropout, plan checks; and adversarial inputs through every tile path
  (the window forward's single tile and key loop, the backward's single- and multi-tile paths):
  peaked logits (largest logit of most rows ~90-150, beyond exp's fp32 range at ~88.7: a kernel
  that drops the running-max subtraction overflows) and a mild ``mask_value`` (-1.5: masked pairs
  keep a visible weight, so a shift mask that ignores the argument and adds a constant that
  saturates the softmax changes the output).  Non-finite results always fail.
* cpu: the native C++ kernels (gradcheck, dropout replay, D from the float32 tiles in half types,
  thread-count independence, allocations).
* cuda sources: csrc/ops/window_attention.cu run by the SIMT harness (``harness`` marker; helpers:
  ``tests/harness/_cuda_sources.py``), beyond the shared parity tests: dropout replayed exactly in
  the reference with the keep-mask recomputed on the host; the bias-table gradient bitwise identical
  across harness seeds (thread order) and host-thread counts, including a batch split into many
  window chunks; shapes at the edges of the tiling (head_dim 1 and 80, padded in shared memory,
  non-square windows with a one-axis shift, the fused one-tile backward at its edges and past
  them); packed rows; q, k, v as the timm drop-in's permuted views of one fused projection and dO
  as a transposed view, read in place; the table gradient's chunking (the plan,
  ``windows_per_chunk_override``: any chunking at parity and bitwise reproducible, scoped to its
  block and thread); the fused backward's inputs and traffic.  bf16 and fp16 run the same kernel
  code as on a GPU (fp32 accumulation of the FFMA path); nothing is upcast for the harness.

bf16 under Triton's interpreter: ``tl.dot`` is wrong on bf16 operands there
(triton issue 11584), so the kernels upcast the two dot operands to fp32 right
before each ``tl.dot`` (``DOT_FP32``).  bf16 loads, the casts of P and dS to
bf16, and bf16 stores are exercised; the bf16 tensor-core product itself is not
(it is on a GPU, where ``DOT_FP32`` is always False).

Tile size under the interpreter: the kernels' multi-tile paths run with 32-token
tiles (interpreter cost is per tile operation); GPUs use 16-token tiles with the
same kernel code, which the launcher tests run here too (``interpreter=False`` plans).

Peaked inputs are q = k = a z with a wide inner dim (64) and a modest a (3.9), not large operands:
the GPU kernels' backward takes D = rowsum(dO * O) from the rounded output (as in every
flash-attention backward), and its rounding error reaches dq, dk multiplied by scale * |k|,
scale * |q|, so large operands would measure that known limit instead of the bugs these tests are
for.  (The cpu kernels take D = rowsum(P * dP) from their float32 tiles:
test_cpu_half_dropout_isolated_tokens.)
"""

import dataclasses
import functools

import pytest
import torch

import semask_fast
from semask_fast import _build, reference
from semask_fast._traffic import harness_bytes
from semask_fast.backends.base import record_dispatch
from semask_fast.backends.registry import BackendNotSupportedError
from semask_fast.testing import GRADCHECK, REORDERED_FP32, assert_close, assert_parity, dropout_keep
from tests.conftest import next_seed as _next_seed, require_backend, require_toolchain
from tests.harness._cuda_sources import BACKEND, IDS, assert_override_is_scoped, cuda_module, randn, \
    spy_window_library
from tests.kernels._launch_parity import assert_matches_reference, grad_outputs_like, ids, kernels, rounded, \
    run_window, window_inputs

OP = "window_attention"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRADS = ["q", "k", "v", "bias_table"]

# (B*nW, heads, window, head_dim, shift, grid, explicit-mask nW)
SHAPES = {
    "swin-t-sw-msa": (4, 1, (7, 7), 32, (3, 3), (2, 2), None),
    "batch1-d16": (1, 1, (7, 7), 16, (0, 0), None, None),
    "ws12-n144": (1, 1, (12, 12), 32, (6, 6), (1, 1), None),
    "nonsquare-odd-batch-d48": (9, 1, (3, 5), 48, (1, 2), (3, 1), None),
    "explicit-mask-d64": (4, 1, (7, 7), 64, (0, 0), None, 2),
    "d128-batch3": (3, 1, (4, 4), 128, (0, 0), None, None),
    "tiny-d20-shift-one-axis": (6, 3, (2, 3), 20, (0, 1), (1, 2), None),
}


def _inputs(b_, h, ws, d, mask_nw, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = ws[0] * ws[1]
    t = {name: torch.randn(b_, h, n, d, generator=g, dtype=torch.float64) for name in ("q", "k", "v")}
    t["bias_table"] = torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), h, generator=g, dtype=torch.float64)
    if mask_nw:
        # Swin-like: 0 or -100 per pair, never a whole row masked.
        m = torch.where(torch.rand(mask_nw, n, n, generator=g) < 0.3, -100.0, 0.0).double()
        t["mask"] = m * (1 - torch.eye(n, dtype=torch.float64))
    return {k: v.to(device) for k, v in t.items()}


def _fn(ws, shift, grid, **kw):
    return functools.partial(semask_fast.window_attention, window_size=ws, shift_size=shift, grid=grid, **kw)


# --------------------------------------------------------------------------- #
# every backend
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", list(SHAPES))
def test_parity(kernel_backend, name, dtype):
    device = require_backend(OP, kernel_backend)
    b_, h, ws, d, shift, grid, mask_nw = SHAPES[name]
    assert_parity(_fn(ws, shift, grid), _inputs(b_, h, ws, d, mask_nw, device), GRADS, dtype,
                  backend=kernel_backend, op=OP)


def test_no_bias_table_custom_scale_mask_value(kernel_backend):
    """No table (only q, k, v grads), qk_scale override and a non-default mask value."""
    device = require_backend(OP, kernel_backend)
    t = _inputs(4, 1, (7, 7), 32, None, device)
    del t["bias_table"]
    assert_parity(_fn((7, 7), (3, 3), (2, 2), scale=0.3, mask_value=-1e4), t, ["q", "k", "v"], torch.float32,
                  backend=kernel_backend, op=OP)


def test_infinite_shift_mask_value(kernel_backend):
    """mask_value=-inf is a valid mask (every token sees its own region): finite outputs and
    gradients (a kernel that forms the mask as (region differs) * mask_value gets 0 * -inf = NaN)."""
    device = require_backend(OP, kernel_backend)
    assert_parity(_fn((7, 7), (3, 3), (2, 2), mask_value=float("-inf")), _inputs(4, 1, (7, 7), 32, None, device),
                  GRADS, torch.float32, backend=kernel_backend, op=OP)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_mild_shift_mask_value(kernel_backend, dtype):
    """A mask value that does not saturate the softmax (-1.5): a kernel that ignores mask_value
    (and applies -100) is caught; -100 and -1e4 both zero the masked probabilities."""
    device = require_backend(OP, kernel_backend)
    assert_parity(_fn((7, 7), (3, 3), (2, 2), mask_value=-1.5), _inputs(4, 1, (7, 7), 32, None, device), GRADS,
                  dtype, backend=kernel_backend, op=OP)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("ws,shift,grid", [((7, 7), (3, 3), (1, 2)), ((12, 12), (6, 6), (1, 1))],
                         ids=["n49-one-tile", "n144-key-loop"])
def test_peaked_logits(kernel_backend, ws, shift, grid, dtype):
    """Logits near 120 (exp overflows fp32 past 88.7): a softmax that forgets to subtract the row
    maximum fails, in the one-tile path and in the online key loop, in every dtype."""
    device = require_backend(OP, kernel_backend)
    t = _inputs(grid[0] * grid[1], 1, ws, 32, None, device)
    t["q"], t["k"] = t["q"] * 5.5, t["k"] * 5.5
    logits = (t["q"] * 32 ** -0.5) @ t["k"].transpose(-2, -1)
    assert logits.max() > 100
    assert_parity(_fn(ws, shift, grid), t, GRADS, dtype, backend=kernel_backend, op=OP)


def test_fp32_table_with_half_inputs(kernel_backend):
    """An fp32 bias table with fp16 q, k, v (autocast-style mixed inputs)."""
    device = require_backend(OP, kernel_backend)
    t = _inputs(4, 1, (7, 7), 32, None, device)
    t = {k: v.half() for k, v in t.items()}
    t["bias_table"] = t["bias_table"].float()

    def fn(backend, q, k, v, bias_table):
        return semask_fast.window_attention(q, k, v, bias_table.float(), window_size=7, shift_size=3, grid=(2, 2),
                                            backend=backend)

    # _clone_inputs casts every input to the test dtype, so cast the table back in fn.
    assert_parity(fn, t, GRADS, torch.float16, backend=kernel_backend, op=OP)


def test_strided_qkv(kernel_backend):
    """q, k, v as timm makes them: permuted views of one qkv tensor (non-contiguous)."""
    device = require_backend(OP, kernel_backend)
    b_, h, n, d = 2, 2, 49, 32
    qkv = torch.randn(b_, n, 3, h, d, dtype=torch.float64, device=device)
    bias = torch.randn(169, h, dtype=torch.float64, device=device)

    def fn(backend, qkv, bias_table):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return semask_fast.window_attention(q, k, v, bias_table, window_size=7, shift_size=3, grid=(1, 2),
                                            backend=backend)

    assert_parity(fn, {"qkv": qkv, "bias_table": bias}, ["qkv", "bias_table"], torch.float32,
                  backend=kernel_backend, op=OP)


# --------------------------------------------------------------------------- #
# triton (through the dispatcher)
# --------------------------------------------------------------------------- #


def _triton():
    require_backend(OP, "triton")
    from semask_fast.kernels import window_attention as k

    return k


def _reference_logits(q, k, table, ws, shift, grid, scale):
    attn = (q * scale) @ k.transpose(-2, -1)
    n = q.shape[2]
    idx = reference.relative_position_index(ws)
    attn = attn + table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1)
    if any(shift):
        m = reference.shift_mask(grid, ws, shift, dtype=attn.dtype)
        attn = (attn.view(-1, m.shape[0], *attn.shape[1:]) + m[None, :, None]).view(attn.shape)
    return attn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_triton_dropout_replay(dtype):
    """The kernel's keep-mask, materialised for the same seed, reproduces forward and every gradient."""
    k = _triton()
    device = require_backend(OP, "triton")
    p = 0.3
    t = {n: v.to(dtype).requires_grad_() for n, v in _inputs(4, 2, (7, 7), 16, None, device).items()}
    torch.manual_seed(123)
    seed = _next_seed("triton", device=device)
    keep = k.dropout_keep_mask(seed, 4, 2, 49, p, device=device)
    assert 0.6 < keep.float().mean().item() < 0.8
    torch.manual_seed(123)
    with record_dispatch() as ran:
        out = semask_fast.window_attention(t["q"], t["k"], t["v"], t["bias_table"], window_size=7, shift_size=3,
                                           grid=(2, 2), dropout_p=p, backend="triton")
        gout = torch.randn_like(out)
        grads = torch.autograd.grad(out, [t[n] for n in GRADS], gout)
    assert ran == [(OP, "triton", "forward"), (OP, "triton", "backward")]
    ref_in = {n: v.detach().double().requires_grad_() for n, v in t.items()}
    ref = reference.window_attention(ref_in["q"], ref_in["k"], ref_in["v"], ref_in["bias_table"], window_size=(7, 7),
                                     shift_size=(3, 3), grid=(2, 2), dropout_p=p, dropout_keep=keep)
    ref_grads = torch.autograd.grad(ref, [ref_in[n] for n in GRADS], gout.double())
    assert_close(out, ref, dtype, what="out")
    for name, g, r in zip(GRADS, grads, ref_grads):
        assert_close(g, r, dtype, backward=True, what=f"d{name}")


@pytest.mark.parametrize("ws,grid", [((7, 7), (2, 3)), ((12, 12), (1, 2))], ids=["n49", "n144"])
def test_triton_table_grad_deterministic(ws, grid):
    """Two backward runs give a bitwise-identical table gradient (no atomics)."""
    device = require_backend(OP, "triton")
    t = {n: v.float() for n, v in _inputs(grid[0] * grid[1], 1, ws, 16, None, device).items()}
    table_grads = []
    for _ in range(2):
        table = t["bias_table"].clone().requires_grad_()
        out = semask_fast.window_attention(t["q"], t["k"], t["v"], table, window_size=ws, shift_size=ws[0] // 2,
                                           grid=grid, backend="triton")
        out.backward(torch.ones_like(out))
        table_grads.append(table.grad)
    assert torch.equal(table_grads[0], table_grads[1])


def test_triton_reasons_head_dim():
    """Unsupported-but-valid inputs give a readable reason; forcing the backend raises it."""
    _triton()
    q = torch.randn(1, 1, 4, 256)
    with pytest.raises(BackendNotSupportedError, match="head_dim=256"):
        semask_fast.window_attention(q, q, q, window_size=2, backend="triton")


# --------------------------------------------------------------------------- #
# triton launchers with explicit plans (tests/kernels/_launch_parity.py)
# --------------------------------------------------------------------------- #


@ids([torch.float32, torch.bfloat16])
def test_window_gpu_tiles(dtype):
    """The 16-token tiles GPUs run (the interpreter's default is 32, same kernel code)."""
    k = kernels("window_attention")
    t = rounded(window_inputs(2, 1, (7, 7), 32), dtype)
    geo = k.Geometry((7, 7), 2, 1, 32)
    bwd = k.backward_plan(geo, dtype, interpreter=False)
    assert (bwd["main"]["BLOCK"], bwd["main"]["NT"]) == (16, 4)
    run_window(k, t, (7, 7), (3, 3), (1, 2), k.forward_plan(geo, dtype, interpreter=False), bwd)


@ids([torch.float32, torch.float16])
def test_window_several_windows_per_program(dtype):
    """Four windows per program (the packing large batches get): the forward's one-tile path (fp16)
    and key loop (fp32), and the backward's partial sums over windows; the table-gradient fold in
    chunks of 2 groups of 4 windows' partials."""
    k = kernels("window_attention")
    t = rounded(window_inputs(16, 1, (7, 7), 32), dtype)
    geo = k.Geometry((7, 7), 16, 1, 32)
    fwd = dataclasses.replace(k.forward_plan(geo, dtype), per_program=4)
    bwd = k.backward_plan(geo, dtype)
    bwd = dict(main=dataclasses.replace(bwd["main"], per_program=4), table=bwd["table"].with_tiles(CHUNK=2))
    run_window(k, t, (7, 7), (3, 3), (4, 4), fwd, bwd)


@pytest.mark.parametrize("ws,shift,grid", [((7, 7), (3, 3), (1, 2)), ((12, 12), (6, 6), (1, 2))],
                         ids=["n49", "n144"])
def test_window_logsumexp(ws, shift, grid):
    k = kernels("window_attention")
    t = {n: v.float() for n, v in window_inputs(2, 2, ws, 32).items()}
    geo = k.Geometry(ws, 2, 2, 32, grid=grid, shift=shift)
    _, lse = k.window_attention_forward(t["q"], t["k"], t["v"], geo, t["bias_table"], scale=32 ** -0.5)
    logits = (t["q"].double() * 32 ** -0.5) @ t["k"].double().transpose(-2, -1)
    idx = reference.relative_position_index(ws)
    logits = logits + t["bias_table"].double()[idx.view(-1)].view(ws[0] * ws[1], -1, 2).permute(2, 0, 1)
    mask = reference.shift_mask(grid, ws, shift, dtype=torch.float64)
    logits = (logits.view(-1, mask.shape[0], *logits.shape[1:]) + mask[None, :, None]).view(logits.shape)
    assert_close(lse, torch.logsumexp(logits, -1), torch.float32, what="lse")


def test_window_table_fold_chunks():
    """The table-gradient tree: ~sqrt(groups) groups per fold program; any chunking gives the gradient
    (up to rounding) and one chunking always gives the same bits."""
    k = kernels("window_attention")
    assert [k.table_chunk(g) for g in (1, 2, 5, 16, 17, 512)] == [1, 2, 4, 4, 8, 32]
    t = {n: v.float() for n, v in window_inputs(8, 2, (4, 4), 16).items()}
    geo = k.Geometry((4, 4), 8, 2, 16, grid=(2, 2), shift=(2, 2))
    base = k.backward_plan(geo, torch.float32)
    main = dataclasses.replace(base["main"], per_program=1)  # 8 groups
    _, lse = k.window_attention_forward(t["q"], t["k"], t["v"], geo, t["bias_table"], scale=0.25)
    out, _ = k.window_attention_forward(t["q"], t["k"], t["v"], geo, t["bias_table"], scale=0.25)
    gout = torch.randn_like(out)
    tables = {}
    for chunk in (1, 2, 8):
        plan = dict(main=main, table=base["table"].with_tiles(CHUNK=chunk))
        runs = [k.window_attention_backward(t["q"], t["k"], t["v"], out, gout, lse, geo, t["bias_table"],
                                            scale=0.25, plan=plan)[3] for _ in range(2)]
        assert torch.equal(runs[0], runs[1])
        tables[chunk] = runs[0]
    for chunk in (2, 8):  # the same sums in another order
        assert_close(tables[chunk], tables[1], tol=REORDERED_FP32, what=f"table gradient, chunk {chunk}")


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_window_table_fold_launch_model(stage):
    """Swin-T at B = 128 (224 x 224): the table-gradient fold fills at least a wave of a large GPU
    (132 SMs) and no program loops over more than 32 groups (it was 33 programs x 512 groups)."""
    k = kernels("window_attention")
    windows, heads = 4 ** (4 - stage), 3 * 2 ** (stage - 1)
    geo = k.Geometry((7, 7), 128 * windows, heads, 32)
    plan = k.backward_plan(geo, torch.float16, interpreter=False)
    groups = geo.num_windows // plan["main"].per_program
    chunk = plan["table"]["CHUNK"]
    programs = -(-169 // plan["table"]["BLOCK_R"]) * heads * -(-groups // chunk)
    assert programs >= 132 and chunk <= 32, (groups, chunk, programs)


@ids([torch.float32, torch.float16])
def test_window_dropout_replay(dtype):
    """The keep-mask materialised for a seed reproduces forward and every gradient."""
    k = kernels("window_attention")
    p, seed = 0.3, 1234
    keep = k.dropout_keep_mask(seed, 4, 2, 49, p)
    assert 0.6 < keep.float().mean().item() < 0.8
    t = rounded(window_inputs(4, 2, (7, 7), 16), dtype)
    geo = k.Geometry((7, 7), 4, 2, 16, grid=(2, 2), shift=(3, 3))
    out, lse = k.window_attention_forward(t["q"], t["k"], t["v"], geo, t["bias_table"], scale=0.25, dropout_p=p,
                                          seed=seed)
    (gout,) = grad_outputs_like([out])
    dq, dk, dv, d_table = k.window_attention_backward(t["q"], t["k"], t["v"], out, gout, lse, geo, t["bias_table"],
                                                      scale=0.25, dropout_p=p, seed=seed)

    def ref(q, k, v, bias_table):
        return reference.window_attention(q, k, v, bias_table, window_size=(7, 7), shift_size=(3, 3), grid=(2, 2),
                                          scale=0.25, dropout_p=p, dropout_keep=keep)

    assert_matches_reference([out], dict(q=dq, k=dk, v=dv, bias_table=d_table), ref, t, [gout])


def test_window_dropout_seed_changes_mask():
    k = kernels("window_attention")
    a = k.dropout_keep_mask(1, 2, 2, 49, 0.5)
    assert torch.equal(a, k.dropout_keep_mask(1, 2, 2, 49, 0.5))
    assert not torch.equal(a, k.dropout_keep_mask(2, 2, 2, 49, 0.5))


def test_window_plan_must_divide_the_windows():
    k = kernels("window_attention")
    t = {n: v.float() for n, v in window_inputs(6, 1, (2, 2), 16).items()}
    geo = k.Geometry((2, 2), 6, 1, 16)
    plan = dataclasses.replace(k.forward_plan(geo, torch.float32), per_program=4)
    with pytest.raises(ValueError, match="per_program=4 must divide the B\\*nW=6 windows"):
        k.window_attention_forward(t["q"], t["k"], t["v"], geo, scale=0.25, plan=plan)


# ------------------------------------------------------------ adversarial inputs --
#: Window tiles: 64 = the window (N = 49) as one tile, 16 = four tiles (the key loop / multi-tile backward).
WINDOW_TILES = pytest.mark.parametrize("tile", [64, 16], ids=["one-tile", "four-tiles"])


def _window_plans(k, geo, dtype, tile):
    fwd = k.forward_plan(geo, dtype)
    bwd = k.backward_plan(geo, dtype)
    tiles = dict(BLOCK=tile, NT=-(-geo.n // tile))
    return fwd.with_tiles(**tiles), dict(bwd, main=bwd["main"].with_tiles(**tiles))


def _peaked_window_inputs(dtype):
    """k = q = 3.9 z, d = 64, scale 1/8: the diagonal logit 1.9 |z|^2 is ~120 (above 88.7 in most rows)."""
    t = window_inputs(2, 1, (7, 7), 64)
    t["q"] = t["q"] * 3.9
    t["k"] = t["q"].clone()
    return rounded(t, dtype)


@ids()
@WINDOW_TILES
def test_window_peaked_logits(tile, dtype):
    k = kernels("window_attention")
    t = _peaked_window_inputs(dtype)
    logits = t["q"].double() @ t["k"].double().transpose(-2, -1) / 8
    assert (logits.amax(-1) > 90).float().mean() > 0.5
    geo = k.Geometry((7, 7), 2, 1, 64, grid=(1, 2), shift=(3, 3))
    run_window(k, t, (7, 7), (3, 3), (1, 2), *_window_plans(k, geo, dtype, tile))


@ids()
@WINDOW_TILES
def test_window_mild_mask_value(tile, dtype):
    k = kernels("window_attention")
    t = rounded(window_inputs(2, 2, (7, 7), 16), dtype)
    geo = k.Geometry((7, 7), 2, 2, 16, grid=(1, 2), shift=(3, 3))
    run_window(k, t, (7, 7), (3, 3), (1, 2), *_window_plans(k, geo, dtype, tile), mask_value=-1.5)


# --------------------------------------------------------------------------- #
# cpu (the native C++ kernels of csrc/cpu/window_attention.cpp)
# --------------------------------------------------------------------------- #

# (B*nW, heads, window, head_dim, shift, grid, explicit-mask nW): small, every logit path, head dims
# that fill no vector (5) and two vectors (32).
CPU_GRADCHECK_SHAPES = {
    "shift-table": (4, 2, (3, 3), 5, (1, 1), (2, 2), None),
    "explicit-mask-nonsquare": (4, 1, (2, 3), 8, (0, 0), None, 2),
    "no-shift-d32": (2, 1, (2, 2), 32, (0, 0), None, None),
}


@pytest.mark.parametrize("name", list(CPU_GRADCHECK_SHAPES))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_cpu_gradcheck_float64(name, dropout_p):
    """torch.autograd.gradcheck on the kernels themselves (fp64): output and every gradient, with
    dropout too (the seed is fixed per call, so the kernel is one function of its inputs)."""
    require_backend(OP, "cpu")
    b_, h, ws, d, shift, grid, mask_nw = CPU_GRADCHECK_SHAPES[name]
    t = _inputs(b_, h, ws, d, mask_nw, "cpu")
    mask = t.pop("mask", None)
    inputs = tuple(t[n].requires_grad_() for n in GRADS)

    def fn(q, k, v, table):
        torch.manual_seed(0)
        return semask_fast.window_attention(q, k, v, table, window_size=ws, shift_size=shift, grid=grid, mask=mask,
                                            dropout_p=dropout_p, backend="cpu")

    with record_dispatch() as ran:
        assert torch.autograd.gradcheck(fn, inputs, **GRADCHECK)
    assert (OP, "cpu", "forward") in ran and (OP, "cpu", "backward") in ran
    assert {b for _, b, _ in ran} == {"cpu"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"])
def test_cpu_dropout_replay(dtype):
    """The kernels' keep-mask (the GPU kernels' Philox hash, replayed in numpy) reproduces the
    forward and every gradient in the reference."""
    require_backend(OP, "cpu")
    p, b_, h = 0.3, 4, 2
    t = {n: v.to(dtype).requires_grad_() for n, v in _inputs(b_, h, (7, 7), 16, None, "cpu").items()}
    torch.manual_seed(123)
    keep = dropout_keep(_next_seed("cpu"), (b_, h, 49, 49), p)
    assert 0.6 < keep.float().mean().item() < 0.8
    torch.manual_seed(123)
    with record_dispatch() as ran:
        out = semask_fast.window_attention(t["q"], t["k"], t["v"], t["bias_table"], window_size=7, shift_size=3,
                                           grid=(2, 2), dropout_p=p, backend="cpu")
        gout = torch.randn_like(out)
        grads = torch.autograd.grad(out, [t[n] for n in GRADS], gout)
    assert ran == [(OP, "cpu", "forward"), (OP, "cpu", "backward")]
    r = {n: v.detach().double().requires_grad_() for n, v in t.items()}
    ref = reference.window_attention(r["q"], r["k"], r["v"], r["bias_table"], window_size=(7, 7), shift_size=(3, 3),
                                     grid=(2, 2), dropout_p=p, dropout_keep=keep)
    ref_grads = torch.autograd.grad(ref, [r[n] for n in GRADS], gout.double())
    from semask_fast.testing import TOLERANCES

    tol = TOLERANCES[dtype][1]
    torch.testing.assert_close(out.double(), ref, atol=tol.atol, rtol=tol.rtol)
    for name, g, rg in zip(GRADS, grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=tol.atol, rtol=tol.rtol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_cpu_half_dropout_isolated_tokens(dtype):
    """Windows of 2x2 shifted by 1 on a 1x1 grid: the shift mask isolates every token, P is one-hot,
    and every d(bias_table) entry is ~0.  With dropout, O = v / (1 - p) rounds to the half type, so
    a backward that takes rowsum(dO O) from the rounded output leaves dS = dO (O - round(O)) per
    token (0.07 summed into the table here in bf16, over its 0.05 tolerance); the cpu kernels take
    it as rowsum(P dP) from their float32 tiles."""
    require_backend(OP, "cpu")
    p, b_, h, d = 0.3, 16, 2, 32
    t = {n: v.to(dtype).requires_grad_() for n, v in _inputs(b_, h, (2, 2), d, None, "cpu").items()}
    torch.manual_seed(7)
    keep = dropout_keep(_next_seed("cpu"), (b_, h, 4, 4), p)
    torch.manual_seed(7)
    kw = dict(window_size=(2, 2), shift_size=(1, 1), grid=(1, 1), dropout_p=p)
    with record_dispatch() as ran:
        out = semask_fast.window_attention(t["q"], t["k"], t["v"], t["bias_table"], backend="cpu", **kw)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        grads = torch.autograd.grad(out, [t[n] for n in GRADS], gout)
    assert ran == [(OP, "cpu", "forward"), (OP, "cpu", "backward")]
    r = {n: v.detach().double().requires_grad_() for n, v in t.items()}
    ref = reference.window_attention(r["q"], r["k"], r["v"], r["bias_table"], dropout_keep=keep, **kw)
    ref_grads = torch.autograd.grad(ref, [r[n] for n in GRADS], gout.double())
    assert_close(out, ref, dtype, what="out")
    for name, g, rg in zip(GRADS, grads, ref_grads):
        assert_close(g, rg, dtype, backward=True, what=name)


def _cpu_fwd_bwd(t, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = {n: v.detach().clone().requires_grad_() for n, v in t.items()}
        out = semask_fast.window_attention(x["q"], x["k"], x["v"], x["bias_table"], window_size=7, shift_size=3,
                                           grid=(3, 3), backend="cpu")
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        return [out] + [x[n].grad for n in GRADS]
    finally:
        torch.set_num_threads(previous)


def test_cpu_bitwise_independent_of_thread_count():
    """Every output and gradient (the table's, summed over windows, included) is bitwise the same
    with one thread and with two: the reduction order is fixed by the shape."""
    require_backend(OP, "cpu")
    t = {n: v.float() for n, v in _inputs(18, 3, (7, 7), 32, None, "cpu").items()}
    one, two = _cpu_fwd_bwd(t, 1), _cpu_fwd_bwd(t, 2)
    for name, a, b in zip(["out"] + GRADS, one, two):
        assert torch.equal(a, b), name


def test_cpu_is_picked_automatically_for_cpu_tensors():
    require_backend(OP, "cpu")
    t = {n: v.float().requires_grad_() for n, v in _inputs(4, 2, (7, 7), 32, None, "cpu").items()}
    with record_dispatch() as ran:
        out = semask_fast.window_attention(t["q"], t["k"], t["v"], t["bias_table"], window_size=7, shift_size=3,
                                           grid=(2, 2))
        out.sum().backward()
    assert ran == [(OP, "cpu", "forward"), (OP, "cpu", "backward")]


def test_cpu_allocates_nothing_quadratic():
    """No (B*nW, h, N, N) tensor in forward or backward: the largest allocation the profiler sees
    is the size of q (the outputs, gradients and saved tensors), far below one logit per pair."""
    require_backend(OP, "cpu")
    b_, h, n, d = 64, 3, 49, 16
    t = {k: v.float().requires_grad_() for k, v in _inputs(b_, h, (7, 7), d, None, "cpu").items()}
    semask_fast.window_attention(t["q"], t["k"], t["v"], t["bias_table"], window_size=7, shift_size=3,
                                 grid=(8, 8), backend="cpu").sum().backward()  # build and warm up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = semask_fast.window_attention(t["q"], t["k"], t["v"], t["bias_table"], window_size=7, shift_size=3,
                                           grid=(8, 8), backend="cpu")
        out.sum().backward()
    # Every allocation goes through aten::empty / empty_strided (in the kernels' bindings too).
    sizes = [e.cpu_memory_usage for e in prof.events() if e.name in ("aten::empty", "aten::empty_strided")]
    assert sizes, "the profiler recorded no allocation"
    assert max(sizes) <= b_ * h * n * d * 4
    assert max(sizes) < b_ * h * n * n * 4 // 2


def test_cpu_reasons_window_tokens():
    require_backend(OP, "cpu")
    from semask_fast.backends.cpu.window_attention import MAX_WINDOW_TOKENS

    q = torch.randn(1, 1, (MAX_WINDOW_TOKENS // 32 + 1) * 32, 4)
    with pytest.raises(BackendNotSupportedError, match="window of N="):
        semask_fast.window_attention(q, q, q, window_size=(MAX_WINDOW_TOKENS // 32 + 1, 32), backend="cpu")


# --------------------------------------------------------------------------- #
# cuda sources: csrc/ops/window_attention.cu under the SIMT harness
# --------------------------------------------------------------------------- #


# ---------------------------------------------------------------- dropout --
@pytest.mark.harness
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_simt_window_dropout_replay(dtype):
    require_backend("window_attention", BACKEND)
    b_, h, ws, d, p = 4, 2, (7, 7), 32, 0.3
    n = ws[0] * ws[1]
    g = torch.Generator().manual_seed(0)
    t = {name: randn(g, b_, h, n, d) for name in ("q", "k", "v")}
    t["bias_table"] = randn(g, 13 * 13, h)
    torch.manual_seed(11)
    keep = dropout_keep(_next_seed("simt"), (b_, h, n, n), p)
    geo = dict(window_size=ws, shift_size=(3, 3), grid=(2, 2))

    def fn(backend, **kw):
        if backend == "reference":
            return reference.window_attention(**kw, **geo, dropout_p=p, dropout_keep=keep)
        torch.manual_seed(11)  # the seed the forward draws
        return semask_fast.window_attention(**kw, **geo, dropout_p=p, backend=backend)

    assert_parity(fn, t, ["q", "k", "v", "bias_table"], dtype, backend=BACKEND, op="window_attention")


# --------------------------------------------- deterministic table gradient --
@pytest.mark.harness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=IDS)  # FFMA and tensor-core kernels
@pytest.mark.parametrize("b_, h, ws, grid", [
    (4, 2, (7, 7), (2, 2)),
    # 262 windows: the table gradient is summed over chunks of several windows (fp16: 88 chunks of 3,
    # the last holding 1; fp32: 131 of 2), so the fixed order across chunks and within them is tested.
    (262, 2, (2, 2), (2, 131)),
])
def test_table_grad_bitwise_reproducible(monkeypatch, b_, h, ws, grid, dtype):
    require_backend("window_attention", BACKEND)
    g = torch.Generator().manual_seed(2)
    n = ws[0] * ws[1]
    q, k, v = (randn(g, b_, h, n, 8).to(dtype) for _ in range(3))
    table = randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), h).float()
    dout = randn(g, b_, h, n, 8).to(dtype)

    def table_grad():
        tab = table.clone().requires_grad_()
        out = semask_fast.window_attention(q, k, v, tab, window_size=ws, shift_size=(1, 1), grid=grid, backend=BACKEND)
        out.backward(dout)
        return tab.grad

    runs = []
    for seed, threads in (("0", "1"), ("7", "3")):
        monkeypatch.setenv("SF_SIMT_SEED", seed)  # thread order inside a block
        monkeypatch.setenv("SF_SIMT_THREADS", threads)  # blocks on host threads
        runs.append(table_grad())
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    ref_tab = table.double().requires_grad_()
    reference.window_attention(q.double(), k.double(), v.double(), ref_tab, window_size=ws, shift_size=(1, 1),
                               grid=grid).backward(dout.double())
    assert_close(runs[0], ref_tab.grad, dtype, backward=True, what="table gradient")


# ------------------------------------------------------------- edge shapes --
WINDOW_SHAPES = {
    # (B*nW, heads, window, head_dim, shift, grid)
    "d1": (2, 2, (3, 3), 1, (1, 1), (1, 2)),
    "d80-padded": (2, 1, (4, 4), 80, (0, 0), None),
    "nonsquare-12x4-shift-y": (4, 2, (12, 4), 24, (6, 0), (2, 2)),
    # The fused one-tile backward (N <= 64, head_dim <= 64; tensor cores for fp16 / bf16, FFMA for
    # fp32) at its edges, and the first shapes past them (two-kernel paths).
    "w8x8-d64-shift": (4, 2, (8, 8), 64, (4, 4), (2, 2)),  # N = 64: the full tile, head_dim 64
    "w2x2-d40": (3, 5, (2, 2), 40, (0, 0), None),  # N = 4: three warps without rows or keys
    "w1x7-d33-shift": (4, 3, (1, 7), 33, (0, 3), (2, 2)),  # one-row windows, padded head_dim
    "w13x5-shift": (4, 2, (13, 5), 16, (6, 2), (2, 2)),  # N = 65: two-kernel path
    "w4x4-d65": (2, 2, (4, 4), 65, (0, 0), None),  # head_dim 65: two-kernel path
}


@pytest.mark.harness
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(WINDOW_SHAPES))
def test_window_edge_shapes(name, dtype):
    _assert_simt_window_parity(WINDOW_SHAPES[name], dtype, seed=3)


def _assert_simt_window_parity(shape, dtype, seed):
    """Output and every gradient of the simt window kernels at parity for one
    (B*nW, heads, window, head_dim, shift, grid) shape with a bias table."""
    require_backend("window_attention", BACKEND)
    b_, h, ws, d, shift, grid = shape
    n = ws[0] * ws[1]
    g = torch.Generator().manual_seed(seed)
    t = {nm: randn(g, b_, h, n, d) for nm in ("q", "k", "v")}
    t["bias_table"] = randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), h)
    fn = functools.partial(semask_fast.window_attention, window_size=ws, shift_size=shift, grid=grid)
    assert_parity(fn, t, ["q", "k", "v", "bias_table"], dtype, backend=BACKEND, op="window_attention")


@pytest.mark.harness
def test_window_half_mask_and_table():
    """An fp16 explicit mask and an fp16 table with fp16 q: the kernels read them as fp32."""
    require_backend("window_attention", BACKEND)
    g = torch.Generator().manual_seed(4)
    ws, n = (4, 4), 16
    t = {nm: randn(g, 4, 2, n, 16) for nm in ("q", "k", "v")}
    t["bias_table"] = randn(g, 49, 2)
    t["mask"] = torch.where(torch.rand(2, n, n, generator=g) < 0.3, -100.0, 0.0).double()
    fn = functools.partial(semask_fast.window_attention, window_size=ws)
    assert_parity(fn, t, ["q", "k", "v", "bias_table"], torch.float16, backend=BACKEND, op="window_attention")


# ------------------------------- packed rows / tensor-core backward (helper F) --
# The fp16 / bf16 window kernels pack the rows of several (window, head) segments into
# one 64-row block (forward: query rows, dK/dV: keys); these shapes make blocks straddle
# segment boundaries and end on a partial block (rows % 64 != 0).  fp32 runs the FFMA
# kernels on the same shapes.
PACKED_WINDOW_SHAPES = {
    # (B*nW, heads, window, head_dim, shift, grid): rows = B*nW * heads * N
    "n49-noshift": (6, 3, (7, 7), 32, (0, 0), None),              # 882 rows: 13 blocks + 50
    "n49-shift": (6, 3, (7, 7), 32, (3, 3), (2, 3)),
    "n144-noshift": (2, 3, (12, 12), 16, (0, 0), None),           # 864 rows: 13 blocks + 32
    "n144-shift": (2, 3, (12, 12), 16, (6, 6), (1, 2)),
}


@pytest.mark.harness
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(PACKED_WINDOW_SHAPES))
def test_window_packed_rows(name, dtype):
    _assert_simt_window_parity(PACKED_WINDOW_SHAPES[name], dtype, seed=7)


# --------------------------------------- window q, k, v as strided views --
# The timm drop-in projects (B_, N, C) to one (B_, N, 3, h, d) tensor and passes q, k, v as its
# permuted views (B_, h, N, d), strides (N*3*h*d, d, 3*h*d, 1); the output is used transposed to
# (B_, N, h, d), so dO arrives as a transposed view too.  The kernels read both in place.
WINDOW_VIEW_CASES = {
    # (B_, heads, window, head_dim, shift, grid)
    "n49-fused": (4, 3, (7, 7), 32, (3, 3), (2, 2)),  # fused backward; packed forward rows (fp16 / bf16)
    "n72-two-kernel": (4, 2, (9, 8), 16, (4, 3), (2, 2)),  # two-kernel backward, packed dK/dV keys
    "n4-d80": (6, 3, (2, 2), 80, (0, 0), None),  # segments of 4 rows, padded head_dim, two-kernel
    "n2-d8": (5, 3, (1, 2), 8, (0, 0), None),  # segments of 2 rows: a staging pass spans several
}


@pytest.mark.harness
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(WINDOW_VIEW_CASES))
def test_window_strided_views_read_in_place(monkeypatch, name, dtype):
    """q, k, v as the timm drop-in cuts them from one fused projection and dO as a transposed view:
    parity with the reference for the output and every gradient (q, k, v through the projection,
    the bias table), and what reaches the library is the views themselves (same data pointer,
    same strides), not contiguous copies."""
    require_backend("window_attention", BACKEND)
    b_, h, ws, d, shift, grid = WINDOW_VIEW_CASES[name]
    n = ws[0] * ws[1]
    g = torch.Generator().manual_seed(15)
    t = {"qkv": randn(g, b_, n, 3, h, d), "bias_table": randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), h)}
    calls = spy_window_library(monkeypatch)
    seen = []

    def fn(backend, qkv, bias_table):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if backend == BACKEND:
            seen.append((q, k, v))
        out = semask_fast.window_attention(q, k, v, bias_table, window_size=ws, shift_size=shift, grid=grid,
                                           backend=backend)
        return out.transpose(1, 2)

    assert_parity(fn, t, ["qkv", "bias_table"], dtype, backend=BACKEND, op="window_attention")
    (views,) = seen
    forward, backward = calls
    assert forward["call"] == "forward" and backward["call"] == "backward"
    for call in (forward, backward):
        for nm, view in zip("qkv", views):
            assert view.stride() == (n * 3 * h * d, d, 3 * h * d, 1)
            assert (call[nm].data_ptr(), call[nm].stride()) == (view.data_ptr(), view.stride()), f"{call['call']}: {nm}"
    assert backward["dout"].stride() == (n * h * d, d, h * d, 1)


# ------------------------------------------- table-gradient chunk plan --
@pytest.mark.harness
def test_window_chunk_plan():
    plan = cuda_module("window_attention").windows_per_chunk
    # Swin-T stage 1 at batch 1 (64 windows, h = 3, N = 49): the fused kernel (a block per head,
    # every dtype) keeps one window per chunk; past it (N = 144), the fp32 FFMA dQ kernel (27
    # blocks a window) packs 3 of 16 windows (the grid keeps 128 blocks).
    assert plan(64, 3, 49, 32, torch.float16) == 1
    assert plan(64, 3, 49, 32, torch.float32) == 1
    assert plan(16, 3, 144, 32, torch.float32) == 3
    # Enough windows: the partials (written once, read once) stay within 10% of the backward's
    # minimum traffic, and the grid keeps a wave of blocks.
    for b_, h, n, d, dtype in [(512, 3, 49, 32, torch.float16), (2048, 3, 144, 32, torch.bfloat16),
                               (4096, 24, 49, 32, torch.float32), (8192, 2, 4, 8, torch.float16)]:
        k = plan(b_, h, n, d, dtype)
        chunks = -(-b_ // k)
        itemsize = torch.empty((), dtype=dtype).element_size()
        fused = n <= 64 and d <= 64
        slice_floats = h * 4 * n if fused else h * n * n  # (2Wh-1)(2Ww-1) < 4N folded table rows
        assert 2 * chunks * slice_floats * 4 <= 0.1 * 8 * b_ * h * n * d * itemsize
        blocks = h if fused else h * -(-n // 16) if dtype == torch.float32 else -(-h * n // 64)
        assert chunks * blocks >= 128
    # The buffer stays under 4M floats whatever the shape; the fused kernel's folded partials
    # (h x table rows a chunk) never need packing for memory.
    k = plan(1 << 16, 16, 256, 128, torch.float16)
    assert -(-(1 << 16) // k) * 16 * 256 * 256 <= 1 << 22
    assert plan(4096, 3, 49, 32, torch.float16) == 1


# 12 windows of (5, 3) (the fused one-tile kernel: fp16 on tensor cores, fp32 with FFMA) and of
# (9, 8) (N = 72: the two-kernel paths, tensor-core for fp16, FFMA for fp32).
FORCED_CHUNK_CASES = [("w5x3", torch.float32), ("w5x3", torch.float16), ("w9x8", torch.float32),
                      ("w9x8", torch.float16)]


@pytest.mark.harness
@pytest.mark.parametrize("window,dtype", FORCED_CHUNK_CASES, ids=lambda c: c if isinstance(c, str) else IDS(c))
@pytest.mark.parametrize("per_chunk", [1, 3, 5, 12])  # 12 windows: even, uneven (last chunk 2), one chunk
def test_window_forced_chunks(monkeypatch, per_chunk, window, dtype):
    """Any chunking gives the reference's table gradient, bitwise the same across thread orders.
    Deterministic mode fills uninitialised memory with NaN, so a partial-sum element the
    kernels left unwritten (the buffer is not cleared) poisons the gradient."""
    require_backend("window_attention", BACKEND)
    wa = cuda_module("window_attention")
    b_, h, d, grid = 12, 3, 8, (3, 4)
    ws = (5, 3) if window == "w5x3" else (9, 8)
    n = ws[0] * ws[1]
    g = torch.Generator().manual_seed(9)
    t = {nm: randn(g, b_, h, n, d) for nm in ("q", "k", "v")}
    t["bias_table"] = randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), h)
    fn = functools.partial(semask_fast.window_attention, window_size=ws, shift_size=(2, 1), grid=grid)
    calls = spy_window_library(monkeypatch)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with wa.windows_per_chunk_override(per_chunk):
            assert_parity(fn, t, ["q", "k", "v", "bias_table"], dtype, backend=BACKEND, op="window_attention")
            runs = []
            for seed, threads in (("0", "1"), ("5", "3")):
                monkeypatch.setenv("SF_SIMT_SEED", seed)
                monkeypatch.setenv("SF_SIMT_THREADS", threads)
                tab = t["bias_table"].float().requires_grad_()
                q, k, v = (t[nm].to(dtype) for nm in ("q", "k", "v"))
                fn(q, k, v, tab, backend=BACKEND).backward(torch.ones(b_, h, n, d, dtype=dtype))
                runs.append(tab.grad)
        assert torch.equal(runs[0], runs[1])
    finally:
        torch.use_deterministic_algorithms(was)
    assert {c["per_chunk"] for c in calls if c["call"] == "backward"} == {per_chunk}


@pytest.mark.harness
def test_window_per_chunk_override_is_scoped(monkeypatch):
    """windows_per_chunk_override holds inside its block only, nests, and does not reach other threads."""
    require_backend("window_attention", BACKEND)
    wa = cuda_module("window_attention")
    calls = spy_window_library(monkeypatch)
    b_, h, ws, d = 8, 2, (4, 4), 8
    g = torch.Generator().manual_seed(5)
    q, k, v = (randn(g, b_, h, 16, d).float().requires_grad_() for _ in range(3))
    tab = randn(g, 49, h).float().requires_grad_()
    planned = wa.windows_per_chunk(b_, h, 16, d, torch.float32)
    assert planned not in (2, 3)

    def per_chunk_run():
        semask_fast.window_attention(q, k, v, tab, window_size=ws, backend=BACKEND).sum().backward()
        return calls[-1]["per_chunk"]

    assert_override_is_scoped(wa.windows_per_chunk_override, per_chunk_run, planned)


# The fused backward with the inputs the shapes of WINDOW_SHAPES leave out (every dtype, fp32 being the
# FFMA twin of the tensor-core kernel): an explicit (nW, N, N) mask with a table, and no table
# at batch 1 (one window: no fold, no chunk sum).
FUSED_INPUT_CASES = {
    # (B*nW, heads, window, head_dim, explicit-mask nW, table)
    "w3x5-d16-mask": (4, 2, (3, 5), 16, 2, True),
    "w7x7-d64-no-table-batch1": (1, 3, (7, 7), 64, None, False),
}


@pytest.mark.harness
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("name", list(FUSED_INPUT_CASES))
def test_window_fused_backward_inputs(name, dtype):
    require_backend("window_attention", BACKEND)
    b_, h, ws, d, mask_nw, table = FUSED_INPUT_CASES[name]
    n = ws[0] * ws[1]
    g = torch.Generator().manual_seed(11)
    t = {nm: randn(g, b_, h, n, d) for nm in ("q", "k", "v")}
    grads = ["q", "k", "v"]
    if table:
        t["bias_table"] = randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), h)
        grads.append("bias_table")
    if mask_nw:
        # Swin-like: 0 or -100 per pair, the diagonal kept (no row fully masked).
        m = torch.where(torch.rand(mask_nw, n, n, generator=g) < 0.3, -100.0, 0.0).double()
        t["mask"] = m * (1 - torch.eye(n, dtype=torch.float64))
    fn = functools.partial(semask_fast.window_attention, window_size=ws)
    assert_parity(fn, t, grads, dtype, backend=BACKEND, op="window_attention")


@pytest.mark.harness
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("table", [True, False], ids=["table", "no-table"])
def test_window_fused_backward_reads_inputs_once(table, dtype):
    """Swin-like windows (N = 49, shift) in every dtype take the fused backward: one launch, plus
    the chunk sum of the folded table partials with a table.  Counted by the harness tracer
    (unique bytes per launch): q, k, v, dO, O, lse and the table are read once, every gradient
    byte is written once, and the only workspace is the (chunks, h, table rows) partials,
    written once and read once."""
    require_toolchain("trace", "simt")
    b_, h, ws, d, shift, grid = 4, 2, (7, 7), 32, (3, 3), (2, 2)
    n, trows = ws[0] * ws[1], (2 * ws[0] - 1) * (2 * ws[1] - 1)
    g = torch.Generator().manual_seed(12)
    q, k, v, dout = (randn(g, b_, h, n, d).to(dtype) for _ in range(4))
    tab = randn(g, trows, h).float() if table else None
    args = (tab, None, *ws, *grid, *shift, d ** -0.5, -100.0, 0.0, torch.tensor(0))
    lib = _build.load("simt", "window_attention.cu")
    out, lse = lib.window_attention_forward(q, k, v, *args)
    regions, grads = [], []
    traffic = harness_bytes("window_attention.cu", lambda tl: grads.extend(
        tl.window_attention_backward(dout, q, k, v, out, lse, *args, 1, True, True, True, True)),
        [dout, q, k, v, out, lse, tab],
        regions)
    assert traffic.launches == (2 if table else 1)
    read = {r["begin"]: r["read"] for r in regions}
    for x in (q, k, v, dout, out, lse) + ((tab,) if table else ()):
        assert read[x.data_ptr()] == x.nbytes
    written = {r["begin"]: (r["written"], r["written_issued"]) for r in regions if r["written"]}
    want = {x.data_ptr(): (x.nbytes, x.nbytes) for x in grads[:3] + (grads[3:] if table else [])}
    partials = b_ * h * trows * 4  # one window per chunk
    workspace = {r["begin"]: (r["written"], r["read"]) for r in regions if r["written"] and r["begin"] not in want}
    assert list(workspace.values()) == ([(partials, partials)] if table else [])
    assert {a: w for a, w in written.items() if a in want} == want


@pytest.mark.harness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=IDS)  # FFMA and tensor-core kernels
def test_window_backward_path_is_the_callers_plan(dtype):
    """The fused-or-not choice is an argument of the kernels (Python's fused_backward plans it): a
    Swin window run through either path gives the same gradients within rounding, and asking the
    fused kernel for a shape it cannot serve (N = 65) raises instead of computing nothing."""
    require_backend("window_attention", BACKEND)
    lib = _build.load("simt", "window_attention.cu")

    def grads(ws, d, fused):
        n = ws[0] * ws[1]
        g = torch.Generator().manual_seed(13)
        q, k, v, dout = (randn(g, 4, 2, n, d).to(dtype) for _ in range(4))
        tab = randn(g, (2 * ws[0] - 1) * (2 * ws[1] - 1), 2).float()
        args = (tab, None, *ws, 2, 2, ws[0] // 2, ws[1] // 2, d ** -0.5, -100.0, 0.0, torch.tensor(0))
        out, lse = lib.window_attention_forward(q, k, v, *args)
        return lib.window_attention_backward(dout, q, k, v, out, lse, *args, 1, fused, True, True, True)

    assert cuda_module("window_attention").fused_backward(49, 32, dtype)
    for fused_grad, split_grad in zip(grads((7, 7), 32, True), grads((7, 7), 32, False)):
        assert_close(fused_grad, split_grad, dtype, backward=True)
    with pytest.raises(RuntimeError, match="fused backward serves"):
        grads((13, 5), 16, True)

