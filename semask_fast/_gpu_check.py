"""The whole GPU validation in one command: ``python -m semask_fast gpu-check``.

On one CUDA GPU, within a time budget (default 8 minutes), in this order:

1. ``build``: the CUDA C++ sources (``csrc/ops``), compiled in parallel (cached afterwards);
2. ``parity``: every op x backend (``cuda``, ``triton``) x dtype (fp32, fp16, bf16) on the small
   cases of :func:`semask_fast.testing.small_cases`, outputs and every gradient against float64
   (:func:`semask_fast.testing.check_parity`, its tolerances), the backend that ran asserted;
3. ``bench``: the CPU benchmark's cases (:func:`semask_fast._bench.bench_cases`, the papers'
   shapes) on the GPU: eager and SDPA (optionally the compiled peers) beside our ``cuda`` and
   ``triton`` backends, forward and forward+backward, timed with CUDA events per call (host
   overhead included, as a user's loop sees it) and as CUDA-graph replays (the kernels alone),
   with peak memory;
4. ``compile``: ``torch.compile(fullgraph=True)`` (inductor) of the layers and a patched timm Swin-T
   on CUDA tensors against eager, outputs and every parameter gradient, the kernels asserted to run;
5. ``shapes``: the parity of step 2 at the papers' shapes (the benchmark's cases), fp32 and bf16:
   the tiles, grids and index arithmetic of real sizes, which the small cases do not reach.

Results go to ``benchmarks/results/gpu_check.md`` (and ``gpu_check.json``).  Exit status 0 when
every check passed, 1 when one failed or a backend was unavailable, 2 when there is no GPU.
``--dry-run`` lists what would run, without a GPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

#: The costliest step, the float64 references at the papers' shapes, runs last: a spent budget
#: cuts it, not the benchmark or the compile check.
STEPS = ("build", "parity", "bench", "compile", "shapes")
BACKENDS = ("cuda", "triton")
PARITY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Dtypes of the parity check at the papers' shapes (the bench cases): fp32 and the training dtype.
SHAPES_DTYPES = (torch.float32, torch.bfloat16)
MODES = ("fwd", "fwd+bwd")
#: Peers timed by default (the compiled ones compile per case: ``--compiled-peers`` adds them).
DEFAULT_PEERS = ("eager", "SDPA")
COMPILED_PEERS = ("FlexAttention (compiled)", "torch.compile(eager)")
#: The layers first: the whole Swin-T models take the longest to compile.
COMPILE_MODELS = ("WindowAttention", "SemanticLayer", "ATMDecoderLayer", "MaskTransformerHead", "swin_t",
                  "swin_t_zero_copy")


class NoGPUError(RuntimeError):
    pass


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass
class Options:
    steps: Tuple[str, ...] = STEPS
    bench_dtypes: Tuple[torch.dtype, ...] = (torch.bfloat16,)
    compiled_peers: bool = False
    budget_s: float = 480.0
    out: str = os.path.join("benchmarks", "results")


# --------------------------------------------------------------------------- #
# What runs (the dry run prints it; the run follows it)
# --------------------------------------------------------------------------- #
def plan(options: Options) -> Dict[str, List[str]]:
    """Every item of every step, as lines (no GPU needed)."""
    from . import _build
    from ._bench import bench_cases
    from .testing import small_cases

    items: Dict[str, List[str]] = {}
    if "build" in options.steps:
        items["build"] = [f"nvcc {p.name} ({' '.join(a for a in _build.CUDA_CFLAGS if 'gencode' in a)})"
                          for p in _build.op_sources()]
    if "parity" in options.steps:
        items["parity"] = [f"{case.op} [{case.name}] {backend} {_dtype_name(dtype)}"
                           for case in small_cases() for backend in BACKENDS for dtype in PARITY_DTYPES]
    if "shapes" in options.steps:
        items["shapes"] = [f"{case.key} {backend} {_dtype_name(dtype)}"
                           for case in bench_cases("paper") for backend in BACKENDS for dtype in SHAPES_DTYPES]
    if "bench" in options.steps:
        peers = _bench_peers(options)
        items["bench"] = [f"{case.key} {_dtype_name(dtype)} {mode}: {', '.join(peers + list(BACKENDS))}"
                          for dtype in options.bench_dtypes for case in bench_cases("paper") for mode in MODES]
    if "compile" in options.steps:
        items["compile"] = [f"{name}: torch.compile(fullgraph=True) vs eager, outputs and gradients"
                            for name in COMPILE_MODELS]
    return items


def _bench_peers(options: Options) -> List[str]:
    return list(DEFAULT_PEERS) + (list(COMPILED_PEERS) if options.compiled_peers else [])


def format_plan(items: Dict[str, List[str]], options: Options) -> str:
    lines = [f"gpu-check plan (budget {options.budget_s:.0f} s; results to {options.out}/gpu_check.md):"]
    for step, rows in items.items():
        lines.append(f"{step}: {len(rows)} item(s)")
        lines.extend(f"  {r}" for r in rows)
    return "\n".join(lines)


def require_gpu() -> torch.device:
    if not torch.cuda.is_available():
        raise NoGPUError("gpu-check needs a CUDA GPU and found none (torch.cuda.is_available() is False; "
                         f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'no'}). "
                         "`--dry-run` lists what it would run.")
    return torch.device("cuda", torch.cuda.current_device())


# --------------------------------------------------------------------------- #
# Steps
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class StepResult:
    name: str
    seconds: float = 0.0
    rows: List[List[str]] = dataclasses.field(default_factory=list)
    header: Tuple[str, ...] = ()
    failures: int = 0
    note: str = ""


def step_build(options: Options, deadline: float) -> StepResult:
    """Compile every CUDA source at once (nvcc in parallel processes; the GIL is free meanwhile)."""
    from concurrent.futures import ThreadPoolExecutor

    from . import _build

    result = StepResult("build", header=("source", "status", "detail"))
    reasons = _build.toolchain_reasons("cuda")
    if reasons:
        result.rows.append(["(all)", "unavailable", "; ".join(reasons)])
        result.failures += 1
        return result

    def build(path):
        start = time.perf_counter()
        try:
            _build.load("cuda", path.name)
            return [path.name, "ok", f"{time.perf_counter() - start:.0f} s"]
        except _build.BuildError as e:
            return [path.name, "FAIL", e.first_error[:200]]

    sources = _build.op_sources()
    with ThreadPoolExecutor(max_workers=max(1, len(sources))) as pool:
        result.rows = list(pool.map(build, sources))
    result.failures = sum(r[1] != "ok" for r in result.rows)
    return result


def step_parity(options: Options, deadline: float, device: torch.device) -> StepResult:
    from .backends import BackendNotSupportedError, registry
    from .testing import check_parity, small_cases

    result = StepResult("parity", header=("op", "case", "backend", "dtype", "status", "detail"))
    for case in small_cases():
        for backend in BACKENDS:
            if registry.implementation(case.op, backend) is None:  # declared: not a failure
                result.rows.append([case.op, case.name, backend, "-", "not implemented", "-"])
                continue
            why = registry.reasons(case.op, backend)
            if why:
                result.rows.append([case.op, case.name, backend, "-", "unavailable", "; ".join(why)[:200]])
                result.failures += 1
                continue
            for dtype in PARITY_DTYPES:
                name = _dtype_name(dtype)
                if time.monotonic() > deadline:
                    result.rows.append([case.op, case.name, backend, name, "not run", "time budget spent"])
                    result.failures += 1
                    continue
                gen = torch.Generator().manual_seed(0)
                tensors = {n: None if t is None else t.to(device) for n, t in case.tensors(gen).items()}
                try:
                    checks = check_parity(case.fn, tensors, case.grad_names, dtype, backend=backend, op=case.op,
                                          exact=case.exact)
                except BackendNotSupportedError as e:
                    result.rows.append([case.op, case.name, backend, name, "unsupported", str(e)[-200:]])
                    continue
                except Exception as e:  # a crash is a failure, reported with the rest
                    result.rows.append([case.op, case.name, backend, name, "FAIL", f"{type(e).__name__}: {e}"[:200]])
                    result.failures += 1
                    continue
                status, detail = _verdict(checks)
                result.failures += status == "FAIL"
                result.rows.append([case.op, case.name, backend, name, status, detail])
    return result


def _verdict(checks) -> Tuple[str, str]:
    """(status, detail) of one parity check's comparisons: the failed ones, or the worst."""
    bad = [c for c in checks if not c.ok]
    if bad:
        return "FAIL", "; ".join(map(str, bad))
    return "ok", f"worst {max(checks, key=lambda c: c.max_error)}"


