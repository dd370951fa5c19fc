"""The official layers, transcribed from SPEC.md (read from the official code), for comparison."""

import torch
from torch import nn


class OfficialSemanticAttention(nn.Module):
    """SeMask's class, transcribed from SPEC.md section 2 for comparison."""

    def __init__(self, dim, n_cls):
        super().__init__()
        self.mlp_cls_q = nn.Linear(dim, n_cls)
        self.mlp_cls_k = nn.Linear(dim, n_cls)
        self.mlp_v = nn.Linear(dim, dim)
        self.mlp_res = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        q, k, v = self.mlp_cls_q(x), self.mlp_cls_k(x), self.mlp_v(x)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return q, self.gamma * self.proj_drop(self.mlp_res(attn @ v)) + x


class OfficialATMAttention(nn.Module):
    """SegViT's ATM ``Attention``, transcribed for comparison."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, xq, xk, xv):
        b, nq, c = xq.size()
        nk = xk.size()[1]
        h = self.num_heads
        q = self.q(xq).reshape(b, nq, h, c // h).permute(0, 2, 1, 3)
        k = self.k(xk).reshape(b, nk, h, c // h).permute(0, 2, 1, 3)
        v = self.v(xv).reshape(b, nk, h, c // h).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn_save = attn.clone()
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(b, nq, c)
        x = self.proj_drop(self.proj(x))
        return x.transpose(0, 1), attn_save.sum(dim=1) / h
