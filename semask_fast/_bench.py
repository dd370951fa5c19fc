"""Side-by-side timings of every available backend and of peers against eager PyTorch (the reference).

Peers are what a user would run without semask_fast, at its best: timm's fused path
(``F.scaled_dot_product_attention`` with the relative-position bias and shift mask as an additive
mask, as ``timm``'s ``WindowAttention(fused_attn=True)`` does), SDPA with ``scale=1`` for SeMask's
semantic attention, and SDPA plus a separate logits product for ATM (SDPA cannot return the logits).

Used by ``python -m semask_fast bench`` and ``benchmarks/test_bench_ops.py``.
Ratios are measured in one run on one machine, which is named in the output.
The Triton interpreter and the SIMT harness are correctness tools: their rows
are marked as such and say nothing about GPU speed (that is modelled from
measured bytes in ``benchmarks/results/traffic.md``).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import time
from typing import Callable, Dict, List, Optional

import torch

from . import __version__, ops
from . import reference as ref
from .backends import registry


@dataclasses.dataclass(frozen=True)
class BenchCase:
    op: str
    name: str
    make: Callable[[torch.device, torch.dtype], Dict[str, torch.Tensor]]
    call: Callable[..., object]
    #: name -> callable(**tensors): the same computation the way a user would write it without us.
    peers: Dict[str, Callable[..., object]] = dataclasses.field(default_factory=dict)


def _rand(device, dtype, *shape):
    return torch.randn(*shape, device=device, dtype=dtype)


def _sdpa_window(q, k, v, t, *, window_size: int, shift_size: int, grid):
    """timm's fused path: the bias gathered from the table each call, the shift mask precomputed (a
    buffer in timm), both as SDPA's additive mask over (B, nW, h, N, N)."""
    nW, h, n = grid[0] * grid[1], q.shape[1], q.shape[2]
    index = _cached(("index", window_size, q.device), lambda: ref.relative_position_index((window_size,) * 2, q.device))
    mask = _cached(("mask", window_size, shift_size, grid, q.device, q.dtype), lambda: ref.shift_mask(
        grid, (window_size,) * 2, (shift_size,) * 2, device=q.device, dtype=q.dtype))
    bias = t[index.view(-1)].view(n, n, h).permute(2, 0, 1)
    attn_mask = bias.unsqueeze(0) + mask.unsqueeze(1)  # (nW, h, N, N)
    split = lambda x: x.view(-1, nW, h, n, x.shape[-1])  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask)
    return out.view(q.shape)


def _sdpa_atm(q, k, v):
    """ATM with SDPA for the output and one more product for the head-mean logits."""
    scale = q.shape[-1] ** -0.5
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    logits = torch.einsum("bhqd,bhkd->bqk", q, k) * (scale / q.shape[1])
    return out, logits


_CACHE: Dict[tuple, torch.Tensor] = {}


