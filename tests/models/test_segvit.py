"""SegViT by name against a transcription of zbwxp/SegVit (ATM head, ATM loss) on mmseg's ViT."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semask_fast import record_dispatch
from semask_fast.models import create
from semask_fast.models.segvit import official_name
from semask_fast.testing import REORDERED_FP32, assert_close
from tests.models._fast_vs_reference import assert_cpu_backend_matches_reference

TINY = dict(img_size=64, embed_dims=32, num_layers=3, num_heads=2, out_indices=(0, 1, 2), head_embed_dims=32,
            head_num_heads=2, head_num_layers=2)
K = 5


# --------------------------------------------------------------------------- #
# Transcription of the official modules: names, shapes, forward and loss
# --------------------------------------------------------------------------- #
class OfficialMmsegLayer(nn.Module):
    """mmseg's TransformerEncoderLayer: mmcv MultiheadAttention (attn.attn) and FFN (ffn.layers)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.ffn = nn.Module(), nn.Module()
        self.attn.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0)),
                                        nn.Linear(4 * dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn.attn(h, h, h)[0]
        return x + self.ffn.layers(self.ln2(x))


class OfficialMmsegViT(nn.Module):
    """mmseg VisionTransformer, SegViT's config: with_cls_token=False, final_norm=False."""

    def __init__(self, img_size, embed_dims, num_layers, num_heads, out_indices, patch_size=16):
        super().__init__()
        self.img_size, self.patch_size, self.out_indices = img_size, patch_size, out_indices
        self.patch_embed = nn.Module()
        self.patch_embed.projection = nn.Conv2d(3, embed_dims, patch_size, patch_size)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (img_size // patch_size) ** 2 + 1, embed_dims))
        self.layers = nn.ModuleList(OfficialMmsegLayer(embed_dims, num_heads) for _ in range(num_layers))

    def forward(self, img):
        ps = self.patch_size
        img = F.pad(img, (0, -img.shape[3] % ps, 0, -img.shape[2] % ps))  # AdaptivePadding 'corner'
        x = self.patch_embed.projection(img)
        hw = x.shape[2:]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)), 1)
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1]:  # resize_pos_embed, bicubic
            g = self.img_size // ps
            w = pos[:, -g * g:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
            w = F.interpolate(w, size=tuple(hw), mode="bicubic", align_corners=False)
            pos = torch.cat((pos[:, :1], w.flatten(2).transpose(1, 2)), 1)
        x = (x + pos)[:, 1:]
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.out_indices:
                outs.append(x.reshape(x.shape[0], *hw, -1).permute(0, 3, 1, 2))
        return outs


class OfficialAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.1):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(attn_drop), nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, xq, xk, xv):
        B, Nq, C = xq.size()
        q = self.q(xq).reshape(B, Nq, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k = self.k(xk).reshape(B, xk.size(1), self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        v = self.v(xv).reshape(B, xv.size(1), self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn_save = attn.clone()
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, Nq, C)))
        return x.transpose(0, 1), attn_save.sum(dim=1) / self.num_heads


class OfficialTPNDecoderLayer(nn.TransformerDecoderLayer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        del self.multihead_attn
        self.multihead_attn = OfficialAttention(kwargs["d_model"], num_heads=kwargs["nhead"])

    def forward(self, tgt, memory):
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt, tgt, tgt)[0]))
        tgt2, attn2 = self.multihead_attn(tgt.transpose(0, 1), memory.transpose(0, 1), memory.transpose(0, 1))
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt = self.norm3(tgt + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(tgt))))))
        return tgt, attn2


class OfficialTPNDecoder(nn.TransformerDecoder):
    def forward(self, tgt, memory):
        for mod in self.layers:
            tgt, attn = mod(tgt, memory)
        return tgt, attn


