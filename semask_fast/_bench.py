"""Side-by-side CPU benchmark: our backends against what a user runs without semask_fast.

Every case is one op at a paper's shape.  Each is timed, in one process on one machine, as:

* ``eager``: the op's math in plain PyTorch (:mod:`semask_fast.reference`, the official code's math);
* the best peers at their best: ``F.scaled_dot_product_attention`` in the 4-D form that takes
  PyTorch's fused CPU (flash) kernel, compiled FlexAttention (forward only: it has no CPU backward),
  and ``torch.compile`` of the eager math (forward and forward+backward);
* our backends: every available one that runs on CPU tensors and is not a correctness tool
  (``simt`` and Triton's interpreter are timed only with ``include_tools``).

Modes ``fwd`` and ``fwd+bwd`` (the gradient of every differentiable input, the bias table included).
A row reports the median time, the ratio to the fastest peer, useful GFLOP/s (matrix products
counted analytically, one function per op) and the percentage of this machine's sgemm rate measured
in the same run, plus the working memory of one step (:func:`working_memory`).

Used by ``python -m semask_fast bench``, ``benchmarks/test_bench_ops.py`` and ``tests/test_bench.py``;
:mod:`semask_fast._bench_report` writes the table and the plot, :mod:`semask_fast._bench_e2e` times
a whole timm Swin-T.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import ops
from . import reference as ref
from .backends import registry

MODES = ("fwd", "fwd+bwd")


# --------------------------------------------------------------------------- #
# Useful flops: the matrix products of the forward, analytically.  The backward of
# every op is two products per forward product (no recomputation counted), so a
# forward+backward step is BACKWARD_FACTOR + 1 times the forward.
# --------------------------------------------------------------------------- #
BACKWARD_FACTOR = 2


def window_attention_flops(windows: int, heads: int, n: int, d: int) -> float:
    """q k^T and P v per window and head."""
    return 4.0 * windows * heads * n * n * d


def semantic_attention_flops(batch: int, n: int, k: int, c: int) -> float:
    """Sq Sk^T (inner dim K) and P Yv (C columns)."""
    return 2.0 * batch * n * n * (k + c)


def atm_attention_flops(batch: int, heads: int, nq: int, nk: int, d: int) -> float:
    """q k^T and P v per head (the head-mean of the logits is additions, not counted)."""
    return 4.0 * batch * heads * nq * nk * d


def mask_similarity_flops(batch: int, patches: int, classes: int, dim: int) -> float:
    """The normalised patch-class product (the norms are O(N D), not counted)."""
    return 2.0 * batch * patches * classes * dim


def step_flops(forward_flops: float, mode: str) -> float:
    return forward_flops * (1 + (BACKWARD_FACTOR if mode == "fwd+bwd" else 0))


# --------------------------------------------------------------------------- #
# Cases and peers
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class Peer:
    """One way to compute a case without semask_fast."""

    name: str
    fn: Callable[..., Any]
    #: Timed compiled by ``torch.compile`` (once per case; both modes share it): ``fn`` itself, or
    #: only ``kernel``, handed to ``fn`` as its ``kernel`` keyword.
    compiled: bool = False
    kernel: Optional[Callable[..., Any]] = None
    #: False when it cannot compute gradients on CPU: no fwd+bwd row (the row says why).
    backward: bool = True
    #: Inputs it differentiates in fwd+bwd; None = every differentiable input of the case.  A
    #: peer that skips some computes less than the op: its row is shown, not used for the ratio.
    grads: Optional[Tuple[str, ...]] = None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class BenchCase:
    key: str
    op: str
    name: str
    #: Useful flops of one forward (see the ``*_flops`` functions).
    flops: float
    #: (dtype, generator) -> the op's inputs on CPU, by keyword.
    make: Callable[[torch.dtype, torch.Generator], Dict[str, torch.Tensor]]
    #: (backend, **inputs) -> the op's output(s) through semask_fast.
    call: Callable[..., Any]
    peers: Tuple[Peer, ...]


_CACHE: Dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _randn(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    # Drawn in fp32 so that every dtype sees the same values.
    return torch.randn(*shape, generator=gen).to(dtype)


def _window_geometry(window: int, shift: int, grid: Tuple[int, int], dtype: torch.dtype, device: torch.device):
    """The relative-position index (N*N,) and the shift mask (nW, N, N) on ``device``, or None
    without shift."""
    index = _cached(("index", window, str(device)),
                    lambda: ref.relative_position_index((window, window)).view(-1).to(device))
    mask = None
    if shift:
        mask = _cached(("mask", window, shift, grid, dtype, str(device)),
                       lambda: ref.shift_mask(grid, (window, window), (shift, shift), dtype=dtype).to(device))
    return index, mask


def _window_bias(bias_table: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """(h, N, N) bias gathered from the table, as timm does on every call."""
    return bias_table[index].view(n, n, -1).permute(2, 0, 1)


def sdpa_window(q, k, v, bias_table, *, window: int, shift: int, grid: Tuple[int, int]):
    """SDPA on windows in the 4-D form its fused CPU kernel accepts.

    A 5-D (B, nW, h, N, d) call runs the unfused math kernel; viewed as (B, nW*h, N, d) with the
    bias and shift mask as one (1, nW*h, N, N) mask broadcast over images, it runs the flash kernel
    (unless the mask requires grad: then PyTorch falls back to math; the bench says which ran).
    """
    windows, h, n, d = q.shape
    index, mask = _window_geometry(window, shift, grid, q.dtype, q.device)
    nw = grid[0] * grid[1]
    bias = _window_bias(bias_table, index, n).unsqueeze(0)
    attn_mask = (bias + mask.unsqueeze(1) if mask is not None else bias.expand(nw, h, n, n)).reshape(1, nw * h, n, n)
    # reshape, not view: on CUDA the fused backward hands back gradients that are not contiguous.
    fold = lambda x: x.reshape(windows // nw, nw * h, n, d)  # noqa: E731
    return F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=attn_mask).reshape(q.shape)


def _flex_attention(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(*args, **kwargs)


def flex_window(q, k, v, bias_table, *, window: int, shift: int, grid: Tuple[int, int], kernel=_flex_attention):
    """FlexAttention with a score_mod adding the gathered bias and the shift mask.

    The bias is gathered outside ``kernel`` (the compiled flex_attention): Inductor's CPU template
    needs the score_mod's buffers to be inputs of the compiled graph."""
    n = q.shape[2]
    index, mask = _window_geometry(window, shift, grid, q.dtype, q.device)
    bias = _window_bias(bias_table, index, n)
    nw = grid[0] * grid[1]

    def score_mod(score, b, h, qi, ki):
        score = score + bias[h, qi, ki]
        return score + mask[b % nw, qi, ki] if mask is not None else score

    return kernel(q, k, v, score_mod=score_mod)