def step_shapes(options: Options, deadline: float, device: torch.device) -> StepResult:
    """:func:`step_parity` at the papers' shapes: each benchmark case's inputs, every gradient.  The
    backends of a (case, dtype) share its reference runs (float64 and in-dtype: most of the time)."""
    from ._bench import bench_cases
    from .backends import registry
    from .testing import check_parity

    result = StepResult("shapes", header=("case", "backend", "dtype", "status", "seconds", "detail"))
    for case in bench_cases("paper"):
        gen = torch.Generator().manual_seed(0)
        tensors = {n: t.to(device) for n, t in case.make(torch.float32, gen).items()}
        grad_names = [n for n, t in tensors.items() if t.is_floating_point()]
        for dtype in SHAPES_DTYPES:
            name = _dtype_name(dtype)
            references: dict = {}
            for backend in BACKENDS:
                why = registry.reasons(case.op, backend)
                if why or time.monotonic() > deadline:
                    detail = "; ".join(why)[:200] if why else "time budget spent"
                    result.rows.append([case.key, backend, name, "unavailable" if why else "not run", "-", detail])
                    result.failures += 1
                    continue
                start = time.monotonic()
                try:
                    checks = check_parity(lambda backend, **kw: case.call(backend, **kw), tensors, grad_names,
                                          dtype, backend=backend, op=case.op, references=references)
                except Exception as e:  # a crash is a failure, reported with the rest
                    result.rows.append([case.key, backend, name, "FAIL", f"{time.monotonic() - start:.1f}",
                                        f"{type(e).__name__}: {e}"[:200]])
                    result.failures += 1
                    continue
                status, detail = _verdict(checks)
                result.failures += status == "FAIL"
                result.rows.append([case.key, backend, name, status, f"{time.monotonic() - start:.1f}", detail[:300]])
        torch.cuda.empty_cache()
    return result