class OfficialSetCriterion(nn.Module):
    def __init__(self, num_classes, eos_coef=0.1):
        super().__init__()
        self.num_classes = num_classes
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def losses(self, outputs, targets, indices, num_masks):
        src_logits = outputs["pred_logits"]
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64)
        target_classes[batch_idx, src_idx] = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)])
        loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        src_masks = outputs["pred_masks"][batch_idx, src_idx]
        target_masks = torch.cat([t["masks"][J] for t, (_, J) in zip(targets, indices)]).to(src_masks)
        src_masks = F.interpolate(src_masks[:, None], size=target_masks.shape[-2:], mode="bilinear",
                                  align_corners=False)[:, 0].flatten(1)
        target_masks = target_masks.flatten(1)
        prob = src_masks.sigmoid()
        ce = F.binary_cross_entropy_with_logits(src_masks, target_masks, reduction="none")
        p_t = prob * target_masks + (1 - prob) * (1 - target_masks)
        focal = (0.25 * target_masks + 0.75 * (1 - target_masks)) * (ce * ((1 - p_t) ** 2))
        dice = 1 - (2 * (prob * target_masks).sum(-1) + 1) / (prob.sum(-1) + target_masks.sum(-1) + 1)
        return {"loss_ce": loss_ce, "loss_mask": focal.mean(1).sum() / num_masks, "loss_dice": dice.sum() / num_masks}

    def forward(self, outputs, targets):
        indices = [[t["labels"], torch.arange(len(t["labels"]))] for t in targets]
        num_masks = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses = self.losses(outputs, targets, indices, num_masks)
        for i, aux in enumerate(outputs["aux_outputs"]):
            losses.update({k + f"_{i}": v for k, v in self.losses(aux, targets, indices, num_masks).items()})
        return losses


class OfficialATMLoss(nn.Module):
    def __init__(self, num_classes, dec_layers):
        super().__init__()
        self.weight_dict = {"loss_ce": 1.0, "loss_mask": 20.0, "loss_dice": 1.0}
        for i in range(dec_layers - 1):
            self.weight_dict.update({f"loss_ce_{i}": 1.0, f"loss_mask_{i}": 20.0, f"loss_dice_{i}": 1.0})
        self.criterion = OfficialSetCriterion(num_classes)

    def forward(self, outputs, label, ignore_index):
        targets = []
        for t in label:
            gt_cls = t.unique()
            gt_cls = gt_cls[gt_cls != ignore_index]
            masks = [t == c for c in gt_cls] or [t == ignore_index]
            targets.append({"labels": gt_cls, "masks": torch.stack(masks)})
        losses = self.criterion(outputs, targets)
        return {k: v * self.weight_dict[k] for k, v in losses.items()}


