"""semask_swin_*: against a transcription of the official SeMask-FPN, the released key layout, backends."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semask_fast
from semask_fast.models import create, list_models
from semask_fast.models.semask_swin import CONFIGS, semantic_window_sizes
from semask_fast.testing import TOLERANCES, assert_close, compare
from tests.conftest import require_backend

SIZES = ("tiny", "small", "base", "large")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- #
# The official model, transcribed from SeMask-FPN (semask_swin_transformer.py,
# branch_fpn_head.py, semask_decode_head.py, mmseg 0.x cross-entropy): the
# official module names and persistent buffers, the official order of pad /
# roll / partition, the explicit -100 shift mask and the plain matmul attention.
# --------------------------------------------------------------------------- #
def _partition(x, ws):
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)


def _reverse(windows, ws, h, w):
    b = windows.shape[0] // (h * w // ws // ws)
    return windows.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


class OffWindowAttention(nn.Module):
    def __init__(self, dim, ws, heads):
        super().__init__()
        self.ws, self.heads = ws, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("relative_position_index", rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1])
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(b_ // nw, nw, self.heads, n, n) + mask[None, :, None]).view(-1, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b_, n, c))


class OffMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class OffSwinBlock(nn.Module):
    def __init__(self, dim, heads, ws, shift):
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = OffWindowAttention(dim, ws, heads)
        self.mlp = OffMlp(dim)

    def forward(self, x, H, W, mask):
        b, _, c = x.shape
        ws, s = self.ws, self.shift
        shortcut = x
        x = F.pad(self.norm1(x).view(b, H, W, c), (0, 0, 0, -W % ws, 0, -H % ws))
        hp, wp = x.shape[1:3]
        if s:
            x = torch.roll(x, (-s, -s), (1, 2))
        x = self.attn(_partition(x, ws).view(-1, ws * ws, c), mask if s else None)
        x = _reverse(x.view(-1, ws, ws, c), ws, hp, wp)
        if s:
            x = torch.roll(x, (s, s), (1, 2))
        x = shortcut + x[:, :H, :W].reshape(b, H * W, c)
        return x + self.mlp(self.norm2(x))


class OffSemanticAttention(nn.Module):
    def __init__(self, dim, n_cls):
        super().__init__()
        self.mlp_cls_q, self.mlp_cls_k = nn.Linear(dim, n_cls), nn.Linear(dim, n_cls)
        self.mlp_v, self.mlp_res = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        seg_map = self.mlp_cls_q(x)
        score = (seg_map @ self.mlp_cls_k(x).transpose(-2, -1)).softmax(-1)
        return seg_map, self.gamma * self.mlp_res(score @ self.mlp_v(x)) + x


class OffSemanticLayer(nn.Module):
    """``SWSeMaskBlock`` (ws given) or ``SeMaskBlock`` (ws None)."""

    def __init__(self, dim, n_cls, ws):
        super().__init__()
        self.ws = ws
        self.norm1 = nn.LayerNorm(dim)
        self.class_injection = nn.ModuleList([OffSemanticAttention(dim, n_cls)])

    def forward(self, x, H, W):
        b, _, c = x.shape
        x = self.norm1(x)
        if self.ws is None:
            sem, x = self.class_injection[0](x)
            return sem, x
        ws = self.ws
        x = F.pad(x.view(b, H, W, c), (0, 0, 0, -W % ws, 0, -H % ws))
        hp, wp = x.shape[1:3]
        sem, x = self.class_injection[0](_partition(x, ws).view(-1, ws * ws, c))
        x = _reverse(x.view(-1, ws, ws, c), ws, hp, wp)[:, :H, :W]
        sem = _reverse(sem.view(-1, ws, ws, sem.shape[-1]), ws, hp, wp)[:, :H, :W]
        return sem.reshape(b, H * W, -1), x.reshape(b, H * W, c)


class OffPatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, H, W):
        b, _, c = x.shape
        x = x.view(b, H, W, c)
        if H % 2 == 1 or W % 2 == 1:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class OffBasicLayer(nn.Module):
    def __init__(self, i, var, dim, depth, heads, ws, n_cls):
        super().__init__()
        self.ws, self.shift = ws, ws // 2
        self.blocks = nn.ModuleList([OffSwinBlock(dim, heads, ws, 0 if j % 2 == 0 else ws // 2) for j in range(depth)])
        self.semantic_layer = OffSemanticLayer(dim, n_cls, None if var == "large" and i >= 2 else ws)
        if i < 3:
            self.downsample = OffPatchMerging(dim)

    def forward(self, x, H, W):
        ws, s = self.ws, self.shift
        hp, wp = -(-H // ws) * ws, -(-W // ws) * ws
        img = torch.zeros(1, hp, wp, 1, dtype=x.dtype)
        cnt = 0
        for h in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for w in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img[:, h, w] = cnt
                cnt += 1
        mw = _partition(img, ws).view(-1, ws * ws)
        mask = mw.unsqueeze(1) - mw.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        for blk in self.blocks:
            x = blk(x, H, W, mask)
        seg_map, x = self.semantic_layer(x, H, W)
        if hasattr(self, "downsample"):
            return x, seg_map, H, W, self.downsample(x, H, W), (H + 1) // 2, (W + 1) // 2
        return x, seg_map, H, W, x, H, W


class OffPatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        _, _, H, W = x.shape
        if W % 4:
            x = F.pad(x, (0, 4 - W % 4))
        if H % 4:
            x = F.pad(x, (0, 0, 0, 4 - H % 4))
        x = self.proj(x)
        wh, ww = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(-1, x.shape[1], wh, ww)


class OffBackbone(nn.Module):
    def __init__(self, embed_dim, depths, heads, ws, n_cls):
        super().__init__()
        var = "large" if embed_dim in (96, 192) and n_cls > 19 else None
        self.n_cls = n_cls
        self.num_features = [embed_dim * 2 ** i for i in range(4)]
        self.patch_embed = OffPatchEmbed(embed_dim)
        self.layers = nn.ModuleList([OffBasicLayer(i, var, self.num_features[i], depths[i], heads[i], ws, n_cls)
                                     for i in range(4)])
        for i in range(4):
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def forward(self, x):
        x = self.patch_embed(x)
        wh, ww = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        outs, cls_outs = [], []
        for i, layer in enumerate(self.layers):
            x_out, cls_out, H, W, x, wh, ww = layer(x, wh, ww)
            x_out = getattr(self, f"norm{i}")(x_out)
            outs.append(x_out.view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2))
            cls_outs.append(cls_out.view(-1, H, W, self.n_cls).permute(0, 3, 1, 2))
        return tuple(outs), cls_outs


class OffConvModule(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class OffBranchFPNHead(nn.Module):
    def __init__(self, in_channels, channels, n_cls):
        super().__init__()
        self.scale_heads = nn.ModuleList()
        self.cls_scale_heads = nn.ModuleList()
        for i, c in enumerate(in_channels):
            head, cls_head = [], []
            for k in range(max(1, i)):
                head.append(OffConvModule(c if k == 0 else channels, channels))
                if i:
                    head.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
                    cls_head.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*head))
            self.cls_scale_heads.append(nn.Sequential(*cls_head))
        self.conv_seg = nn.Conv2d(channels, n_cls, 1)

    def forward(self, inputs):
        x, cls_x = inputs
        out = self.scale_heads[0](x[0])
        for i in range(1, 4):
            out = out + F.interpolate(self.scale_heads[i](x[i]), size=out.shape[2:], mode="bilinear",
                                      align_corners=False)
        cls_out = cls_x[0]
        for i in range(1, 4):
            cls_out = cls_out + F.interpolate(self.cls_scale_heads[i](cls_x[i]), size=cls_out.shape[2:],
                                              mode="bilinear", align_corners=False)
        return self.conv_seg(out), cls_out


class OfficialSeMaskFPN(nn.Module):
    def __init__(self, embed_dim, depths, heads, ws, n_cls, channels=256):
        super().__init__()
        self.backbone = OffBackbone(embed_dim, depths, heads, ws, n_cls)
        self.decode_head = OffBranchFPNHead(self.backbone.num_features, channels, n_cls)

    def encode_decode(self, img):
        seg, _ = self.decode_head(self.backbone(img))
        return F.interpolate(seg, size=img.shape[2:], mode="bilinear", align_corners=False)

    def forward_train(self, img, label):
        """The losses of ``SeMaskBaseDecodeHead.losses`` with mmseg 0.x's ``CrossEntropyLoss``."""
        seg, cls = self.decode_head(self.backbone(img))

        def ce(logit):
            logit = F.interpolate(logit, size=label.shape[1:], mode="bilinear", align_corners=False)
            return F.cross_entropy(logit, label, ignore_index=255, reduction="none").mean()

        return ce(seg) + 0.4 * ce(cls)


