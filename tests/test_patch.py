"""semask_fast.patch: every Swin family, against the real timm / torchvision / transformers layers and
transcriptions of the official Swin / SeMask and mm* layers: outputs and gradients equal to the
original's (fp32, within ``testing.REORDERED_FP32``), at resolutions that need padding, the fast
backend ran, the report."""

import copy

import pytest
import torch
from torch import nn

import semask_fast
from semask_fast import record_dispatch
from semask_fast.nn import ShiftedWindowAttention, ShiftWindowMSA, SwinWindowAttention, WindowAttention
from semask_fast.patch import PatchReport
from semask_fast.testing import REORDERED_FP32

from tests import official_swin as official
from tests.conftest import require_backend

BACKEND = "cpu"
PARTITION_OPS = {"window_partition", "window_attention", "window_merge"}


@pytest.fixture(autouse=True)
def _cpu_backend():
    require_backend("window_attention", BACKEND)


def _randomise_tables(model: nn.Module) -> nn.Module:
    """Tables of order 1 (the inits are ~0.02), so a wrong gather shows in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()
    return model


def _twins(make, seed=0):
    torch.manual_seed(seed)
    orig = _randomise_tables(make())
    return orig, copy.deepcopy(orig)


def _run(model, inputs, out_of):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = out_of(model(*inputs))
    gen = torch.Generator().manual_seed(1)
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, [t.grad for t in inputs if t.requires_grad], grads


def _assert_close(actual, expected, name):
    """Largest error within REORDERED_FP32 of the tensor's largest element: a gradient sums hundreds of
    fp32 products (up to 1e2) and cancels near zero in places, so its error follows its scale, not
    each element."""
    err = (actual - expected).abs().max().item()
    allowed = REORDERED_FP32.atol + REORDERED_FP32.rtol * expected.abs().max().item()
    assert err <= allowed, f"{name}: max error {err:.3g} (allowed {allowed:.3g})"


def _assert_same(orig, patched, inputs, ops, out_of=lambda o: o):
    """Patched outputs and gradients (inputs and every parameter) equal the original's; ``ops`` ran on
    the backend, forward and backward."""
    with record_dispatch() as ran:
        out, in_grads, grads = _run(patched, inputs, out_of)
    assert {op for op, _, _ in ran} == set(ops), ran
    assert {b for _, b, _ in ran} == {BACKEND}, ran
    assert {d for _, _, d in ran} == {"forward", "backward"}, ran
    ref_out, ref_in_grads, ref_grads = _run(orig, inputs, out_of)
    _assert_close(out, ref_out, "output")
    for i, (a, b) in enumerate(zip(in_grads, ref_in_grads)):
        _assert_close(a, b, f"d input {i}")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        _assert_close(grads[name], ref_grads[name], f"d {name}")


def _assert_state_kept(orig, patched):
    """Same state_dict keys, shapes and values after patching."""
    a, b = orig.state_dict(), patched.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- #
# Official Swin / SeMask WindowAttention
# --------------------------------------------------------------------------- #
class _OfficialStage(nn.Module):
    """Two official blocks (W-MSA, SW-MSA) driven as BasicLayer drives them (H, W, padded mask)."""

    def __init__(self, dim=16, heads=2, window=4, qk_scale=None):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(official.SwinBlock(dim, heads, window, shift, qk_scale=qk_scale)
                                    for shift in (0, window // 2))

    def forward(self, x, hw):
        H, W = (int(s) for s in hw)
        Hp, Wp = -(-H // self.window) * self.window, -(-W // self.window) * self.window
        mask = official.shift_attn_mask(Hp, Wp, self.window, self.window // 2)
        for blk in self.blocks:
            blk.H, blk.W = H, W
            x = blk(x, mask)
        return x


@pytest.mark.parametrize("hw", [(8, 12), (9, 11)], ids=["multiple", "padded"])
@pytest.mark.parametrize("qk_scale", [None, 0.3])
def test_official_swin_window_attention(hw, qk_scale):
    orig, patched = _twins(lambda: _OfficialStage(qk_scale=qk_scale))
    report = semask_fast.patch(patched, backend=BACKEND)
    assert [(p.path, p.family) for p in report.patched] == [
        (f"blocks.{i}.attn", "official Swin / SeMask WindowAttention or mm* WindowMSA") for i in (0, 1)]
    assert not report.left
    assert all(type(b.attn) is SwinWindowAttention for b in patched.blocks)
    _assert_state_kept(orig, patched)
    x = torch.randn(2, hw[0] * hw[1], 16)
    _assert_same(orig, patched, [x, torch.tensor(hw)], {"window_attention"})


def test_replacement_adopts_the_original_tensors_mode_and_dropout():
    torch.manual_seed(0)
    block = official.SwinBlock(16, 2, 4, 2, attn_drop=0.25, drop=0.125).eval()
    attn = block.attn
    semask_fast.patch(block, backend=BACKEND)
    new = block.attn
    assert new.qkv is attn.qkv and new.proj is attn.proj
    assert new.relative_position_bias_table is attn.relative_position_bias_table
    assert new.relative_position_index is attn.relative_position_index
    assert "relative_position_index" not in new._non_persistent_buffers_set
    assert not new.training and new.attn_drop.p == 0.25 and new.proj_drop.p == 0.125 and new.backend == BACKEND


# --------------------------------------------------------------------------- #
# mmseg / mmdet / mmpretrain ShiftWindowMSA and WindowMSA
# --------------------------------------------------------------------------- #
class _MMStage(nn.Module):
    def __init__(self, cls=official.ShiftWindowMSA, window=4, **kw):
        super().__init__()
        self.blocks = nn.ModuleList(cls(16, 2, window, shift, **kw) for shift in (0, window // 2))

    def forward(self, x, hw):
        hw = tuple(int(s) for s in hw)
        for blk in self.blocks:
            x = x + blk(x, hw)
        return x


@pytest.mark.parametrize("hw", [(8, 12), (9, 11), (3, 10)], ids=["multiple", "padded", "one-window-row"])
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "partition"])
def test_mmseg_shift_window_msa(hw, zero_copy):
    orig, patched = _twins(_MMStage)
    report = semask_fast.patch(patched, backend=BACKEND, zero_copy=zero_copy)
    assert [(p.path, p.family) for p in report.patched] == [
        (f"blocks.{i}", "mmseg/mmdet/mmpretrain ShiftWindowMSA") for i in (0, 1)]
    assert all(type(b) is ShiftWindowMSA and type(b.w_msa) is SwinWindowAttention for b in patched.blocks)
    _assert_state_kept(orig, patched)
    ops = {"shifted_window_attention"} if zero_copy else PARTITION_OPS
    _assert_same(orig, patched, [torch.randn(2, hw[0] * hw[1], 16), torch.tensor(hw)], ops)


@pytest.mark.parametrize("pad_small_map", [False, True])
@pytest.mark.parametrize("hw", [(4, 9), (6, 7)], ids=["short-side-is-window", "larger"])
def test_mmpretrain_shift_window_msa(pad_small_map, hw):
    orig, patched = _twins(lambda: _MMStage(official.MMPretrainShiftWindowMSA, pad_small_map=pad_small_map))
    report = semask_fast.patch(patched, backend=BACKEND)
    assert len(report.patched) == 2 and all(b.pad_small_map is pad_small_map for b in patched.blocks)
    _assert_same(orig, patched, [torch.randn(1, hw[0] * hw[1], 16), torch.tensor(hw)], {"shifted_window_attention"})


def test_mmpretrain_small_map_without_padding_is_an_error_in_both():
    orig, patched = _twins(lambda: _MMStage(official.MMPretrainShiftWindowMSA, pad_small_map=False))
    semask_fast.patch(patched, backend=BACKEND)
    x = torch.randn(1, 3 * 9, 16)
    with pytest.raises(AssertionError):
        orig(x, (3, 9))
    with pytest.raises(ValueError, match="smaller than the window size"):
        patched(x, (3, 9))


def test_standalone_window_msa_with_the_mask_passed():
    orig, patched = _twins(lambda: nn.Sequential(official.WindowMSA(16, 2, (4, 4))))
    report = semask_fast.patch(patched, backend=BACKEND)
    assert [p.path for p in report.patched] == ["0"] and type(patched[0]) is SwinWindowAttention
    mask = official.shift_attn_mask(8, 12, 4, 2)
    orig_f, patched_f = (lambda x, m=m: m[0](x, mask) for m in (orig, patched))
    _assert_same(_Call(orig, orig_f), _Call(patched, patched_f), [torch.randn(2 * 6, 16, 16)], {"window_attention"})


class _Call(nn.Module):
    """A module whose forward is ``fn`` (the test drives a layer with extra arguments)."""

    def __init__(self, inner, fn):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, *args):
        return self.fn(*args)


# --------------------------------------------------------------------------- #
# torchvision
# --------------------------------------------------------------------------- #
def _torchvision_swin(v2=False):
    tv = pytest.importorskip("torchvision.models.swin_transformer", reason="torchvision is not installed")
    extra = dict(block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2) if v2 else {}
    return tv.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                              stochastic_depth_prob=0.0, num_classes=5, **extra)


@pytest.mark.parametrize("size", [(32, 48), (36, 52), (12, 52)], ids=["multiple", "padded", "one-window-row"])
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "partition"])
def test_torchvision_shifted_window_attention(size, zero_copy):
    orig, patched = _twins(_torchvision_swin)
    report = semask_fast.patch(patched, backend=BACKEND, zero_copy=zero_copy)
    assert [p.family for p in report.patched] == ["torchvision ShiftedWindowAttention"] * 4
    assert [p.path for p in report.patched] == ["features.1.0.attn", "features.1.1.attn", "features.3.0.attn",
                                                "features.3.1.attn"]
    assert not report.left
    assert all(type(m.attn) is ShiftedWindowAttention for m in patched.modules() if hasattr(m, "attn"))
    _assert_state_kept(orig, patched)
    ops = {"shifted_window_attention"} if zero_copy else PARTITION_OPS
    _assert_same(orig, patched, [torch.randn(2, 3, *size)], ops)


def test_torchvision_v2_is_left_with_the_reason():
    model = _torchvision_swin(v2=True)
    report = semask_fast.patch(model, backend=BACKEND)
    assert not report.patched
    assert [m.path for m in report.left] == ["features.1.0.attn", "features.1.1.attn", "features.3.0.attn",
                                             "features.3.1.attn"]
    assert all(m.cls.endswith("ShiftedWindowAttentionV2") and "Swin V2 cosine attention" in m.reason
               for m in report.left)


# --------------------------------------------------------------------------- #
# transformers
# --------------------------------------------------------------------------- #
def _transformers_swin():
    return pytest.importorskip("transformers.models.swin.modeling_swin", reason="transformers is not installed")


def _hf_model(hf, **kw):
    config = hf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                           drop_path_rate=0.0, **kw)
    return hf.SwinModel(config, add_pooling_layer=False)


def _hf_attention_paths(model):
    return [n for n, m in model.named_modules() if hasattr(m, "q_proj") or hasattr(m, "query")]


@pytest.mark.parametrize("size", [(32, 48), (36, 52)], ids=["multiple", "padded"])
def test_transformers_swin_current_layout(size):
    hf = _transformers_swin()
    orig, patched = _twins(lambda: _hf_model(hf))
    report = semask_fast.patch(patched, backend=BACKEND)
    assert [p.path for p in report.patched] == _hf_attention_paths(orig) and len(report.patched) == 4
    assert not report.left
    _assert_state_kept(orig, patched)
    _assert_same(orig, patched, [torch.randn(2, 3, *size)], {"window_attention"},
                 out_of=lambda o: o.last_hidden_state)


def _timm_zero_copy():
    timm = pytest.importorskip("timm", reason="timm is not installed")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(36, 52), patch_size=4,
                              window_size=4, embed_dim=16, depths=(2,), num_heads=(2,), num_classes=3).eval()
    semask_fast.patch(model, backend=BACKEND, zero_copy=True)
    return model, torch.randn(1, 3, 36, 52), lambda o: o


def _hf_patched():
    model = _hf_model(_transformers_swin()).eval()
    semask_fast.patch(model, backend=BACKEND)
    return model, torch.randn(1, 3, 32, 48), lambda o: o.last_hidden_state


@pytest.mark.parametrize("make", [_timm_zero_copy, _hf_patched], ids=["timm-zero-copy", "transformers"])
def test_patched_models_pickle_and_compile(make, tmp_path):
    """A replaced forward is a picklable, traceable callable (not a bound functools.partial or a
    method under another name): torch.save(model) round-trips and torch.compile traces it."""
    model, x, out_of = make()
    with torch.no_grad():
        expected = out_of(model(x))
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
        with record_dispatch() as ran:
            assert torch.equal(out_of(loaded(x)), expected)
        assert {b for _, b, _ in ran} == {BACKEND}
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(out_of(compiled(x)), expected, atol=REORDERED_FP32.atol, rtol=REORDERED_FP32.rtol)


def test_transformers_swin_attention_weights_run_the_original():
    hf = _transformers_swin()
    orig, patched = _twins(lambda: _hf_model(hf, attn_implementation="eager"))
    semask_fast.patch(patched, backend=BACKEND)
    x = torch.randn(1, 3, 36, 52)
    with record_dispatch() as ran, pytest.warns(UserWarning, match="attention weights requested"):
        out = patched(x, output_attentions=True)
    assert not ran
    ref = orig(x, output_attentions=True)
    assert len(out.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions):
        _assert_close(a, b, "attention weights")
    with record_dispatch() as ran:
        patched(x)
    assert ran and {b for _, b, _ in ran} == {BACKEND}


def _hf_v4_windows_module(dropout=0.0):
    return official.HFv4SwinAttention(16, 2, 4, attention_probs_dropout_prob=dropout)


@pytest.mark.parametrize("hw,shift", [((8, 12), 2), ((9, 11), 2), ((9, 11), 0)],
                         ids=["multiple", "padded", "padded-no-shift"])
def test_transformers_swin_v4_layout(hw, shift):
    orig, patched = _twins(_hf_v4_windows_module)
    report = semask_fast.patch(patched, backend=BACKEND)
    assert [(p.path, p.family) for p in report.patched] == [("self", "transformers Swin self-attention (v4 layout)")]
    _assert_state_kept(orig, patched)
    x = torch.randn(2, *hw, 16)
    windows, mask = official.hf_v4_windows(x, 4, shift)
    fns = [(lambda w, m=m: m(w, mask)[0]) for m in (orig, patched)]
    _assert_same(_Call(orig, fns[0]), _Call(patched, fns[1]), [windows], {"window_attention"})


def test_transformers_swin_v4_layout_falls_back_for_weights_and_head_mask():
    orig, patched = _twins(_hf_v4_windows_module)
    semask_fast.patch(patched, backend=BACKEND)
    windows, mask = official.hf_v4_windows(torch.randn(1, 9, 11, 16), 4, 2)
    head_mask = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    for kw, why in ((dict(output_attentions=True), "attention weights"), (dict(head_mask=head_mask), "head_mask")):
        with record_dispatch() as ran, pytest.warns(UserWarning, match=why):
            out = patched(windows, mask, **kw)
        assert not ran
        for a, b in zip(out, orig(windows, mask, **kw)):
            _assert_close(a, b, "attention weights")


# --------------------------------------------------------------------------- #
# timm (through patch_timm)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "copies"])
def test_timm_swin_goes_through_patch_timm(zero_copy):
    timm = pytest.importorskip("timm", reason="timm is not installed")

    def make():
        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(36, 52), patch_size=4,
                                 window_size=4, embed_dim=16, depths=(2,), num_heads=(2,), num_classes=3,
                                 drop_path_rate=0.0)

    orig, patched = _twins(make)
    report = semask_fast.patch(patched, backend=BACKEND, zero_copy=zero_copy)
    assert [(p.path, p.family) for p in report.patched] == [
        (f"layers.0.blocks.{i}.attn", "timm Swin WindowAttention") for i in (0, 1)]
    assert all(type(patched.get_submodule(p.path)) is WindowAttention for p in report.patched)
    _assert_state_kept(orig, patched)
    ops = {"shifted_window_attention"} if zero_copy else {"window_attention"}
    _assert_same(orig, patched, [torch.randn(1, 3, 36, 52)], ops)


def test_timm_report_says_which_blocks_run_zero_copy():
    """timm blocks with a dynamic mask (strict_img_size=False) keep the copy path: the report says so."""
    timm = pytest.importorskip("timm", reason="timm is not installed")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(32, 32), patch_size=4,
                              window_size=4, embed_dim=16, depths=(2,), num_heads=(2,), num_classes=3,
                              strict_img_size=False)
    report = semask_fast.patch(model, backend=BACKEND, zero_copy=True)
    assert report.patched and all("zero-copy" not in p.replacement for p in report.patched), report
    with record_dispatch() as ran:
        model(torch.randn(1, 3, 32, 32))
    assert {op for op, _, _ in ran} == {"window_attention"}


def test_timm_replacement_adopts_the_original_tensors():
    """An optimizer built before patching keeps training the model, and frozen parameters stay
    frozen: the replacement holds timm's own modules and tensors, not copies."""
    timm = pytest.importorskip("timm", reason="timm is not installed")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(32, 32), patch_size=4,
                              window_size=4, embed_dim=16, depths=(2,), num_heads=(2,), num_classes=3)
    attn = model.layers[0].blocks[0].attn
    attn.qkv.weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    semask_fast.patch(model, backend=BACKEND)
    new = model.layers[0].blocks[0].attn
    assert type(new) is WindowAttention and new.qkv is attn.qkv and new.proj is attn.proj
    assert new.relative_position_bias_table is attn.relative_position_bias_table
    assert new.relative_position_index is attn.relative_position_index
    assert not new.qkv.weight.requires_grad
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in model.parameters())
    before = new.relative_position_bias_table.detach().clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert not torch.equal(before, new.relative_position_bias_table)


