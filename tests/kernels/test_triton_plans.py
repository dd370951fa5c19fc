"""The Triton launchers' contract and plans, called directly with explicit plans.

Every op module of ``semask_fast.kernels`` has ``<op>_forward`` / ``<op>_backward``
(allocate and return; dropout seed given by the caller) and ``forward_plan`` /
``backward_plan`` (``interpreter=False``: the tiles compiled for GPUs, which the
interpreter runs here too).  Replaces the tests that monkeypatched
``INTERPRETER_TILES`` / ``MULTI_TILE`` and the ``windows_per_program=`` / ``wpp=``
overrides.
"""

import dataclasses

import pytest
import torch

from semask_fast import reference
from semask_fast.testing import REORDERED_FP32, assert_close
from tests.kernels._launch_parity import assert_matches_reference, atm_inputs, grad_outputs_like, ids, kernels, \
    rounded, run_atm, run_semantic, run_window, semantic_inputs, window_inputs

# --------------------------------------------------------------------------- window attention --


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


def test_shifted_window_gpu_tiles():
    """Image layout (zero-copy launchers) with the GPU tiles, pad tokens taking the qkv bias."""
    k = kernels("window_attention")
    b, H, W, h, d, ws = 1, 10, 13, 1, 16, (7, 7)
    g = torch.Generator().manual_seed(0)
    t = dict(qkv=torch.randn(b, H, W, 3 * h * d, generator=g, dtype=torch.float64),
             bias_table=torch.randn(169, h, generator=g, dtype=torch.float64),
             qkv_bias=torch.randn(3 * h * d, generator=g, dtype=torch.float64))
    t = rounded(t, torch.float32)
    geo = k.Geometry(ws, b * 4, h, d, grid=(2, 2), shift=(3, 3), image_hw=(H, W))
    out, lse = k.shifted_window_attention_forward(t["qkv"], geo, t["bias_table"], t["qkv_bias"], scale=0.25,
                                                  plan=k.forward_plan(geo, torch.float32, interpreter=False))
    (gout,) = grad_outputs_like([out])
    dqkv, d_table, d_bias = k.shifted_window_attention_backward(
        t["qkv"], out, gout, lse, geo, t["bias_table"], t["qkv_bias"], scale=0.25,
        plan=k.backward_plan(geo, torch.float32, interpreter=False))

    def ref(qkv, bias_table, qkv_bias):
        return reference.shifted_window_attention(qkv, bias_table, qkv_bias=qkv_bias, num_heads=h, window_size=ws,
                                                  shift_size=(3, 3), scale=0.25)

    assert_matches_reference([out], dict(qkv=dqkv, bias_table=d_table, qkv_bias=d_bias), ref, t, [gout])


# ------------------------------------------------------------------------ semantic attention --


@ids()
@pytest.mark.parametrize("shape", [(2, 49, 150, 40), (1, 70, 19, 70), (1, 40, 150, 300)],
                         ids=["K150", "K19", "C-tiled"])
def test_semantic_gpu_tiles(shape, dtype):
    """The register-budgeted GPU tiles.  C = 300 is wider than the key-major backward's C tile on every
    dtype (several C tiles, dP in BLOCK_CD chunks); the others hold all of C in one tile.  K = 150 runs
    the two-piece K registers (128 + 32), K = 19 one piece."""
    k = kernels("semantic_attention")
    B, N, K, C = shape
    run_semantic(k, rounded(semantic_inputs(*shape), dtype), k.forward_plan(B, N, K, C, dtype, interpreter=False),
                 k.backward_plan(B, N, K, C, dtype, interpreter=False))


def test_semantic_several_windows_per_program():
    """Three windows per program over 7 windows: the last program's third window does not exist."""
    k = kernels("semantic_attention")
    B, N, K, C = 7, 9, 19, 33
    fwd = dataclasses.replace(k.forward_plan(B, N, K, C, torch.float32), per_program=3)
    bwd = {part: dataclasses.replace(p, per_program=3) for part, p in k.backward_plan(B, N, K, C,
                                                                                         torch.float32).items()}
    run_semantic(k, rounded(semantic_inputs(B, N, K, C), torch.float32), fwd, bwd)


# ----------------------------------------------------------------------------- ATM attention --