def official_model(size, n_cls, **over):
    cfg = dict(CONFIGS[size])
    cfg.update(over)
    return OfficialSeMaskFPN(cfg["embed_dim"], cfg["depths"], cfg["num_heads"], cfg["window_size"], n_cls,
                             cfg.get("channels", 256))


def official_state_dict(size, n_cls, **over):
    """Random weights in the released layout (keys and shapes of the official modules)."""
    off = official_model(size, n_cls, **over)
    with torch.no_grad():
        for name, p in off.named_parameters():
            p.normal_(0, 0.02 if p.dim() > 1 else 0.1).add_(1.0 if name.endswith("norm.weight") else 0.0)
        for m in off.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, OffSemanticAttention):
                m.gamma.fill_(0.5)
    return off, off.state_dict()


# semask_swin_tiny made shallower (2 blocks in stage 2) with a narrower head, small enough to
# run in float64 on 2 cores, with every code path of the full model: shifted and padded
# windows, windowed and global semantic layers (embed 96, K > 19), odd grids, the head.
SMALL = dict(depths=(2, 2, 2, 2), channels=32)
NUM_CLASSES = 21


def _images(b=2, h=66, w=70):
    return torch.randn(b, 3, h, w), torch.randint(0, NUM_CLASSES, (b, h, w))