# --------------------------------------------------------------------------- #
# What is left, and why; the report; arguments
# --------------------------------------------------------------------------- #
class _Unknown(nn.Module):
    """A relative position table in no layout semask_fast knows."""

    def __init__(self):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(49, 2))

    def forward(self, x):
        return x


def test_unsupported_layers_are_left_with_the_reason():
    bad_index = official.ShiftWindowMSA(16, 2, 4, 2)
    bad_index.w_msa.relative_position_index.fill_(0)
    wide = official.SwinWindowAttention(16, (4, 4), 2)
    wide.qkv = nn.Linear(16, 96)
    model = nn.ModuleDict(dict(bad_index=bad_index, wide=wide, unknown=_Unknown(),
                               ok=official.ShiftWindowMSA(16, 2, 4, 2)))
    report = semask_fast.patch(model, backend=BACKEND)
    assert [p.path for p in report.patched] == ["ok"]
    left = {m.path: m.reason for m in report.left}
    assert left.keys() == {"bad_index", "wide", "unknown"}  # bad_index.w_msa is reported once, with its parent
    assert "relative_position_index is not Swin's index" in left["bad_index"]
    assert "qkv 16->96" in left["wide"]
    assert "no layout semask_fast recognises" in left["unknown"]
    assert type(model["bad_index"]) is official.ShiftWindowMSA and type(model["wide"]) is official.SwinWindowAttention


