"""Swin attention layers of codebases that cannot be installed here, transcribed for comparison.

* ``SwinWindowAttention``, ``SwinBlock``, ``shift_attn_mask``: the official Swin / SeMask
  ``WindowAttention``, ``SwinTransformerBlock`` and ``BasicLayer``'s mask
  (Picsart-AI-Research/SeMask-Segmentation, ``SeMask-FPN/mmseg/models/backbones/semask_swin_transformer.py``,
  the segmentation Swin of microsoft/Swin-Transformer: pad, then roll).
* ``WindowMSA``, ``ShiftWindowMSA``: open-mmlab/mmsegmentation ``mmseg/models/backbones/swin.py``
  (mmdet's copy is the same), mmcv's ``BaseModule``/``build_dropout`` replaced by ``nn.Module``/DropPath.
* ``MMPretrainShiftWindowMSA``: open-mmlab/mmpretrain ``mmpretrain/models/utils/attention.py``
  (adds ``pad_small_map``).
* ``HFv4SwinAttention``: huggingface/transformers v4 ``SwinAttention`` / ``SwinSelfAttention`` /
  ``SwinSelfOutput`` (the layout that transformers v5 renamed), and ``hf_v4_windows``, the
  padding, roll, partition and mask of v4's ``SwinLayer``.
"""

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn


def _relative_position_index(window_size):
    coords = torch.stack(torch.meshgrid([torch.arange(window_size[0]), torch.arange(window_size[1])], indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    rel = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window_size[0] - 1
    rel[:, :, 1] += window_size[1] - 1
    rel[:, :, 0] *= 2 * window_size[1] - 1
    return rel.sum(-1)


def window_partition(x, window_size):
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows, window_size, H, W):
    B = int(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


# --------------------------------------------------------------------------- #
# Official Swin / SeMask
# --------------------------------------------------------------------------- #
class SwinWindowAttention(nn.Module):
    """The official ``WindowAttention``: persistent (N, N) index, mask passed to forward."""

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=.02)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1))
        relative_position_bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.window_size[0] * self.window_size[1], self.window_size[0] * self.window_size[1], -1)
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
        attn = attn + relative_position_bias.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


def shift_attn_mask(Hp, Wp, window_size, shift_size, device=None):
    """``BasicLayer.forward``'s SW-MSA mask on the padded Hp x Wp grid."""
    img_mask = torch.zeros((1, Hp, Wp, 1), device=device)
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    cnt = 0
    for h in slices:
        for w in slices:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    mask_windows = window_partition(img_mask, window_size).view(-1, window_size * window_size)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))


class SwinBlock(nn.Module):
    """``SwinTransformerBlock``'s attention half: norm, pad, roll, W-MSA, merge, un-roll, crop, residual.

    ``H``, ``W`` are set by the caller as ``BasicLayer`` does; ``forward(x, mask_matrix)``.
    """

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, qkv_bias=True, qk_scale=None, attn_drop=0.,
                 drop=0.):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SwinWindowAttention(dim, window_size=(window_size, window_size), num_heads=num_heads,
                                        qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.H = None
        self.W = None

    def forward(self, x, mask_matrix):
        B, L, C = x.shape
        H, W = self.H, self.W
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        pad_r = (self.window_size - W % self.window_size) % self.window_size
        pad_b = (self.window_size - H % self.window_size) % self.window_size
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, Hp, Wp, _ = x.shape
        if self.shift_size > 0:
            shifted_x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            attn_mask = mask_matrix
        else:
            shifted_x = x
            attn_mask = None
        x_windows = window_partition(shifted_x, self.window_size).view(-1, self.window_size * self.window_size, C)
        attn_windows = self.attn(x_windows, mask=attn_mask).view(-1, self.window_size, self.window_size, C)
        shifted_x = window_reverse(attn_windows, self.window_size, Hp, Wp)
        if self.shift_size > 0:
            x = torch.roll(shifted_x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        else:
            x = shifted_x
        if pad_r > 0 or pad_b > 0:
            x = x[:, :H, :W, :].contiguous()
        return shortcut + x.view(B, H * W, C)


# --------------------------------------------------------------------------- #
# mmseg / mmdet / mmpretrain
# --------------------------------------------------------------------------- #
class WindowMSA(nn.Module):
    """mm*'s ``WindowMSA``: the index built by ``double_step_seq`` and a flip, persistent."""

    def __init__(self, embed_dims, num_heads, window_size, qkv_bias=True, qk_scale=None, attn_drop_rate=0.,
                 proj_drop_rate=0., init_cfg=None):
        super().__init__()
        self.embed_dims = embed_dims
        self.window_size = window_size
        self.num_heads = num_heads
        head_embed_dims = embed_dims // num_heads
        self.scale = qk_scale or head_embed_dims ** -0.5
        self.init_cfg = init_cfg
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        Wh, Ww = self.window_size
        rel_index_coords = self.double_step_seq(2 * Ww - 1, Wh, 1, Ww)
        rel_position_index = rel_index_coords + rel_index_coords.T
        rel_position_index = rel_position_index.flip(1).contiguous()
        self.register_buffer("relative_position_index", rel_position_index)
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop_rate)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)
        self.softmax = nn.Softmax(dim=-1)

    def init_weights(self):
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1))
        relative_position_bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.window_size[0] * self.window_size[1], self.window_size[0] * self.window_size[1], -1)
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
        attn = attn + relative_position_bias.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    @staticmethod
    def double_step_seq(step1, len1, step2, len2):
        seq1 = torch.arange(0, step1 * len1, step1)
        seq2 = torch.arange(0, step2 * len2, step2)
        return (seq1[:, None] + seq2[None, :]).reshape(1, -1)