# --------------------------------------------------------------------------- #
# Registry, configs, released layout
# --------------------------------------------------------------------------- #
def test_registry_lists_the_four_sizes():
    assert {f"semask_swin_{s}" for s in SIZES} <= set(list_models())


def test_the_official_rule_for_global_semantic_stages():
    assert semantic_window_sizes(96, 150, 7) == [7, 7, None, None]
    assert semantic_window_sizes(192, 150, 12) == [12, 12, None, None]
    assert semantic_window_sizes(128, 150, 12) == [12, 12, 12, 12]
    assert semantic_window_sizes(96, 19, 7) == [7, 7, 7, 7]
    model = create("semask_swin_tiny", num_classes=NUM_CLASSES, **SMALL)
    kinds = [layer.semantic_layer.window_size for layer in model.backbone.layers]
    assert kinds == [7, 7, None, None]


@pytest.mark.parametrize("size", SIZES)
def test_layout_matches_the_official_modules(size):
    """Every official key (minus the recomputed relative_position_index) with its shape, nothing else.

    Built on the meta device: no memory, no init; the sizes run the full configs."""
    with torch.device("meta"):
        model = create(f"semask_swin_{size}")
        off = official_model(size, 150)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in off.state_dict().items() if not k.endswith("relative_position_index")}
    assert ours == theirs
    ws = CONFIGS[size]["window_size"]
    assert model.backbone.layers[0].blocks[0].attn.relative_position_bias_table.shape == ((2 * ws - 1) ** 2,
                                                                                          model.backbone.layers[0]
                                                                                          .blocks[0].attn.num_heads)