def compile_models(device: torch.device) -> Dict[str, Callable[[], Tuple[torch.nn.Module, tuple]]]:
    """The layers and models the compile step runs, built on ``device`` (backend "auto")."""
    def window_attention():
        from .nn import WindowAttention

        mask = torch.where(torch.rand(2, 49, 49) < 0.2, -100.0, 0.0)
        return WindowAttention(64, 2, window_size=7), (torch.randn(8, 49, 64), mask)

    def swin(zero_copy):
        def make():
            import timm

            from .nn import patch_timm

            m = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, drop_path_rate=0.0)
            patch_timm(m, zero_copy=zero_copy)
            return m, (torch.randn(2, 3, 224, 224),)
        return make

    def semantic_layer():
        from .models import SemanticLayer

        return SemanticLayer(64, 11, window_size=7), (torch.randn(2, 20 * 24, 64), 20, 24)

    def atm_layer():
        from .models import ATMDecoderLayer

        return ATMDecoderLayer(64, 2), (torch.randn(11, 2, 64), torch.randn(403, 2, 64))

    def segmenter_head():
        from .models import MaskTransformerHead

        return MaskTransformerHead(11, 48, 64, n_layers=1, n_heads=2), (torch.randn(2, 12 * 16, 48), (12, 16))

    makers = {"WindowAttention": window_attention, "swin_t": swin(False), "swin_t_zero_copy": swin(True),
              "SemanticLayer": semantic_layer, "ATMDecoderLayer": atm_layer, "MaskTransformerHead": segmenter_head}

    def on_device(make):
        def build():
            torch.manual_seed(0)
            model, args = make()
            for m in model.modules():  # compiled and eager code draw dropout masks differently
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
                if isinstance(m, torch.nn.MultiheadAttention):  # its dropout is a float, not a module
                    m.dropout = 0.0
            return model.to(device).train(), tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        return build

    return {name: on_device(makers[name]) for name in COMPILE_MODELS}