def _drop_path(drop_prob):
    # mmcv's build_dropout(dict(type='DropPath', drop_prob=p)).
    return DropPath(drop_prob) if drop_prob > 0 else nn.Identity()


class ShiftWindowMSA(nn.Module):
    """mmseg's (and mmdet's) ``ShiftWindowMSA``: pad, then roll; ``forward(query, hw_shape)``."""

    def __init__(self, embed_dims, num_heads, window_size, shift_size=0, qkv_bias=True, qk_scale=None,
                 attn_drop_rate=0, proj_drop_rate=0, drop_path_rate=0., init_cfg=None):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        assert 0 <= self.shift_size < self.window_size
        self.w_msa = WindowMSA(embed_dims=embed_dims, num_heads=num_heads, window_size=(window_size, window_size),
                               qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop_rate=attn_drop_rate,
                               proj_drop_rate=proj_drop_rate, init_cfg=None)
        self.drop = _drop_path(drop_path_rate)

    def forward(self, query, hw_shape):
        B, L, C = query.shape
        H, W = hw_shape
        assert L == H * W, "input feature has wrong size"
        query = query.view(B, H, W, C)
        pad_r = (self.window_size - W % self.window_size) % self.window_size
        pad_b = (self.window_size - H % self.window_size) % self.window_size
        query = F.pad(query, (0, 0, 0, pad_r, 0, pad_b))
        H_pad, W_pad = query.shape[1], query.shape[2]
        if self.shift_size > 0:
            shifted_query = torch.roll(query, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            img_mask = torch.zeros((1, H_pad, W_pad, 1), device=query.device)
            h_slices = (slice(0, -self.window_size), slice(-self.window_size, -self.shift_size),
                        slice(-self.shift_size, None))
            w_slices = (slice(0, -self.window_size), slice(-self.window_size, -self.shift_size),
                        slice(-self.shift_size, None))
            cnt = 0
            for h in h_slices:
                for w in w_slices:
                    img_mask[:, h, w, :] = cnt
                    cnt += 1
            mask_windows = self.window_partition(img_mask).view(-1, self.window_size * self.window_size)
            attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        else:
            shifted_query = query
            attn_mask = None
        query_windows = self.window_partition(shifted_query).view(-1, self.window_size ** 2, C)
        attn_windows = self.w_msa(query_windows, mask=attn_mask).view(-1, self.window_size, self.window_size, C)
        shifted_x = self.window_reverse(attn_windows, H_pad, W_pad)
        if self.shift_size > 0:
            x = torch.roll(shifted_x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        else:
            x = shifted_x
        if pad_r > 0 or pad_b:
            x = x[:, :H, :W, :].contiguous()
        x = x.view(B, H * W, C)
        return self.drop(x)

    def window_reverse(self, windows, H, W):
        return window_reverse(windows, self.window_size, H, W)

    def window_partition(self, x):
        return window_partition(x, self.window_size)


class MMPretrainShiftWindowMSA(ShiftWindowMSA):
    """mmpretrain's ``ShiftWindowMSA``: as mmseg's, plus ``pad_small_map`` (classification: no shift
    when the short side equals the window, an error when it is smaller)."""

    def __init__(self, embed_dims, num_heads, window_size, shift_size=0, pad_small_map=False, **kwargs):
        super().__init__(embed_dims, num_heads, window_size, shift_size, **kwargs)
        self.pad_small_map = pad_small_map

    def forward(self, query, hw_shape):
        B, L, C = query.shape
        H, W = hw_shape
        query = query.view(B, H, W, C)
        window_size = self.window_size
        shift_size = self.shift_size
        if min(H, W) == window_size:
            shift_size = shift_size if self.pad_small_map else 0
        elif min(H, W) < window_size:
            assert self.pad_small_map, f"The input shape ({H}, {W}) is smaller than the window size"
        pad_r = (window_size - W % window_size) % window_size
        pad_b = (window_size - H % window_size) % window_size
        query = F.pad(query, (0, 0, 0, pad_r, 0, pad_b))
        H_pad, W_pad = query.shape[1], query.shape[2]
        if shift_size > 0:
            query = torch.roll(query, shifts=(-shift_size, -shift_size), dims=(1, 2))
        attn_mask = shift_attn_mask(H_pad, W_pad, window_size, shift_size, query.device) if shift_size > 0 else None
        query_windows = window_partition(query, window_size).view(-1, window_size ** 2, C)
        attn_windows = self.w_msa(query_windows, mask=attn_mask).view(-1, window_size, window_size, C)
        shifted_x = window_reverse(attn_windows, window_size, H_pad, W_pad)
        if self.shift_size > 0:
            x = torch.roll(shifted_x, shifts=(shift_size, shift_size), dims=(1, 2))
        else:
            x = shifted_x
        if H != H_pad or W != W_pad:
            x = x[:, :H, :W, :].contiguous()
        return self.drop(x.view(B, H * W, C))


# --------------------------------------------------------------------------- #
# transformers v4
# --------------------------------------------------------------------------- #
class HFv4SwinSelfAttention(nn.Module):
    """transformers v4 ``SwinSelfAttention`` (``config`` reduced to its two fields)."""

    def __init__(self, dim, num_heads, window_size, qkv_bias=True, attention_probs_dropout_prob=0.0):
        super().__init__()
        self.num_attention_heads = num_heads
        self.attention_head_size = int(dim / num_heads)
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.window_size = (window_size, window_size)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1), num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(self.window_size))
        self.query = nn.Linear(self.all_head_size, self.all_head_size, bias=qkv_bias)
        self.key = nn.Linear(self.all_head_size, self.all_head_size, bias=qkv_bias)
        self.value = nn.Linear(self.all_head_size, self.all_head_size, bias=qkv_bias)
        self.dropout = nn.Dropout(attention_probs_dropout_prob)

    def transpose_for_scores(self, x):
        x = x.view(x.size()[:-1] + (self.num_attention_heads, self.attention_head_size))
        return x.permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False):
        batch_size, dim, num_channels = hidden_states.shape
        mixed_query_layer = self.query(hidden_states)
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        query_layer = self.transpose_for_scores(mixed_query_layer)
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)
        relative_position_bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        relative_position_bias = relative_position_bias.view(
            self.window_size[0] * self.window_size[1], self.window_size[0] * self.window_size[1], -1)
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
        attention_scores = attention_scores + relative_position_bias.unsqueeze(0)
        if attention_mask is not None:
            mask_shape = attention_mask.shape[0]
            attention_scores = attention_scores.view(batch_size // mask_shape, mask_shape, self.num_attention_heads,
                                                     dim, dim)
            attention_scores = attention_scores + attention_mask.unsqueeze(1).unsqueeze(0)
            attention_scores = attention_scores.view(-1, self.num_attention_heads, dim, dim)
        attention_probs = nn.functional.softmax(attention_scores, dim=-1)
        attention_probs = self.dropout(attention_probs)
        if head_mask is not None:
            attention_probs = attention_probs * head_mask
        context_layer = torch.matmul(attention_probs, value_layer)
        context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
        context_layer = context_layer.view(context_layer.size()[:-2] + (self.all_head_size,))
        return (context_layer, attention_probs) if output_attentions else (context_layer,)


