"""Command line: ``python -m semask_fast {info,check,bench,gpu-check}``.

* ``info``: versions, devices, toolchains, and the op x backend table with the
  reason each unavailable backend gives.
* ``check``: runs every available kernel backend on small inputs of every op,
  per dtype, against the float64 reference (outputs and every gradient), and
  prints a parity table.  Without a CUDA device, Triton kernels run in Triton's
  interpreter on CPU tensors.  Exits 1 if any check fails.
* ``bench``: the CPU benchmark: every op at the papers' shapes, our CPU backends
  side by side with eager PyTorch, SDPA, compiled FlexAttention and
  ``torch.compile``, forward and forward+backward, and timm's Swin-T end to end;
  names the machine, writes ``benchmarks/results/bench_cpu.md`` and ``.png``,
  optionally appends to a CSV.  ``bench --quick``: Swin-T stage 1 window
  attention against eager and SDPA in seconds.
* ``gpu-check``: the whole GPU validation on one GPU, within a time budget (8 minutes by
  default): builds the CUDA kernels, parity of every op x backend (cuda, triton) x dtype on small
  inputs and at the papers' shapes, the benchmark's cases on the GPU, and the layers under
  ``torch.compile(fullgraph=True)``; writes
  ``benchmarks/results/gpu_check.md``.  Fails (exit 2) without a GPU; ``--dry-run`` lists what it
  would run.  See :mod:`semask_fast._gpu_check`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from typing import List, Sequence


def _prepare_interpreter() -> bool:
    """Without a GPU, run Triton kernels in the interpreter (must precede their import)."""
    import torch

    if torch.cuda.is_available() or "semask_fast.kernels" in sys.modules:
        return False
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ["TRITON_INTERPRET"] == "1"


def machine_name() -> str:
    """CPU model and core count (and GPU, if any): the machine figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = f"{cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        name += f", GPU {torch.cuda.get_device_name()}"
    return name


def _nvcc_version() -> str:
    cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else "")
    nvcc = shutil.which("nvcc") or (os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None)
    if not nvcc or not os.path.exists(nvcc):
        return "not found"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    release = [line for line in out.splitlines() if "release" in line]
    return f"{nvcc} ({release[0].split('release')[-1].strip()})" if release else nvcc


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def cmd_info(args) -> int:
    interpreted = _prepare_interpreter()
    import torch

    import semask_fast
    from semask_fast.backends import registry
    from semask_fast.backends.cpu import matrix_unit_summary

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"semask_fast {semask_fast.__version__}")
    print(f"machine      {machine_name()}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
          f"CUDA device: {'yes' if torch.cuda.is_available() else 'none'})")
    print(f"triton       {triton_version}" + (" (kernels run in the interpreter on CPU tensors)" if interpreted else ""))
    print(f"nvcc         {_nvcc_version()}")
    print(f"cpu backend  {_cpu_target()}")
    print(f"cpu matrix   {matrix_unit_summary()}")
    print()
    footnotes: List[str] = []
    rows = []
    for op, per_backend in registry.available_backends().items():
        row = [op]
        for backend in registry.BACKENDS:
            why = per_backend[backend]
            if not why:
                row.append("yes")
                continue
            text = "; ".join(why)
            if text not in footnotes:
                footnotes.append(text)
            row.append(f"no [{footnotes.index(text) + 1}]")
        rows.append(row)
    print(_table(["op", *registry.BACKENDS], rows))
    for i, text in enumerate(footnotes, 1):
        print(f"[{i}] {text}")
    print()
    print("backend='auto' walks cuda -> triton (CUDA tensors only) -> cpu -> reference. Never chosen "
          "automatically, ask for them by name: simt (the CUDA C++ sources run by the CPU SIMT harness) and "
          "triton on CPU tensors (Triton's interpreter) are correctness tools, slower than the reference.")
    return 0