def sdpa_semantic(sq, sk, yv):
    """SDPA with scale 1; the narrower of (Sq, Sk) and Yv zero-padded to the wider one's width,
    since the flash kernel needs one head dim (zeros change neither products nor gradients)."""
    c = yv.shape[-1]
    width = max(sq.shape[-1], c)
    pad = lambda x: F.pad(x, (0, width - x.shape[-1])).unsqueeze(1)  # noqa: E731  (a no-op at full width)
    out = F.scaled_dot_product_attention(pad(sq), pad(sk), pad(yv), scale=1.0)
    return out[:, 0, :, :c]


def flex_semantic(sq, sk, yv, *, kernel=_flex_attention):
    return kernel(sq.unsqueeze(1), sk.unsqueeze(1), yv.unsqueeze(1), scale=1.0)[:, 0]


def _atm_logits(q, k):
    """ATM's head-mean of the scaled logits, the product SDPA and FlexAttention cannot return."""
    return torch.einsum("bhqd,bhkd->bqk", q, k) * (q.shape[-1] ** -0.5 / q.shape[1])


def sdpa_atm(q, k, v):
    return F.scaled_dot_product_attention(q, k, v), _atm_logits(q, k)


def flex_atm(q, k, v, *, kernel=_flex_attention):
    return kernel(q, k, v), _atm_logits(q, k)


def _attention_peers(eager: Callable, sdpa: Callable, flex: Callable, sdpa_note: str = "",
                     flex_note: str = "") -> Tuple[Peer, ...]:
    return (
        Peer("eager", eager),
        Peer("SDPA", sdpa, note=sdpa_note),
        Peer("FlexAttention (compiled)", flex, compiled=True, kernel=_flex_attention, backward=False,
             note=("forward only: FlexAttention has no CPU backward; " + flex_note).rstrip("; ")),
        Peer("torch.compile(eager)", eager, compiled=True),
    )