class OfficialATMHead(nn.Module):
    def __init__(self, img_size, in_channels, num_classes, embed_dims, num_layers, num_heads, use_stages):
        super().__init__()
        self.image_size, self.use_stages, self.num_classes = img_size, use_stages, num_classes
        for i in range(use_stages):
            self.add_module(f"input_proj_{i + 1}", nn.Linear(in_channels, embed_dims))
            self.add_module(f"proj_norm_{i + 1}", nn.LayerNorm(embed_dims))
            layer = OfficialTPNDecoderLayer(d_model=embed_dims, nhead=num_heads, dim_feedforward=embed_dims * 4)
            self.add_module(f"decoder_{i + 1}", OfficialTPNDecoder(layer, num_layers))
        self.q = nn.Embedding(num_classes, embed_dims)
        self.class_embed = nn.Linear(embed_dims, num_classes + 1)
        self.loss_decode = OfficialATMLoss(num_classes, use_stages)

    @staticmethod
    def d3_to_d4(t):
        n, hw, c = t.size()
        h = w = int(math.sqrt(hw))
        return t.transpose(1, 2).reshape(n, c, h, w)

    def forward(self, inputs):
        x = [s.flatten(-2).transpose(-1, -2) for s in inputs[:self.use_stages]][::-1]
        q = self.q.weight.repeat(x[0].size(0), 1, 1).transpose(0, 1)
        qs, attns = [], []
        for i, x_ in enumerate(x, start=1):
            lateral = getattr(self, f"proj_norm_{i}")(getattr(self, f"input_proj_{i}")(x_))
            q, attn = getattr(self, f"decoder_{i}")(q, lateral.transpose(0, 1))
            attns.append(self.d3_to_d4(attn.transpose(-1, -2)))
            qs.append(q.transpose(0, 1))
        outputs_class = self.class_embed(torch.stack(qs, dim=0))
        size = attns[-1].shape[-2:]
        seg_masks = []
        for i, attn in enumerate(attns):
            up = F.interpolate(attn, size=size, mode="bilinear", align_corners=False)
            seg_masks.append(up if i == 0 else seg_masks[-1] + up)
        pred_masks = F.interpolate(seg_masks[-1], size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        pred = torch.einsum("bqc,bqhw->bchw", F.softmax(outputs_class[-1], dim=-1)[..., :-1], pred_masks.sigmoid())
        aux = [{"pred_logits": a, "pred_masks": b} for a, b in zip(outputs_class[:-1], seg_masks[:-1])]
        return {"pred_logits": outputs_class[-1], "pred_masks": pred_masks, "pred": pred, "aux_outputs": aux}


class OfficialSegViT(nn.Module):
    def __init__(self, num_classes, img_size, embed_dims, num_layers, num_heads, out_indices, head_embed_dims,
                 head_num_heads, head_num_layers):
        super().__init__()
        self.backbone = OfficialMmsegViT(img_size, embed_dims, num_layers, num_heads, out_indices)
        self.decode_head = OfficialATMHead(img_size, embed_dims, num_classes, head_embed_dims, head_num_layers,
                                           head_num_heads, len(out_indices))

    def forward(self, img):
        return self.decode_head(self.backbone(img))

    def loss(self, img, label):
        return sum(self.decode_head.loss_decode(self(img), label, 255).values())


def _official(seed=0):
    torch.manual_seed(seed)
    off = OfficialSegViT(K, **TINY).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped parameter shows
        for name, p in off.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return off


def _labels(b, h, w):
    labels = torch.randint(0, K - 1, (b, h, w))  # class K-1 absent: a query with a "no object" target
    labels[0, :3] = 255
    return labels


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_official_checkpoint_loads_strictly_and_matches_the_official_forward_and_loss(backend):
    from tests.conftest import require_backend

    require_backend("atm_attention", backend)
    off = _official().double()
    model = create("segvit_vit_base", num_classes=K, backend=backend, **TINY).double().eval()
    result = model.load_official_state_dict({"state_dict": off.state_dict(), "meta": {"iter": 1}})
    assert result.missing_keys == [] and result.unexpected_keys == []
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # the official head's img_size square
    labels = _labels(2, 64, 64)
    labels[1] = 255  # an image without any target: only "no object" class targets
    expected = off(images)
    with record_dispatch() as ran:
        out = model(images)
        loss = model.loss(images, labels)
    assert ("atm_attention", backend, "forward") in ran
    assert out["logits"].shape == (2, K, 64, 64)
    assert_close(out["logits"], expected["pred"], torch.float64, what="logits")
    assert_close(out["class_logits"][-1], expected["pred_logits"], torch.float64, what="class logits")
    assert_close(loss, off.loss(images, labels), torch.float64, what="loss")


def test_backbone_pads_and_resizes_the_position_embedding_as_mmseg():
    off = _official().double()
    model = create("segvit_vit_base", num_classes=K, backend="reference", **TINY).double().eval()
    model.load_official_state_dict(off.state_dict())
    images = torch.randn(1, 3, 40, 56, dtype=torch.float64)  # pads to 48x64: grid 3x4 against 4x4 learnt
    for ours, theirs in zip(model.backbone(images), off.backbone(images), strict=True):
        assert ours.shape == (1, 32, 3, 4)
        assert_close(ours, theirs, torch.float64)


def test_any_input_size_is_padded_and_the_logits_cropped():
    model = create("segvit_vit_base", num_classes=K, backend="reference", **TINY).eval()
    images = torch.randn(2, 3, 40, 56)
    out = model(images)
    padded = model(F.pad(images, (0, 8, 0, 8)))
    assert out["logits"].shape == (2, K, 40, 56) and out["mask_logits"].shape == (3, 2, K, 3, 4)
    assert_close(out["logits"], padded["logits"][..., :40, :56], tol=REORDERED_FP32)
    loss = model.loss(images, _labels(2, 40, 56))
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(model.get_parameter(n).grad is not None for n in trainable), "a trainable parameter got no gradient"
    assert not model.backbone.cls_token.requires_grad  # unused, as mmseg's with_cls_token=False


def test_bad_labels_are_rejected():
    model = create("segvit_vit_base", num_classes=K, backend="reference", **TINY)
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="labels must lie in"):
        model.loss(images, torch.full((1, 32, 32), K))
    with pytest.raises(ValueError, match="labels must have shape"):
        model.loss(images, torch.zeros(1, 32, 16, dtype=torch.long))