def _cpu_target() -> str:
    """The instruction set the cpu backend's kernels are built for on this machine."""
    from semask_fast import _build, _bench_report

    flags = " ".join(_build.cpu_isa_flags()) or "no -march flag (the compiler's default target)"
    target = f"g++ {flags} (SEMASK_FAST_CPU_ISA={_build.cpu_isa()}"
    if _build.cpu_isa() == "native":
        target += f"; -march=native is {_bench_report.march_native()} here"
    return f"{target}); this CPU: {' '.join(_bench_report.isa_flags()) or 'none of the listed ISA flags'}"


def cmd_check(args) -> int:
    interpreted = _prepare_interpreter()
    import torch

    from semask_fast.backends import BackendNotSupportedError, registry
    from semask_fast.testing import check_parity, small_cases

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    wanted = [dtypes[d] for d in args.dtype]
    backends = [b for b in (args.backend or registry.BACKENDS) if b != "reference"]
    print(f"parity against the float64 reference on {machine_name()}"
          + (" (Triton in its interpreter)" if interpreted else ""))
    rows, failures = [], 0
    for case in small_cases():
        if args.op and case.op not in args.op:
            continue
        for backend in backends:
            why = registry.reasons(case.op, backend)
            if why:
                rows.append([case.op, case.name, backend, "-", "unavailable", "; ".join(why)])
                continue
            impl = registry.implementation(case.op, backend)
            device = impl.preferred_device()
            for dtype in wanted:
                gen = torch.Generator().manual_seed(0)
                tensors = {n: (t.to(device) if t is not None else None) for n, t in case.tensors(gen).items()}
                name = str(dtype).replace("torch.", "")
                try:
                    results = check_parity(case.fn, tensors, case.grad_names, dtype, backend=backend, op=case.op,
                                           exact=case.exact)
                except BackendNotSupportedError as e:
                    rows.append([case.op, case.name, backend, name, "unsupported", str(e).split(": ", 2)[-1]])
                    continue
                except Exception as e:  # a crash is a failure, reported with the rest
                    failures += 1
                    rows.append([case.op, case.name, backend, name, "FAIL", f"{type(e).__name__}: {e}"[:200]])
                    continue
                bad = [r for r in results if not r.ok]
                failures += bool(bad)
                worst = max(results, key=lambda r: r.max_error)
                detail = "; ".join(map(str, bad)) if bad else f"worst {worst}"
                rows.append([case.op, case.name, backend, name, "FAIL" if bad else "ok", detail])
    print(_table(["op", "case", "backend", "dtype", "status", "detail"], rows))
    ran = sum(r[4] in ("ok", "FAIL") for r in rows)
    print(f"{ran} checks ran, {failures} failed")
    return 1 if failures else 0


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[name]


def _bench_quick(args) -> int:
    """Swin-T stage 1 window attention (B=8): our fastest CPU backend against eager and SDPA."""
    from semask_fast import _bench, _bench_report

    case = _bench.quick_case()
    modes = _modes(args.mode)
    _bench.recycle_allocations()
    print(f"semask_fast on {_bench_report.machine_line()}")
    sgemm = _bench.sgemm_rate()
    print(f"{case.name}, {args.dtype}; sgemm rate {sgemm:.0f} GFLOP/s:")
    if not _bench.our_backends(case.op, args.backend):
        print("  no semask_fast CPU backend is available here (see `python -m semask_fast info`): "
              "backend='auto' runs the reference, i.e. eager")
    rows = _bench.run([case], _dtype(args.dtype), modes, args.backend, peers=("eager", "SDPA"), sgemm_gflops=sgemm,
                      memory=False, progress=lambda message: None)
    table = []
    for mode in modes:
        peer, ours = _bench.fastest_peer(rows, case.key, mode), _bench.fastest_ours(rows, case.key, mode)
        table.append([mode, f"{ours['seconds'] * 1e3:.2f} ms ({ours['impl']})" if ours else "-",
                      f"{peer['seconds'] * 1e3:.2f} ms ({peer['impl']})" if peer else "-",
                      f"{ours['ratio']:.2f}x" if ours else "-", f"{ours['pct_sgemm']:.0f}%" if ours else "-"])
    print(_table(["mode", "semask_fast", "fastest peer (eager, SDPA)", "speedup", "% of sgemm"], table))
    print("fwd+bwd computes the q, k, v and bias-table gradients. The full benchmark (every op, with "
          "torch.compile and FlexAttention): python -m semask_fast bench")
    return 0


