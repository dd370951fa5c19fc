"""Command line: ``python -m semask_fast {info,check,bench}``.

* ``info``: versions, devices, toolchains, and the op x backend table with the
  reason each unavailable backend gives.
* ``check``: runs every available kernel backend on small inputs of every op,
  per dtype, against the float64 reference (outputs and every gradient), and
  prints a parity table.  Without a CUDA device, Triton kernels run in Triton's
  interpreter on CPU tensors.  Exits 1 if any check fails.
* ``bench``: times every available backend side by side with eager PyTorch on
  the papers' shapes (or scaled down), names the machine, appends to a CSV.
"""

from __future__ import annotations

import argparse
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
    return 0


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


def cmd_bench(args) -> int:
    import torch

    from semask_fast import _bench

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    machine = machine_name()
    print(f"{args.mode} timings, {args.dtype}, {args.scale} shapes, on {machine}")
    rows = _bench.run(args.scale, dtype, args.mode, args.backend, include_tools=args.include_tools,
                      peers=not args.backend)
    table = [[r["op"], r["case"], r["backend"], "-" if r["seconds"] is None else f"{r['seconds'] * 1e3:.3f} ms",
              "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x", r["note"]] for r in rows]
    print(_table(["op", "case", "backend", "median", "vs eager", "note"], table))
    if args.csv:
        _bench.write_csv(rows, args.csv, machine, dtype, args.mode)
        print(f"appended to {args.csv}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semask_fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and the op x backend table with reasons")
    check = sub.add_parser("check", help="parity of every available backend against the reference")
    check.add_argument("--backend", action="append", help="only this backend (repeatable)")
    check.add_argument("--op", action="append", help="only this op (repeatable)")
    check.add_argument("--dtype", nargs="+", default=["float32", "float16", "bfloat16"],
                       choices=["float32", "float16", "bfloat16"])
    bench = sub.add_parser("bench", help="side-by-side timings against eager PyTorch on this machine")
    bench.add_argument("--backend", action="append", help="only this backend (repeatable)")
    bench.add_argument("--scale", choices=["small", "paper"], default="small")
    bench.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd")
    bench.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    bench.add_argument("--include-tools", action="store_true",
                       help="also time the Triton interpreter and the SIMT harness (correctness tools)")
    bench.add_argument("--csv", help="append the rows to this CSV file")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check, "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