def test_parameter_counts_match_the_paper():
    """SeMask-FPN parameters as the paper reports them (Table: T 35M, S 56M, B 96M, L 211M, ADE20K)."""
    paper = {"tiny": 35, "small": 56, "base": 96, "large": 211}
    for size, millions in paper.items():
        with torch.device("meta"):
            model = create(f"semask_swin_{size}")
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(count - millions) < 1.0, (size, count)


def test_tiny_loads_the_released_layout_strictly_and_every_key_lands(tmp_path):
    off, sd = official_state_dict("tiny", 150)
    model = create("semask_swin_tiny")
    result = model.load_official_state_dict({"state_dict": sd, "meta": {"iter": 80000}}, strict=True)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    ours = model.state_dict()
    for key, value in sd.items():
        if key.endswith("relative_position_index"):
            owner = model.get_submodule(key.rsplit(".", 1)[0])
            assert torch.equal(owner.relative_position_index, value), key
        else:
            assert torch.equal(ours[key], value), key
    path = tmp_path / "semask_tiny.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    loaded = create("semask_swin_tiny", checkpoint=str(path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.values()))


def test_load_reports_missing_and_unexpected_keys():
    _, sd = official_state_dict("tiny", NUM_CLASSES, **SMALL)
    model = create("semask_swin_tiny", num_classes=NUM_CLASSES, **SMALL)
    sd = dict(sd)
    sd.pop("decode_head.conv_seg.bias")
    sd["auxiliary_head.conv_seg.weight"] = torch.zeros(1)
    sd["auxiliary_head.blocks.0.attn.relative_position_index"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="conv_seg.bias"):
        model.load_official_state_dict(sd)
    result = model.load_official_state_dict(sd, strict=False)
    assert result.missing_keys == ["decode_head.conv_seg.bias"]
    assert sorted(result.unexpected_keys) == ["auxiliary_head.blocks.0.attn.relative_position_index",
                                              "auxiliary_head.conv_seg.weight"]


def test_load_rejects_another_window_size():
    _, sd = official_state_dict("tiny", NUM_CLASSES, **SMALL, window_size=5)
    model = create("semask_swin_tiny", num_classes=NUM_CLASSES, **SMALL)
    with pytest.raises(ValueError, match="another window size"):
        model.load_official_state_dict(sd)


# --------------------------------------------------------------------------- #
# Forward and loss against the transcription (float64, reference backend)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("hw", [(66, 70), (45, 29)], ids=["pad-66x70", "odd-45x29"])
def test_forward_loss_and_grads_match_the_official_code(hw):
    off, sd = official_state_dict("tiny", NUM_CLASSES, **SMALL)
    model = create("semask_swin_tiny", num_classes=NUM_CLASSES, backend="reference", **SMALL)
    model.load_official_state_dict(sd)
    model, off = model.double().eval(), off.double().eval()
    images, labels = _images(2, *hw)
    images = images.double()
    labels[0, :4] = 255
    out = model(images)
    assert out["logits"].shape == (2, NUM_CLASSES, *hw)
    assert_close(out["logits"], off.encode_decode(images), torch.float64, what="logits")
    features, priors = model.backbone(images)
    exp_features, exp_priors = off.backbone(images)
    for a, e in zip(features + tuple(priors), exp_features + tuple(exp_priors)):
        assert_close(a, e, torch.float64)
    loss = model.loss(images, labels)
    expected = off.forward_train(images, labels)
    assert_close(loss, expected, torch.float64, what="loss")
    grads = torch.autograd.grad(loss, list(model.parameters()))
    exp_grads = dict(zip([n for n, _ in off.named_parameters()], torch.autograd.grad(expected, list(off.parameters()))))
    for (name, _), g in zip(model.named_parameters(), grads):
        assert_close(g, exp_grads[name], torch.float64, backward=True, what=name)