def step_compile(options: Options, deadline: float, device: torch.device) -> StepResult:
    from . import record_dispatch
    from .testing import TOLERANCES, compare

    tol = TOLERANCES[torch.float32][0]
    result = StepResult("compile", header=("model", "status", "backends that ran", "detail"))
    for name, build in compile_models(device).items():
        if time.monotonic() > deadline:
            result.rows.append([name, "not run", "-", "time budget spent"])
            result.failures += 1
            continue
        torch._dynamo.reset()
        try:
            model, args = build()

            def run(fn):
                model.zero_grad(set_to_none=True)
                with record_dispatch() as ran:
                    out = fn(*args)
                    outs = out if isinstance(out, tuple) else (out,)
                    sum((o.float() ** 2).mean() for o in outs).backward()
                return outs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, ran

            want, want_grads, _ = run(model)
            got, grads, ran = run(torch.compile(model, fullgraph=True))
            checks = [compare(f"output {i}", a, b, tol) for i, (a, b) in enumerate(zip(got, want))]
            checks += [compare(f"grad of {n}", grads[n], want_grads[n], tol) for n in want_grads]
            bad = [str(c) for c in checks if not c.ok]
            backends = sorted({b for _, b, _ in ran})
            if not ran or set(backends) - set(BACKENDS):
                bad.append(f"expected the cuda or triton kernels to run, ran {backends or 'none'}")
            if set(grads) != set(want_grads):
                bad.append("compiled code computed a different set of parameter gradients")
            worst = max(checks, key=lambda c: c.max_error) if checks else None
            result.failures += bool(bad)
            result.rows.append([name, "FAIL" if bad else "ok", ", ".join(backends),
                                "; ".join(bad)[:300] if bad else f"worst {worst}"])
        except Exception as e:
            result.failures += 1
            result.rows.append([name, "FAIL", "-", f"{type(e).__name__}: {e}"[:300]])
    return result


def time_cuda(step: Callable[[], Any], *, min_time: float = 0.1, min_reps: int = 5,
              max_reps: int = 100) -> Tuple[float, int]:
    """(median seconds, repetitions) of ``step()`` on the current stream, CUDA events, after a warm-up."""
    step()
    torch.cuda.synchronize()
    times: List[float] = []
    while len(times) < min_reps or (sum(times) < min_time and len(times) < max_reps):
        times.append(_event_seconds(step))
    return statistics.median(times), len(times)


def _event_seconds(work: Callable[[], Any]) -> float:
    """Seconds of ``work()`` on the current stream, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_cuda_graph(step: Callable[[], Any], *, replays: int = 20) -> float:
    """Median seconds of one replay of ``step()`` captured in a CUDA graph: the kernels without
    the host's per-call overhead.  Warmed up on a side stream first, as capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    return statistics.median(_event_seconds(graph.replay) for _ in range(replays))


