"""End to end: a timm Swin-T on CPU, as shipped, with timm's fused attention, and patched by us.

Four models with the same weights (one random initialisation, copied): timm as shipped (its Swin
``WindowAttention`` keeps the unfused math path unless asked: ``fused_attn`` is "experimental"
there), timm with ``fused_attn = True`` on every attention module (SDPA), ``patch_timm(model)`` and
``patch_timm(model, zero_copy=True)``.  Each is timed for inference (eval, no_grad) and for a
training step (forward, cross-entropy, backward, SGD step), and its eval output is compared with
timm's as shipped.  A fifth row is a bound, not a model: the zero-copy model for inference with the
attention itself skipped (the qkv and output projections kept, the projection applied to v), the
time everything but the attention takes: no attention kernel can make inference faster than that.
(Not for training: the backward of taking v out of qkv is a copy the model does not make.)
Used by ``python -m semask_fast bench``.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, List

import torch

from . import patch_timm, record_dispatch
from .nn.swin_families import BoundPatch

MODEL = "swin_tiny_patch4_window7_224"


def _median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


#: The bound row's name (its outputs are not Swin's: not compared).
BOUND = "bound: patch_timm(model, zero_copy=True), attention skipped"


def _attention_skipped(self, x: torch.Tensor) -> torch.Tensor:
    # The block's _attn with the projections and no attention: proj(v), v taken from qkv.
    c = x.shape[-1]
    return self.attn.proj(self.attn.qkv(x)[..., 2 * c:])


def variants(base: torch.nn.Module) -> List[tuple]:
    """(name, model) for the four settings and the bound, each a copy of ``base``."""
    fused = copy.deepcopy(base)
    for m in fused.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    patched, zero_copy = copy.deepcopy(base), copy.deepcopy(base)
    patch_timm(patched)
    patch_timm(zero_copy, zero_copy=True)
    bound = copy.deepcopy(zero_copy)
    for m in bound.modules():
        if "_attn" in vars(m):  # the blocks patch_timm gave the zero-copy _attn
            m._attn = BoundPatch(m, _attention_skipped)
    return [("timm (as shipped)", copy.deepcopy(base)), ("timm, fused_attn=True", fused),
            ("patch_timm(model)", patched), ("patch_timm(model, zero_copy=True)", zero_copy), (BOUND, bound)]


def _backends_that_ran(model: torch.nn.Module, x: torch.Tensor) -> str:
    with torch.no_grad(), record_dispatch() as ran:
        model(x)
    return ", ".join(sorted({backend for _, backend, _ in ran})) or "timm's own code"


def run(batch: int = 8, reps: int = 5, progress: Callable[[str], None] = print, **model_kwargs) -> dict:
    """Time the four settings and the bound; returns the figures :func:`semask_fast._bench_report.e2e_markdown` prints.
    ``model_kwargs`` go to ``timm.create_model`` (the tests shrink the model)."""
    import timm

    torch.manual_seed(0)
    base = timm.create_model(MODEL, pretrained=False, **model_kwargs)
    size = base.patch_embed.img_size[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, base.num_classes, (batch,), generator=gen)
    rows = []
    reference_out = None
    for name, model in variants(base):
        progress(f"  e2e {name}")
        model.eval()
        with torch.no_grad():
            out = model(x)
        reference_out = out if reference_out is None else reference_out
        bound = name == BOUND
        backend = _backends_that_ran(model, x)

        def infer():
            with torch.no_grad():
                model(x)

        infer_s = _median_seconds(infer, reps)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def train_step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), labels).backward()
            opt.step()

        train_s = None if bound else _median_seconds(train_step, reps)
        rows.append(dict(name=name, backend="none (bound)" if bound else backend, infer_s=infer_s,
                         images_per_s=batch / infer_s, train_s=train_s,
                         max_abs_diff=None if bound else (out - reference_out).abs().max().item()))
        progress(f"    inference {infer_s * 1e3:.0f} ms ({batch / infer_s:.1f} images/s)" + ("" if bound else
                 f", training step {train_s * 1e3:.0f} ms, max abs diff {rows[-1]['max_abs_diff']:.1e}"))
    timm_rows = [r for r in rows if r["name"].startswith("timm")]
    best_infer, best_train = min(r["infer_s"] for r in timm_rows), min(r["train_s"] for r in timm_rows)
    for r in rows:
        r["infer_ratio"] = best_infer / r["infer_s"]
        r["train_ratio"] = None if r["train_s"] is None else best_train / r["train_s"]
    return dict(model=MODEL, batch=batch, size=size, threads=torch.get_num_threads(), reps=reps, rows=rows)