def _modes(mode: str):
    return ("fwd", "fwd+bwd") if mode == "both" else (mode,)


def cmd_bench(args) -> int:
    if args.include_tools or "triton" in (args.backend or ()):
        _prepare_interpreter()  # without a GPU, Triton's kernels are timed in its interpreter
    if args.quick:
        return _bench_quick(args)
    import torch

    from semask_fast import _bench, _bench_report

    dtype = _dtype(args.dtype)
    modes = _modes(args.mode)
    cases = [c for c in _bench.bench_cases(args.scale)
             if not args.case or any(f in c.key or f in c.name for f in args.case)]
    if not cases:
        print(f"no case matches {args.case}; cases: {', '.join(c.key for c in _bench.bench_cases(args.scale))}")
        return 2
    machine = _bench_report.machine_line()
    command = "python -m semask_fast bench" + "".join(f" {a}" for a in (args.argv or []))
    allocator = _bench.recycle_allocations()
    print(f"CPU benchmark, {args.dtype}, {args.scale} shapes, on {machine}", flush=True)
    sgemm = _bench.sgemm_rate()
    print(f"sgemm rate: {sgemm:.0f} GFLOP/s (fp32 torch.mm 2048^3, best of 5)", flush=True)
    rows = _bench.run(cases, dtype, modes, args.backend, include_tools=args.include_tools, sgemm_gflops=sgemm)
    e2e = None
    full_run = args.scale == "paper" and not args.case and modes == _bench.MODES
    # The committed tables: float32 in benchmarks/results (with the end to end and the README's
    # figures), another dtype in a folder of its own.
    main_table = full_run and dtype == torch.float32
    if args.e2e or (args.e2e is None and main_table):
        if importlib.util.find_spec("timm") is None:
            print("end to end skipped: timm is not installed (pip install timm)")
        else:
            from semask_fast import _bench_e2e

            print("end to end:", file=sys.stderr, flush=True)
            e2e = _bench_e2e.run(progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(_bench_report.summary_table(rows, modes))
    if e2e:
        print(_bench_report.e2e_markdown(e2e))
    results = os.path.join("benchmarks", "results")
    out = args.out if args.out is not None else (
        (results if main_table else os.path.join(results, args.dtype)) if full_run else "")
    if out:
        md, png = os.path.join(out, "bench_cpu.md"), os.path.join(out, "bench_cpu.png")
        header = _bench_report.header_lines(machine, dtype, args.scale, sgemm, command, allocator)
        plotted = _bench_report.write_plot(png, rows, modes, f"{args.dtype}, {args.scale} shapes\n{machine}")
        _bench_report.write_markdown(md, rows, modes, header, e2e, os.path.basename(png) if plotted else None)
        print(f"wrote {md}" + (f" and {png}" if plotted else " (no plot: matplotlib is not installed)"))
        readme = args.readme
        if readme is None:
            checkout_readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
            readme = checkout_readme if full_run and args.out is None else ""
        if readme:
            plot = os.path.relpath(png, os.path.dirname(os.path.abspath(readme))) if plotted else None
            text = _bench_report.readme_results(rows, modes, header, e2e, plot)
            if _bench_report.update_readme(readme, text, dtype):
                print(f"wrote the results into {readme}")
            else:
                print(f"{readme}: no {' ... '.join(_bench_report.readme_markers(dtype))} markers; not written")
    if args.csv:
        _bench_report.append_csv(args.csv, rows, machine, dtype)
        print(f"appended to {args.csv}")
    return 0


def cmd_gpu_check(args) -> int:
    from semask_fast import _gpu_check

    options = _gpu_check.Options(steps=tuple(args.step or _gpu_check.STEPS),
                                 bench_dtypes=tuple(_dtype(d) for d in args.bench_dtype),
                                 compiled_peers=args.compiled_peers, budget_s=args.budget, out=args.out)
    if args.dry_run:
        print(_gpu_check.format_plan(_gpu_check.plan(options), options))
        return 0
    try:
        return _gpu_check.run(options, command="python -m semask_fast gpu-check" + "".join(f" {a}" for a in args.argv))
    except _gpu_check.NoGPUError as e:
        print(f"gpu-check FAILED: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semask_fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and the op x backend table with reasons")
    check = sub.add_parser("check", help="parity of every available backend against the reference")
    check.add_argument("--backend", action="append", help="only this backend (repeatable)")
    check.add_argument("--op", action="append", help="only this op (repeatable)")
    check.add_argument("--dtype", nargs="+", default=["float32", "float16", "bfloat16"],
                       choices=["float32", "float16", "bfloat16"])
    bench = sub.add_parser("bench", help="side-by-side CPU timings against eager PyTorch, SDPA, FlexAttention "
                                         "and torch.compile on the papers' shapes")
    bench.add_argument("--quick", action="store_true",
                       help="only Swin-T stage 1 window attention (B=8) against eager and SDPA (seconds)")
    bench.add_argument("--scale", choices=["paper", "small"], default="paper",
                       help="the papers' shapes, or the same cases at batch 1")
    bench.add_argument("--mode", choices=["fwd", "fwd+bwd", "both"], default="both")
    bench.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default="float32")
    bench.add_argument("--backend", action="append", help="only this semask_fast backend (repeatable)")
    bench.add_argument("--case", action="append", help="only cases whose key or name contains this (repeatable)")
    bench.add_argument("--include-tools", action="store_true",
                       help="also time the Triton interpreter and the SIMT harness (correctness tools)")
    bench.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=None,
                       help="time timm's Swin-T end to end (default: with --scale paper, float32 and no --case)")
    bench.add_argument("--out", help="write bench_cpu.md and bench_cpu.png here (default: benchmarks/results "
                                     "for a full paper-scale float32 run, benchmarks/results/<dtype> for another "
                                     "dtype, nothing otherwise; '' writes nothing)")
    bench.add_argument("--csv", help="append the rows to this CSV file")
    bench.add_argument("--readme", help="write the summary, plot and end to end into this README's generated "
                                        "part, between the dtype's markers (default: the checkout's README.md for a full paper-scale run "
                                        "written to benchmarks/results, nothing otherwise; '' writes nothing)")
    gpu = sub.add_parser("gpu-check", help="the whole GPU validation (parity, compile, benchmarks) on one GPU")
    gpu.add_argument("--dry-run", action="store_true", help="list what would run (no GPU needed)")
    from semask_fast._gpu_check import STEPS as gpu_check_steps

    gpu.add_argument("--step", action="append", choices=gpu_check_steps,
                     help="only this step (repeatable; default: all, in order)")
    gpu.add_argument("--bench-dtype", nargs="+", default=["bfloat16"], choices=["float32", "float16", "bfloat16"])
    gpu.add_argument("--compiled-peers", action="store_true",
                     help="also time compiled FlexAttention and torch.compile(eager) (one compilation per case)")
    gpu.add_argument("--budget", type=float, default=480.0,
                     help="seconds: items not started by then are reported as not run (a failure)")
    gpu.add_argument("--out", default=os.path.join("benchmarks", "results"),
                     help="write gpu_check.md and gpu_check.json here ('' writes nothing)")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])[1:]
    return {"info": cmd_info, "check": cmd_check, "bench": cmd_bench, "gpu-check": cmd_gpu_check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