def test_official_loading_reports_missing_and_unexpected_keys_in_official_names():
    sd = _official().state_dict()
    assert "decode_head.loss_decode.criterion.empty_weight" in sd
    sd.pop("backbone.layers.1.attn.attn.in_proj_weight")
    sd["backbone.ln1.weight"] = torch.ones(32)  # final_norm=True would have it
    model = create("segvit_vit_base", num_classes=K, **TINY)
    with pytest.raises(RuntimeError, match="in_proj_weight"):
        model.load_official_state_dict(sd)
    result = model.load_official_state_dict(sd, strict=False)
    assert result.missing_keys == ["backbone.layers.1.attn.attn.in_proj_weight"]
    assert result.unexpected_keys == ["backbone.ln1.weight"]
    sd = _official().state_dict()
    sd["decode_head.q.weight"] = torch.zeros(K + 1, 32)
    with pytest.raises(RuntimeError, match="decode_head.q.weight.*shape"):
        model.load_official_state_dict(sd)


@pytest.mark.parametrize("name, official", [
    ("segvit_vit_base", dict(img_size=512, embed_dims=768, num_layers=12, num_heads=12, out_indices=(5, 7, 11),
                             head_embed_dims=384, head_num_heads=12, head_num_layers=3)),
    ("segvit_vit_large", dict(img_size=640, embed_dims=1024, num_layers=24, num_heads=16, out_indices=(7, 15, 23),
                              head_embed_dims=512, head_num_heads=16, head_num_layers=3)),
])
def test_named_configs_have_the_official_parameters(name, official):
    """The full-size configs on the meta device (nothing allocated or run): same names and shapes."""
    with torch.device("meta"):
        model = create(name)
        off = OfficialSegViT(150, **official)
    ours = {official_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in off.state_dict().items()}
    assert model.backbone.out_indices == official["out_indices"]
    assert model.decode_head.decoder_1.layers[0].multihead_attn.num_heads == official["head_num_heads"]


def _build(backend, state=None):
    model = create("segvit_vit_base", num_classes=K, backend=backend, **TINY).eval()
    if state is None:
        model.load_official_state_dict(_official().state_dict())
    else:
        model.load_state_dict(state)
    return model


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_cpu_backend_matches_reference_losses_and_gradients(autocast):
    from tests.conftest import require_backend

    require_backend("atm_attention", "cpu")
    images, labels = torch.randn(2, 3, 40, 56), _labels(2, 40, 56)
    assert_cpu_backend_matches_reference(_build, "atm_attention", images, labels, autocast)