def _bench_step(fn: Callable[..., Any], inputs: Dict[str, torch.Tensor], mode: str, grads: Optional[Sequence[str]]):
    inputs = {n: t.detach().clone().requires_grad_(mode == "fwd+bwd" and (grads is None or n in grads))
              for n, t in inputs.items()}
    leaves = [t for t in inputs.values() if t.requires_grad]
    out_grads: List[torch.Tensor] = []

    def step():
        for t in leaves:
            t.grad = None
        out = fn(**inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if mode == "fwd+bwd":
            if not out_grads:
                out_grads.extend(torch.randn_like(o) for o in outs)
            torch.autograd.backward(outs, out_grads)
    return step


def step_bench(options: Options, deadline: float, device: torch.device) -> StepResult:
    from . import _bench, record_dispatch
    from .backends import registry

    header = ("case", "dtype", "mode", "implementation", "ms", "vs fastest peer", "TFLOP/s", "graph ms",
              "graph vs fastest peer", "peak MiB", "note")
    result = StepResult("bench", header=header)
    wanted_peers = _bench_peers(options)
    for dtype in options.bench_dtypes:
        for case in _bench.bench_cases("paper"):
            contenders: List[Tuple[str, str, Callable[..., Any], bool, Optional[Tuple[str, ...]]]] = []
            for peer in case.peers:
                if peer.name in wanted_peers:
                    fn = peer.fn
                    if peer.compiled:
                        fn = (lambda f, k: (lambda **kw: f(**kw, kernel=k)))(fn, torch.compile(peer.kernel)) \
                            if peer.kernel else torch.compile(fn)
                    contenders.append((peer.name, "peer", fn, True, peer.grads))
            for backend in BACKENDS:
                contenders.append((f"semask_fast {backend}", backend,
                                   (lambda b: (lambda **kw: case.call(b, **kw)))(backend), True, None))
            gen = torch.Generator().manual_seed(0)
            inputs = {n: t.to(device) for n, t in case.make(dtype, gen).items()}
            rows = []
            for mode in MODES:
                for name, kind, fn, _, grads in contenders:
                    if mode == "fwd" and grads is not None:
                        continue
                    row = dict(name=name, kind=kind, mode=mode, seconds=None, graph=None, note="", grads=grads,
                               memory=None, step=None)
                    rows.append(row)
                    if time.monotonic() > deadline:
                        row["note"] = "not run: time budget spent"
                        continue
                    if kind in BACKENDS:
                        why = registry.reasons(case.op, kind)
                        if why:
                            row["note"] = "unavailable: " + "; ".join(why)[:150]
                            continue
                    try:
                        step = _bench_step(fn, inputs, mode, grads)
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                        with record_dispatch() as ran:
                            row["seconds"], _ = time_cuda(step)
                        row["memory"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
                        if kind in BACKENDS and {b for _, b, _ in ran} != {kind}:
                            row["note"] = f"ran {sorted({b for _, b, _ in ran})}, not {kind}"
                            row["seconds"] = None
                        else:
                            row["step"] = step
                    except Exception as e:  # reported in the table; a peer may not support a dtype
                        row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
                    if kind in BACKENDS and row["seconds"] is None and not row["note"].startswith("not run"):
                        result.failures += 1
            # Graph replays after every per-call timing of the case: a capture that fails cannot
            # disturb those.  A failed capture is reported in the row, not counted as a failure.
            for row in rows:
                if row["step"] is not None and time.monotonic() <= deadline:
                    try:
                        row["graph"] = time_cuda_graph(row["step"])
                    except Exception as e:
                        torch.cuda.synchronize()
                        why = str(e).splitlines()[0][:120] if str(e) else ""
                        failed = f"graph capture failed: {type(e).__name__}: {why}"
                        row["note"] = "; ".join(filter(None, [row["note"], failed]))
                row["step"] = None
            if any(c.compiled for c in case.peers):
                torch._dynamo.reset()
            for mode in MODES:
                peers = [r for r in rows if r["mode"] == mode and r["kind"] == "peer" and r["grads"] is None
                         and r["seconds"]]
                best = min((r["seconds"] for r in peers), default=None)
                best_graph = min((r["graph"] for r in peers if r["graph"]), default=None)
                flops = _bench.step_flops(case.flops, mode)
                for r in (r for r in rows if r["mode"] == mode):
                    s, g = r["seconds"], r["graph"]
                    mine = r["kind"] != "peer"
                    result.rows.append([
                        case.name, _dtype_name(dtype), mode, r["name"], f"{s * 1e3:.3f}" if s else "-",
                        f"{best / s:.2f}x" if s and best and mine else "-",
                        f"{flops / s / 1e12:.1f}" if s else "-", f"{g * 1e3:.3f}" if g else "-",
                        f"{best_graph / g:.2f}x" if g and best_graph and mine else "-",
                        f"{r['memory']:.0f}" if r["memory"] is not None else "-", r["note"]])
    return result


# --------------------------------------------------------------------------- #
# The run and its report
# --------------------------------------------------------------------------- #
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = lambda c: str(c).replace("|", "/")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_lines(device: Optional[torch.device]) -> List[str]:
    from . import __version__
    from .__main__ import machine_name

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [f"Machine: {machine_name()}."]
    if device is not None:
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU: {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.multi_processor_count} SMs, {props.total_memory / 2 ** 30:.0f} GiB.")
    lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
                 f"semask_fast {__version__}.")
    return lines


def report(results: Sequence[StepResult], options: Options, device: Optional[torch.device], command: str,
           total_seconds: float) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    failures = sum(r.failures for r in results)
    parts = ["# GPU check", "", *machine_lines(device), f"Run: `{command}`, {when}, {total_seconds:.0f} s "
             f"(budget {options.budget_s:.0f} s).", "",
             f"**{'PASSED' if not failures else f'FAILED: {failures} failure(s)'}**", "",
             _table(("step", "seconds", "failures"), [[r.name, f"{r.seconds:.0f}", str(r.failures)] for r in results])]
    for r in results:
        parts += ["", f"## {r.name}", ""]
        if r.note:
            parts += [r.note, ""]
        parts.append(_table(r.header, r.rows) if r.rows else "(nothing ran)")
    return "\n".join(parts) + "\n"


def run(options: Options, command: str = "python -m semask_fast gpu-check",
        echo: Callable[[str], None] = print) -> int:
    """Run the steps on the current GPU, write the report; the exit status (see the module doc)."""
    device = require_gpu()
    start = time.monotonic()
    deadline = start + options.budget_s
    results: List[StepResult] = []
    for name in options.steps:
        echo(f"[gpu-check] {name}...")
        t0 = time.monotonic()
        if name == "build":
            r = step_build(options, deadline)
        else:
            r = {"parity": step_parity, "shapes": step_shapes, "compile": step_compile,
                 "bench": step_bench}[name](options, deadline, device)
        r.seconds = time.monotonic() - t0
        results.append(r)
        echo(f"[gpu-check] {name}: {r.failures} failure(s), {r.seconds:.0f} s")
        # Written after every step: a run stopped from outside keeps the steps it finished.
        text = report(results, options, device, command, time.monotonic() - start)
        if options.out:
            os.makedirs(options.out, exist_ok=True)
            with open(os.path.join(options.out, "gpu_check.md"), "w") as f:
                f.write(text)
            with open(os.path.join(options.out, "gpu_check.json"), "w") as f:
                json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    if options.out:
        echo(f"[gpu-check] wrote {os.path.join(options.out, 'gpu_check.md')}")
    echo(text)
    return 1 if any(r.failures for r in results) else 0


__all__ = ["Options", "NoGPUError", "plan", "format_plan", "require_gpu", "run", "report", "StepResult",
           "compile_models", "time_cuda", "time_cuda_graph", "STEPS", "BACKENDS"]