class HFv4SwinSelfOutput(nn.Module):
    def __init__(self, dim, attention_probs_dropout_prob=0.0):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(attention_probs_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.dropout(self.dense(hidden_states))


class HFv4SwinAttention(nn.Module):
    """transformers v4 ``SwinAttention``: ``self`` (SwinSelfAttention) and ``output`` (SwinSelfOutput)."""

    def __init__(self, dim, num_heads, window_size, qkv_bias=True, attention_probs_dropout_prob=0.0):
        super().__init__()
        self.self = HFv4SwinSelfAttention(dim, num_heads, window_size, qkv_bias, attention_probs_dropout_prob)
        self.output = HFv4SwinSelfOutput(dim, attention_probs_dropout_prob)

    def forward(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False):
        self_outputs = self.self(hidden_states, attention_mask, head_mask, output_attentions)
        attention_output = self.output(self_outputs[0], hidden_states)
        return (attention_output,) + self_outputs[1:]


def hf_v4_windows(x, window_size, shift_size):
    """v4 ``SwinLayer``: pad (B, H, W, C) to window multiples, roll by -shift, partition;
    returns the windows (B*nW, N, C) and the SW-MSA mask (or None)."""
    _, H, W, C = x.shape
    pad_right = (window_size - W % window_size) % window_size
    pad_bottom = (window_size - H % window_size) % window_size
    x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
    _, Hp, Wp, _ = x.shape
    if shift_size > 0:
        x = torch.roll(x, shifts=(-shift_size, -shift_size), dims=(1, 2))
        mask = shift_attn_mask(Hp, Wp, window_size, shift_size, x.device).to(x.dtype)
    else:
        mask = None
    return window_partition(x, window_size).view(-1, window_size * window_size, C), mask