def test_the_model_itself_is_left_unless_its_forward_is_replaced():
    report = semask_fast.patch(official.WindowMSA(16, 2, (4, 4)), backend=BACKEND)
    assert not report.patched and "the model passed in" in report.left[0].reason
    report = semask_fast.patch(_hf_v4_windows_module().self, backend=BACKEND)
    assert [p.path for p in report.patched] == [""]


def test_patching_twice_changes_nothing():
    orig, patched = _twins(_MMStage)
    semask_fast.patch(patched, backend=BACKEND)
    layers = list(patched.modules())
    again = semask_fast.patch(patched, backend=BACKEND)
    assert not again.patched and not again.left and list(patched.modules()) == layers


def test_report_prints_what_was_patched_and_left():
    model = nn.ModuleDict(dict(msa=official.ShiftWindowMSA(16, 2, 4, 2), unknown=_Unknown()))
    report = semask_fast.patch(model, backend=BACKEND, zero_copy=False)
    assert isinstance(report, PatchReport)
    text = str(report)
    assert text.splitlines()[0] == "semask_fast.patch: 1 patched, 1 left (backend='cpu', zero_copy=False)"
    assert "patched msa: mmseg/mmdet/mmpretrain ShiftWindowMSA -> semask_fast.nn.ShiftWindowMSA" in text
    assert "left    unknown (tests.test_patch._Unknown): " in text


@pytest.mark.parametrize("fn", [semask_fast.patch, semask_fast.patch_timm], ids=["patch", "patch_timm"])
def test_bad_arguments_name_what_was_expected(fn):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fn("swin")
    with pytest.raises(ValueError, match="backend='gpu' is not a backend"):
        fn(nn.Linear(2, 2), backend="gpu")
    with pytest.raises(TypeError, match="zero_copy must be a bool"):
        fn(nn.Linear(2, 2), zero_copy="yes")


def test_training_mode_dropout_is_carried():
    """Dropout p reaches the op in training mode (the outputs differ from eval), and eval matches."""
    torch.manual_seed(0)
    model = _MMStage(attn_drop_rate=0.5)
    semask_fast.patch(model, backend=BACKEND)
    x = torch.randn(1, 9 * 11, 16)
    model.eval()
    with torch.no_grad():
        a, b = model(x, (9, 11)), model(x, (9, 11))
        model.train()
        c = model(x, (9, 11))
    assert torch.equal(a, b) and not torch.allclose(a, c)