def _cached(key, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def bench_cases(scale: str = "small") -> List[BenchCase]:
    """Paper shapes (``scale="paper"``) or scaled down for a CPU (``"small"``)."""
    b = 8 if scale == "paper" else 1
    k = 150
    return [
        BenchCase("window_attention", f"Swin-T stage 1: B={b}, 56x56, h=3, d=32, ws=7, shift 3",
                  lambda dev, dt: dict(q=_rand(dev, dt, b * 64, 3, 49, 32), k=_rand(dev, dt, b * 64, 3, 49, 32),
                                       v=_rand(dev, dt, b * 64, 3, 49, 32), t=_rand(dev, dt, 169, 3)),
                  lambda backend, q, k, v, t: ops.window_attention(q, k, v, t, window_size=7, shift_size=3,
                                                                   grid=(8, 8), backend=backend),
                  {"timm fused (torch SDPA)": lambda q, k, v, t: _sdpa_window(q, k, v, t, window_size=7,
                                                                                shift_size=3, grid=(8, 8))}),
        BenchCase("window_partition", f"B={b}, 57x57x96, ws=7, shift 3 (padded)",
                  lambda dev, dt: dict(x=_rand(dev, dt, b, 57, 57, 96)),
                  lambda backend, x: ops.window_partition(x, 7, 3, backend=backend)),
        BenchCase("semantic_attention", f"SeMask-T stage 1: {b * 64} windows N=49, K={k}, C=96",
                  lambda dev, dt: dict(sq=_rand(dev, dt, b * 64, 49, k), sk=_rand(dev, dt, b * 64, 49, k),
                                       yv=_rand(dev, dt, b * 64, 49, 96)),
                  lambda backend, sq, sk, yv: ops.semantic_attention(sq, sk, yv, backend=backend),
                  {"torch SDPA (scale=1)": lambda sq, sk, yv: torch.nn.functional.scaled_dot_product_attention(
                      sq, sk, yv, scale=1.0)}),
        BenchCase("atm_attention", f"SegViT-L ATM: B={max(1, b // 4)}, h=16, Nq=150, Nk=1600, d=32",
                  lambda dev, dt: dict(q=_rand(dev, dt, max(1, b // 4), 16, 150, 32),
                                       k=_rand(dev, dt, max(1, b // 4), 16, 1600, 32),
                                       v=_rand(dev, dt, max(1, b // 4), 16, 1600, 32)),
                  lambda backend, q, k, v: ops.atm_attention(q, k, v, backend=backend),
                  {"torch SDPA + logits product": _sdpa_atm}),
        BenchCase("mask_similarity", f"Segmenter ViT-B: B={b}, Np=1024, K={k}, D=768",
                  lambda dev, dt: dict(p=_rand(dev, dt, b, 1024, 768), c=_rand(dev, dt, b, k, 768)),
                  lambda backend, p, c: ops.mask_similarity(p, c, backend=backend)),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: torch.device, min_time: float = 0.2, max_reps: int = 50) -> float:
    """Median seconds per call (after one warm-up call)."""
    fn()
    _sync(device)
    times: List[float] = []
    while sum(times) < min_time and len(times) < max_reps:
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def make_step(call: Callable[..., object], tensors: Dict[str, torch.Tensor], mode: str,
              device: torch.device) -> Callable[[], None]:
    """One timed step: ``call(**tensors)``, plus the backward of every output (ones) in fwd+bwd."""
    if mode == "fwd+bwd":
        for t in tensors.values():
            t.requires_grad_()

    def step():
        out = call(**tensors)
        if mode == "fwd+bwd":
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        _sync(device)

    return step


def _time_step(call, tensors, mode, device) -> float:
    return time_call(make_step(call, tensors, mode, device), device)


def run(scale: str, dtype: torch.dtype, mode: str, backends: Optional[List[str]] = None,
        include_tools: bool = False, peers: bool = True) -> List[dict]:
    """Time each case on each available backend and each peer; rows carry the ratio to the reference."""
    rows = []
    for case in bench_cases(scale):
        for backend in backends or registry.BACKENDS:
            if registry.reasons(case.op, backend):
                continue
            impl = registry.implementation(case.op, backend)
            device = impl.preferred_device()
            tool = backend == "cpu" or (backend == "triton" and device.type == "cpu")
            if tool and not include_tools:
                continue
            try:
                seconds = _time_step(lambda **t: case.call(backend, **t), case.make(device, dtype), mode, device)
            except registry.BackendNotSupportedError as e:
                rows.append(dict(op=case.op, case=case.name, backend=backend, seconds=None, note=str(e)))
                continue
            rows.append(dict(op=case.op, case=case.name, backend=backend, device=device.type, seconds=seconds,
                             note="correctness tool, not a speed" if tool else ""))
        if peers:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            for name, peer in case.peers.items():
                rows.append(dict(op=case.op, case=case.name, backend=f"peer: {name}", device=device.type,
                                 seconds=_time_step(peer, case.make(device, dtype), mode, device), note="peer"))
    ref_seconds = {r["case"]: r["seconds"] for r in rows if r["backend"] == "reference"}
    for r in rows:
        base = ref_seconds.get(r["case"])
        r["speedup_vs_eager"] = (base / r["seconds"]) if base and r.get("seconds") else None
    return rows


def write_csv(rows: List[dict], path: str, machine: str, dtype: torch.dtype, mode: str) -> None:
    """Append rows with the hardware, time and version (Liger-style results file)."""
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fields = ["when", "version", "machine", "dtype", "mode", "op", "case", "backend", "seconds", "speedup_vs_eager",
              "note"]
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for r in rows:
            w.writerow(dict(r, when=now, version=__version__, machine=machine, dtype=str(dtype).replace("torch.", ""),
                            mode=mode))