@ids()
@pytest.mark.parametrize("d", [32, 64, 128])
def test_atm_gpu_tiles(d, dtype):
    """The GPU tiles: several key and query blocks, head groups with padding heads (5 heads in groups
    of 2 at d = 32) and one group of one head at d = 128."""
    k = kernels("atm_attention")
    shape = (1, 5, 40, 70, d)
    B, H, NQ, NK, D = shape
    bwd = k.backward_plan(H, NQ, NK, D, dtype, interpreter=False)
    if d == 32:
        assert bwd["kv"]["BLOCK_G"] == 2
    run_atm(k, rounded(atm_inputs(*shape), dtype), D ** -0.5, k.forward_plan(H, NQ, NK, D, dtype, interpreter=False),
            bwd)


@ids([torch.float32, torch.float16])
def test_atm_dropout_replay(dtype):
    k = kernels("atm_attention")
    B, H, NQ, NK, D, p, seed = 2, 3, 40, 90, 32, 0.1, 99
    keep = k.dropout_keep_mask(seed, B, H, NQ, NK, p)
    assert 0.85 < keep.float().mean().item() < 0.95
    assert not torch.equal(keep, k.dropout_keep_mask(seed + 1, B, H, NQ, NK, p))
    run_atm(k, rounded(atm_inputs(B, H, NQ, NK, D), dtype), D ** -0.5, dropout_p=p, seed=seed, keep=keep)


# ---------------------------------------------------------------------------- mask similarity --


@ids()
@pytest.mark.parametrize("k_classes", [19, 150])
def test_mask_similarity_gpu_tiles(k_classes, dtype):
    """The GPU tiles with the LayerNorm epilogue: several patch blocks and D chunks."""
    k = kernels("mask_similarity")
    B, NP, D = 1, 70, 40
    g = torch.Generator().manual_seed(0)
    t = dict(patches=torch.randn(B, NP, D, generator=g, dtype=torch.float64),
             classes=torch.randn(B, k_classes, D, generator=g, dtype=torch.float64),
             norm_weight=torch.randn(k_classes, generator=g, dtype=torch.float64),
             norm_bias=torch.randn(k_classes, generator=g, dtype=torch.float64))
    t = rounded(t, dtype)
    out, rp, rc = k.mask_similarity_forward(t["patches"], t["classes"], t["norm_weight"], t["norm_bias"], norm=True,
                                            plan=k.forward_plan(NP, k_classes, D, dtype, interpreter=False))
    (gout,) = grad_outputs_like([out])
    dp, dc, dw, db = k.mask_similarity_backward(t["patches"], t["classes"], t["norm_weight"], rp, rc, gout, norm=True,
                                                plan=k.backward_plan(NP, k_classes, D, dtype, interpreter=False))

    def ref(patches, classes, norm_weight, norm_bias):
        return reference.mask_similarity(patches, classes, norm_weight=norm_weight, norm_bias=norm_bias, norm=True)

    grads = dict(patches=dp, classes=dc, norm_weight=dw.to(dtype), norm_bias=db.to(dtype))
    assert_matches_reference([out], grads, ref, t, [gout])


# ------------------------------------------------------------------------------- the contract --


@pytest.mark.parametrize("module", ["window_attention", "atm_attention", "semantic_attention", "mask_similarity"])
def test_interpreter_plans_only_grow_tiles(module):
    """``interpreter=True`` (the default here) only makes tiles larger: the same kernels and tile names."""
    k = kernels(module)
    shapes = {"atm_attention": (4, 150, 400, 32), "semantic_attention": (2, 49, 150, 96),
              "mask_similarity": (400, 150, 64)}
    args = (k.Geometry((7, 7), 4, 2, 32),) if module == "window_attention" else shapes[module]
    for make in (k.forward_plan, k.backward_plan):
        gpu, interp = make(*args, torch.float16, interpreter=False), make(*args, torch.float16, interpreter=True)
        gpu, interp = (p if isinstance(p, dict) else {"": p} for p in (gpu, interp))
        assert gpu.keys() == interp.keys()
        for part in gpu:
            assert gpu[part].tiles.keys() == interp[part].tiles.keys()
            blocks = [t for t in gpu[part].tiles if t.startswith("BLOCK")]
            assert all(interp[part][t] >= gpu[part][t] for t in blocks), (part, gpu[part], interp[part])


def test_window_plan_must_divide_the_windows():
    k = kernels("window_attention")
    t = {n: v.float() for n, v in window_inputs(6, 1, (2, 2), 16).items()}
    geo = k.Geometry((2, 2), 6, 1, 16)
    plan = dataclasses.replace(k.forward_plan(geo, torch.float32), per_program=4)
    with pytest.raises(ValueError, match="per_program=4 must divide the B\\*nW=6 windows"):
        k.window_attention_forward(t["q"], t["k"], t["v"], geo, scale=0.25, plan=plan)