def test_init_makes_the_semantic_branch_train():
    """The backbone's trunc_normal re-init after the semantic layers' own: gamma and mlp_res get gradient."""
    model = create("semask_swin_tiny", num_classes=NUM_CLASSES, backend="reference", **SMALL)
    for layer in model.backbone.layers:
        sem = layer.semantic_layer.class_injection[0]
        assert sem.gamma.item() == 0.0 and sem.mlp_res.weight.abs().max() > 0
    images, labels = _images(2, 64, 64)
    model.loss(images, labels).backward()
    for layer in model.backbone.layers:
        sem = layer.semantic_layer.class_injection[0]
        assert sem.gamma.grad.abs().item() > 0
    head = model.decode_head
    assert 0.005 < head.conv_seg.weight.std() < 0.02 and head.conv_seg.bias.abs().max() == 0


def test_bad_inputs_are_clear_errors():
    model = create("semask_swin_tiny", num_classes=NUM_CLASSES, **SMALL)
    with pytest.raises(ValueError, match="images must be a floating tensor"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="images must be a floating tensor"):
        model(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="unknown model"):
        create("semask_swin_huge")


def _head_norms(model):
    return [m.bn for head in model.decode_head.scale_heads for m in head if hasattr(m, "bn")]


def test_head_norm_is_sync_batch_norm_under_nccl_only(monkeypatch):
    """Official SyncBN where torch runs it (an NCCL process group); BatchNorm2d elsewhere."""
    norms = _head_norms(create("semask_swin_tiny", num_classes=NUM_CLASSES, **SMALL))
    assert len(norms) == 1 + 1 + 2 + 3 and all(type(n) is nn.BatchNorm2d for n in norms)
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    norms = _head_norms(create("semask_swin_tiny", num_classes=NUM_CLASSES, **SMALL))
    assert all(type(n) is nn.SyncBatchNorm for n in norms)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    norms = _head_norms(create("semask_swin_tiny", num_classes=NUM_CLASSES, **SMALL))
    assert all(type(n) is nn.BatchNorm2d for n in norms)


# --------------------------------------------------------------------------- #
# Backends: the fast backend against the reference, same seed and weights
# --------------------------------------------------------------------------- #
FAST_OPS = ("shifted_window_attention", "semantic_attention", "window_partition", "window_merge")


def _loss_and_grads(model, images, labels, autocast=False):
    """One training-mode step from a fixed seed (dropout, drop path and Dropout2d draw the same numbers)."""
    torch.manual_seed(1)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(images, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_cpu_backend_matches_reference_in_training(autocast):
    require_backend("shifted_window_attention", "cpu")
    base = create("semask_swin_tiny", num_classes=NUM_CLASSES, backend="reference", **SMALL)
    with torch.no_grad():
        for layer in base.backbone.layers:
            layer.semantic_layer.class_injection[0].gamma.fill_(0.5)
    fast = create("semask_swin_tiny", num_classes=NUM_CLASSES, backend="cpu", **SMALL)
    fast.load_state_dict(base.state_dict())
    exact = copy.deepcopy(base).double()
    images, labels = _images(2, 66, 70)
    labels[1, :5] = 255

    with semask_fast.record_dispatch() as ran:
        loss, grads = _loss_and_grads(fast.train(), images, labels, autocast)
    for op in FAST_OPS:
        assert (op, "cpu", "forward") in ran and (op, "cpu", "backward") in ran, op
    assert not any(backend != "cpu" for _, backend, _ in ran)
    base_loss, base_grads = _loss_and_grads(base.train(), images, labels, autocast)
    exp_loss, exp_grads = _loss_and_grads(exact.train(), images.double(), labels)

    fwd_tol, bwd_tol = TOLERANCES[torch.bfloat16 if autocast else torch.float32]
    # The float64 run drew the same dropout / drop-path masks (else every comparison below is moot).
    assert compare("reference loss", base_loss, exp_loss, fwd_tol).ok
    results = [compare("loss", loss, exp_loss, fwd_tol, base_loss)]
    results += [compare(f"d{n}", grads[n], exp_grads[n], bwd_tol, base_grads[n]) for n in grads]
    bad = [str(r) for r in results if not r.ok]
    assert not bad, bad