def window_case(key: str, name: str, batch: int, tokens: int, heads: int, window: int = 7,
                head_dim: int = 32) -> BenchCase:
    """Swin (S)W-MSA of one stage: ``tokens`` x ``tokens`` patches padded to window multiples,
    the shifted block (shift = window // 2) unless one window covers the stage."""
    side = -(-tokens // window)
    grid = (side, side)
    shift = window // 2 if tokens > window else 0
    windows, n = batch * side * side, window * window
    geometry = dict(window=window, shift=shift, grid=grid)
    ref_geometry = dict(window_size=(window, window), shift_size=(shift, shift), grid=grid)

    def make(dtype, gen):
        q, k, v = (_randn(gen, dtype, windows, heads, n, head_dim) for _ in range(3))
        return dict(q=q, k=k, v=v, bias_table=_randn(gen, dtype, (2 * window - 1) ** 2, heads))

    full = (f"{name}: B={batch}, {tokens}x{tokens} tokens"
            + (f" padded to {side * window}" if side * window != tokens else "")
            + f", {windows} windows x {heads} heads, N={n}, d={head_dim}, "
            + (f"shift {shift}" if shift else "no shift"))
    return BenchCase(
        key, "window_attention", full, window_attention_flops(windows, heads, n, head_dim), make,
        lambda backend, q, k, v, bias_table: ops.window_attention(q, k, v, bias_table, window_size=window,
                                                                  shift_size=shift, grid=grid, backend=backend),
        _attention_peers(functools.partial(ref.window_attention, **ref_geometry),
                         functools.partial(sdpa_window, **geometry), functools.partial(flex_window, **geometry),
                         sdpa_note="(B, nW*h, N, d), bias+mask (1, nW*h, N, N)") + (
            Peer("SDPA, table frozen", functools.partial(sdpa_window, **geometry), grads=("q", "k", "v"),
                 note="no table gradient (less work than the op): not used for the ratio"),),
    )


def semantic_case(key: str, name: str, batch: int, n: int, classes: int, channels: int) -> BenchCase:
    def make(dtype, gen):
        return dict(sq=_randn(gen, dtype, batch, n, classes), sk=_randn(gen, dtype, batch, n, classes),
                    yv=_randn(gen, dtype, batch, n, channels))

    width = max(classes, channels)
    padded = "Sq, Sk" if classes < channels else "Yv"
    return BenchCase(
        key, "semantic_attention", f"{name}: B_={batch}, N={n}, K={classes}, C={channels}",
        semantic_attention_flops(batch, n, classes, channels), make,
        lambda backend, sq, sk, yv: ops.semantic_attention(sq, sk, yv, backend=backend),
        _attention_peers(ref.semantic_attention, sdpa_semantic, flex_semantic,
                         sdpa_note=f"{padded} zero-padded to {width} (one head dim for flash)"),
    )


def atm_case(key: str, name: str, batch: int, heads: int, nq: int, nk: int, head_dim: int) -> BenchCase:
    def make(dtype, gen):
        return dict(q=_randn(gen, dtype, batch, heads, nq, head_dim), k=_randn(gen, dtype, batch, heads, nk, head_dim),
                    v=_randn(gen, dtype, batch, heads, nk, head_dim))

    return BenchCase(
        key, "atm_attention", f"{name}: B={batch}, h={heads}, Nq={nq}, Nk={nk}, d={head_dim}",
        atm_attention_flops(batch, heads, nq, nk, head_dim), make,
        lambda backend, q, k, v: ops.atm_attention(q, k, v, backend=backend),
        _attention_peers(ref.atm_attention, sdpa_atm, flex_atm, sdpa_note="+ one einsum for the head-mean logits",
                         flex_note="+ one einsum for the head-mean logits"),
    )


def mask_similarity_case(key: str, name: str, batch: int, patches: int, classes: int, dim: int) -> BenchCase:
    def make(dtype, gen):
        return dict(patches=_randn(gen, dtype, batch, patches, dim), classes=_randn(gen, dtype, batch, classes, dim))

    return BenchCase(
        key, "mask_similarity", f"{name}: B={batch}, Np={patches}, K={classes}, D={dim}",
        mask_similarity_flops(batch, patches, classes, dim), make,
        lambda backend, **inputs: ops.mask_similarity(**inputs, backend=backend),
        (Peer("eager", ref.mask_similarity), Peer("torch.compile(eager)", ref.mask_similarity, compiled=True)),
    )


def bench_cases(scale: str = "paper") -> List[BenchCase]:
    """The papers' shapes (``"paper"``), or the same cases at batch 1 (``"small"``)."""
    if scale not in ("paper", "small"):
        raise ValueError(f"scale={scale!r} (expected 'paper' or 'small')")
    paper = scale == "paper"
    b = 8 if paper else 1
    cases = []
    # Swin-T (C=96, heads 3/6/12/24, ws 7): classification at 224^2, segmentation at 512^2 (the
    # 128x128 stage-1 tokens are padded to 133 = 19 windows of 7 per side, as the models do).
    for res in (224, 512):
        for stage, heads in enumerate((3, 6, 12, 24), 1):
            cases.append(window_case(f"swin-t-{res}-s{stage}", f"Swin-T {res}^2 stage {stage}", b,
                                     res // 4 // 2 ** (stage - 1), heads))
    cases.append(window_case("swin-b-384-s1", "Swin-B 384^2 stage 1", b, 96, 4, window=12))
    # SeMask-T at ADE20K's 512^2: the stage-1 semantic layer runs on the same 2888 windows (B=8).
    cases.append(semantic_case("semask-t-s1-windowed", "SeMask-T stage 1, windowed (512^2)", b * 19 * 19, 49, 150, 96))
    cases.append(semantic_case("semask-t-s3-global", "SeMask-T stage 3, global (512^2)", b, 1024, 150, 384))
    cases.append(atm_case("segvit-l-atm", "SegViT-L ATM", 2 if paper else 1, 16, 150, 1600, 32))
    cases.append(mask_similarity_case("segmenter-b-mask", "Segmenter-B mask head", b, 1024, 150, 768))
    return cases


def quick_case() -> BenchCase:
    """What ``bench --quick`` times: Swin-T stage 1 at 224^2, B=8."""
    return window_case("swin-t-224-s1", "Swin-T 224^2 stage 1", 8, 56, 3)


# --------------------------------------------------------------------------- #
# Implementations timed per case
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class Contender:
    """A row's implementation: ``kind`` is "ours", "tool" (ours, a correctness tool) or "peer"."""

    name: str
    kind: str
    fn: Callable[..., Any]
    backward: bool = True
    grads: Optional[Tuple[str, ...]] = None
    note: str = ""

    @property
    def counts_as_peer(self) -> bool:
        return self.kind == "peer" and self.grads is None


def is_correctness_tool(op: str, backend: str) -> bool:
    """Whether ``backend`` is a correctness tool on CPU tensors: Triton (its interpreter there)
    and any implementation ``auto`` never picks (the SIMT harness)."""
    impl = registry.implementation(op, backend)
    return backend == "triton" or (impl is not None and not impl.auto_select)


def our_backends(op: str, backends: Optional[Sequence[str]] = None, include_tools: bool = False) -> List[str]:
    """Available backends (not the reference) that run ``op`` on CPU tensors: ``backends`` (default
    all) less the correctness tools unless ``include_tools`` or named."""
    names = []
    for backend in backends or registry.BACKENDS:
        if backend == "reference" or registry.reasons(op, backend):
            continue
        impl = registry.implementation(op, backend)
        if "cpu" not in impl.supported_devices():
            continue
        if is_correctness_tool(op, backend) and not (include_tools or backends):
            continue  # a tool named in ``backends`` is timed
        names.append(backend)
    return names


def compile_peer(fn: Callable[..., Any]) -> Callable[..., Any]:
    """How compiled peers are compiled: ``torch.compile`` with its defaults, static shapes."""
    return torch.compile(fn, dynamic=False)


def contenders(case: BenchCase, backends: Optional[Sequence[str]] = None, include_tools: bool = False,
               peers: Optional[Sequence[str]] = None) -> List[Contender]:
    """Peers (``peers``: only those named) and our backends for one case; compiled peers compile on
    their first call."""
    rows = []
    for peer in case.peers:
        if peers is not None and peer.name not in peers:
            continue
        fn = peer.fn
        if peer.compiled:
            fn = functools.partial(fn, kernel=compile_peer(peer.kernel)) if peer.kernel else compile_peer(fn)
        rows.append(Contender(peer.name, "peer", fn, peer.backward, peer.grads, peer.note))
    for backend in our_backends(case.op, backends, include_tools):
        tool = is_correctness_tool(case.op, backend)
        rows.append(Contender(f"semask_fast {backend}", "tool" if tool else "ours",
                              functools.partial(case.call, backend),
                              note="correctness tool, not a speed" if tool else ""))
    return rows


# --------------------------------------------------------------------------- #
# One step, its time and its memory
# --------------------------------------------------------------------------- #
class Step:
    """``fn(**inputs)``, plus in fwd+bwd the backward of every output against fixed random
    gradients.  Gradients are reset to None before each step, so each step allocates its own."""

    def __init__(self, fn: Callable[..., Any], inputs: Dict[str, torch.Tensor], mode: str,
                 grads: Optional[Sequence[str]] = None):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} (expected one of {MODES})")
        self.fn, self.mode = fn, mode
        self.inputs = {name: t.detach().clone() for name, t in inputs.items()}
        self.leaves = [t.requires_grad_() for name, t in self.inputs.items()
                       if mode == "fwd+bwd" and (grads is None or name in grads)]
        self._out_grads: Optional[Tuple[torch.Tensor, ...]] = None

    def clear(self) -> None:
        for t in self.leaves:
            t.grad = None

    def __call__(self) -> Tuple[torch.Tensor, ...]:
        self.clear()
        out = self.fn(**self.inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if self.mode == "fwd+bwd":
            if self._out_grads is None:
                gen = torch.Generator().manual_seed(1)
                self._out_grads = tuple(torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs)
            torch.autograd.backward(outs, self._out_grads)
        return outs

    def results(self, outs: Tuple[torch.Tensor, ...]) -> List[torch.Tensor]:
        """What the step hands back: its outputs and the gradients it computed."""
        return [o.detach() for o in outs] + [t.grad for t in self.leaves if t.grad is not None]


def time_step(step: Callable[[], Any], *, min_time: float = 0.5, min_reps: int = 5,
              max_reps: int = 25) -> Tuple[float, int]:
    """(median seconds, repetitions) of ``step()``, after one warm-up call."""
    step()
    times: List[float] = []
    while len(times) < min_reps or (sum(times) < min_time and len(times) < max_reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop lines on fd 2 (Python's own stderr is kept)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def _environment(**values: str):
    """Environment variables set for the duration of the block (and restored)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


#: aten kernels worth naming in a row: which path SDPA took.
_KERNEL_NAMES = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "flash bwd",
    "aten::_scaled_dot_product_attention_math": "math",
}


def working_memory(step: Step) -> Tuple[int, List[str]]:
    """(bytes, SDPA kernels that ran) of one step under ``torch.profiler(profile_memory=True)``.

    The bytes are the peak of the CPU allocator's running total during the step (every allocation
    and free torch's allocator reports, in time order) less what the step hands back (outputs and
    gradients, counted once per storage).  Memory a kernel keeps outside torch's allocator (e.g.
    persistent per-thread tiles) is not seen; the cpu kernels' buffer pool is off during the step,
    so that their outputs are allocations the profiler sees like every peer's.
    """
    from torch.profiler import ProfilerActivity, profile

    step.clear()
    with _quiet_stderr(), _environment(SEMASK_FAST_CPU_POOL_MIB="0"), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        outs = step()
    events = prof.profiler.kineto_results.events()
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events
                         if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    total = peak = 0
    for _, nbytes in allocations:
        total += nbytes
        peak = max(peak, total)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in step.results(outs)}
    ran = sorted({_KERNEL_NAMES[e.name()] for e in events if e.name() in _KERNEL_NAMES})
    return max(0, peak - sum(storages.values())), ran


# glibc's malloc maps a block of 128 KiB or more afresh and unmaps it when freed, unless an earlier
# free raised that threshold: a peer's large temporaries (eager's attention matrix) were page-faulted
# in on every call, or recycled, depending on what had run before in the process (SeMask-T global,
# bf16, eager fwd: 14.8 ms in a process of its own, 6.4 ms after the windowed case).
MMAP_THRESHOLD = 32 << 20  # glibc's largest


def recycle_allocations() -> Optional[str]:
    """Fixes glibc's mmap threshold at its largest and turns off trimming, for every contender of
    the process: temporaries up to 32 MiB are recycled instead of page-faulted per call, as with a
    tuned allocator (larger ones are still mapped per call; our kernels recycle their outputs of
    any size in their own pool).  Returns what it set, for the report, or None where the C library
    is not glibc."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    if not (libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD) and libc.mallopt(m_trim_threshold, 2 ** 30)):
        return None
    return (f"glibc malloc with its mmap threshold fixed at {MMAP_THRESHOLD >> 20} MiB and no trimming (set by the "
            "bench, for every contender): temporaries up to that size are recycled rather than page-faulted on "
            "every call; larger ones are mapped per call")


def sgemm_rate(n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a fp32 ``torch.mm`` of n x n matrices, best of ``reps`` (after a warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e9


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #
def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fmt_ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def run(cases: Sequence[BenchCase], dtype: torch.dtype = torch.float32, modes: Sequence[str] = MODES,
        backends: Optional[Sequence[str]] = None, include_tools: bool = False, peers: Optional[Sequence[str]] = None,
        sgemm_gflops: Optional[float] = None, memory: bool = True,
        progress: Callable[[str], None] = _progress) -> List[dict]:
    """Time every contender of every case in every mode; one dict per row.

    Rows carry ``ratio`` (fastest peer's time / this row's time; > 1 is faster than every peer),
    ``gflops`` and ``pct_sgemm`` (against ``sgemm_gflops``, measured now when not given).
    """
    sgemm_gflops = sgemm_gflops or sgemm_rate()
    rows: List[dict] = []
    for i, case in enumerate(cases, 1):
        progress(f"[{i}/{len(cases)}] {case.key}: {case.name}")
        for contender in contenders(case, backends, include_tools, peers):
            for mode in modes:
                if mode == "fwd" and contender.grads is not None:
                    continue  # a peer that differentiates fewer inputs is the same peer in forward
                row = dict(case=case.key, case_name=case.name, op=case.op, mode=mode, impl=contender.name,
                           kind=contender.kind, seconds=None, reps=0, memory=None, note=contender.note,
                           counts_as_peer=contender.counts_as_peer)
                rows.append(row)
                if mode == "fwd+bwd" and not contender.backward:
                    progress(f"    {mode:7s} {contender.name}: skipped ({contender.note})")
                    continue
                gen = torch.Generator().manual_seed(0)
                step = Step(contender.fn, case.make(dtype, gen), mode, contender.grads)
                try:
                    row["seconds"], row["reps"] = time_step(step)
                    if memory:
                        row["memory"], ran = working_memory(step)
                        if ran:
                            row["note"] = "; ".join(filter(None, [row["note"], "ran " + ", ".join(ran)]))
                except (registry.BackendNotSupportedError, NotImplementedError, RuntimeError) as e:
                    first_line = (str(e).strip().splitlines() or [""])[0].replace("|", "/")[:160]
                    row["note"] = "; ".join(filter(None, [row["note"], f"failed: {type(e).__name__}: {first_line}"]))
                    row["counts_as_peer"] = False
                progress(f"    {mode:7s} {contender.name}: {_fmt_ms(row['seconds'])}")
                row["gflops"] = step_flops(case.flops, mode) / row["seconds"] / 1e9 if row["seconds"] else None
                row["pct_sgemm"] = 100.0 * row["gflops"] / sgemm_gflops if row["gflops"] else None
        if any(c.compiled for c in case.peers):
            torch._dynamo.reset()  # one case's graphs never count against the next one's recompile limit
    for row in rows:
        best = fastest_peer(rows, row["case"], row["mode"])
        row["ratio"] = best["seconds"] / row["seconds"] if best and row["seconds"] else None
    return rows


def fastest_peer(rows: Sequence[dict], case: str, mode: str) -> Optional[dict]:
    """The fastest row of a peer that computes everything the op computes."""
    timed = [r for r in rows if r["case"] == case and r["mode"] == mode and r["counts_as_peer"] and r["seconds"]]
    return min(timed, key=lambda r: r["seconds"], default=None)


def fastest_ours(rows: Sequence[dict], case: str, mode: str) -> Optional[dict]:
    timed = [r for r in rows if r["case"] == case and r["mode"] == mode and r["kind"] == "ours" and r["seconds"]]
    return min(timed, key=lambda r: r["seconds"], default=None)
