"""Ahead-of-time compile every shipped Triton kernel configuration for sm_80 and sm_90.

Every module of ``semask_fast.kernels`` lists its shipped configurations in
``AOT_CONFIGS`` (:class:`semask_fast.kernels.AOTConfig`).  This script compiles
each one with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
(no GPU needed), reads registers, spill (local memory) bytes and static shared
memory from the cubin with ``cuobjdump --dump-resource-usage``, adds the dynamic
shared memory Triton allocates, prints a table and writes it into
``benchmarks/results/resources.md`` between ``<!-- triton:begin -->`` and
``<!-- triton:end -->``.

Results are cached in ``benchmarks/results/aot_cache.json`` (committed) keyed by
the kernel's source, the configuration, the arch and the Triton version, so a
re-run (CI) only compiles what changed.

    python benchmarks/aot_compile.py            # compile, print, write the table
    python benchmarks/aot_compile.py --check    # also exit 1 on spills or shared memory over the limit
    python benchmarks/aot_compile.py --json     # rows as JSON (tests/test_aot.py)
    python benchmarks/aot_compile.py --modules window_attention window_process   # a subset, print only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "resources.md"
CACHE = ROOT / "benchmarks" / "results" / "aot_cache.json"
ARCHS = (80, 90)
#: Largest shared memory one block may use (opt-in), bytes: A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255
BEGIN, END = "<!-- triton:begin -->", "<!-- triton:end -->"
CUDA_BEGIN, CUDA_END = "<!-- cuda:begin -->", "<!-- cuda:end -->"


def _kernels():
    # Compiling needs real JIT functions, not the interpreter's wrappers.
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the AOT compile needs Triton's compiler, not its interpreter")
    import semask_fast.kernels as pkg

    return pkg


def kernel_modules():
    """name -> module, for every module of semask_fast.kernels (each must define AOT_CONFIGS)."""
    pkg = _kernels()
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    return {name: importlib.import_module(f"{pkg.__name__}.{name}") for name in names}


def _key(cfg, arch: int) -> str:
    import triton

    fn = getattr(cfg.kernel, "fn", cfg.kernel)
    # The whole module's source (a kernel's @triton.jit helpers live beside it) and, when it uses
    # them, the shared helpers of kernels/_common.py.
    source = inspect.getsource(inspect.getmodule(fn))
    if "from ._common import" in source:
        source += inspect.getsource(importlib.import_module(f"{_kernels().__name__}._common"))
    text = json.dumps([source, cfg.name, cfg.signature,
                       {k: repr(v) for k, v in cfg.constexprs.items()}, cfg.num_warps, cfg.num_stages, arch,
                       triton.__version__] + ([cfg.maxnreg] if cfg.maxnreg else []), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cuobjdump() -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else "cuobjdump"


def _compile(module: str, index: int, arch: int) -> dict:
    """Compile one configuration (runs in a worker process); registers, spills, shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = kernel_modules()[module].AOT_CONFIGS[index]
    src = ASTSource(cfg.kernel, cfg.signature, cfg.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=cfg.options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    line = next(ln for ln in usage.splitlines() if "REG:" in ln)
    field = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return {"kernel": getattr(cfg.kernel, "__name__", str(cfg.kernel)), "config": cfg.name, "arch": arch,
            "registers": field["REG"], "spill_bytes": field["LOCAL"] + field.get("STACK", 0),
            "smem": compiled.metadata.shared + field["SHARED"], "smem_limit": SMEM_LIMIT[arch],
            "warps": cfg.num_warps, "stages": cfg.num_stages}


def _save(cache: dict, prune: bool = False) -> None:
    """Merge into the cache file (other runs may be writing it too) and replace it atomically."""
    if not prune and CACHE.exists():
        try:
            cache = {**json.loads(CACHE.read_text()), **cache}
        except json.JSONDecodeError:
            pass
    tmp = CACHE.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(sorted(cache.items())), indent=0) + "\n")
    os.replace(tmp, CACHE)


def collect(jobs: int = 0, only=None, cached_only: bool = False) -> list:
    """Resource rows of every configuration of every module (or of ``only``), compiling what is not cached
    (or, with ``cached_only``, leaving it out)."""
    modules = kernel_modules()
    missing = [name for name, mod in modules.items() if not getattr(mod, "AOT_CONFIGS", None)]
    if missing:
        raise SystemExit(f"kernel modules without AOT_CONFIGS: {', '.join(missing)}")
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    rows, todo, used = {}, [], set()
    for name, mod in modules.items():
        if only and name not in only:
            continue
        for i, cfg in enumerate(mod.AOT_CONFIGS):
            for arch in ARCHS:
                key = _key(cfg, arch)
                used.add(key)
                if key in cache:
                    rows[(name, i, arch)] = cache[key]
                else:
                    todo.append((name, i, arch, key))
    if todo and cached_only:
        print(f"{len(todo)} configurations not compiled yet, left out: "
              + ", ".join(sorted({f"{n}[{i}]" for n, i, _, _ in todo})), file=sys.stderr)
        todo = []
    if todo:
        print(f"compiling {len(todo)} kernel configurations ({len(rows)} cached)...", file=sys.stderr, flush=True)
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
            futures = {pool.submit(_compile, name, i, arch): (name, i, arch, key) for name, i, arch, key in todo}
            for n, fut in enumerate(concurrent.futures.as_completed(futures)):
                name, i, arch, key = futures[fut]
                cache[key] = rows[(name, i, arch)] = dict(fut.result(), module=name)
                if n % 16 == 15:
                    _save(cache)  # keep progress if interrupted
    prune = not only and not cached_only
    if prune:
        cache = {k: v for k, v in cache.items() if k in used}  # drop entries of configs that changed
    _save(cache, prune)
    return [dict(rows[k], module=k[0]) for k in sorted(rows)]


def problems(rows) -> list:
    out = []
    for r in rows:
        where = f"{r['config']} sm_{r['arch']}"
        if r["spill_bytes"]:
            out.append(f"{where}: {r['spill_bytes']} bytes of spills")
        if r["smem"] > r["smem_limit"]:
            out.append(f"{where}: shared memory {r['smem']} > {r['smem_limit']}")
        if r["registers"] > MAX_REGISTERS:
            out.append(f"{where}: {r['registers']} registers")
    return out


def table(rows, missing: int = 0) -> str:
    import triton

    head = ("| module | kernel | config | arch | warps | registers | spills (bytes) | shared memory (bytes) "
            "| smem limit |\n|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['module']} | {r['kernel']} | {r['config']} | sm_{r['arch']} | {r['warps']} | "
                   f"{r['registers']} | {r['spill_bytes']} | {r['smem']} | {r['smem_limit']} |\n" for r in rows)
    note = (f" **{missing} configurations not compiled yet** (table written with `--cached-only`; run the "
            "command to complete it)." if missing else "")
    return (f"Triton {triton.__version__}, `python benchmarks/aot_compile.py` "
            f"({len(rows)} compilations, no GPU needed).{note}\n\n" + head + body)


def write(text: str, path: Path = RESULTS) -> None:
    """Replace the triton section of the results file, creating the file with both sections."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Kernel resources (ahead-of-time compilation)\n\n## Triton\n\n"
                        f"{BEGIN}\n{END}\n\n## CUDA C++\n\n{CUDA_BEGIN}\n{CUDA_END}\n")
    old = path.read_text()
    if BEGIN not in old or END not in old:
        raise SystemExit(f"{path} lacks the markers {BEGIN} / {END}")
    head, rest = old.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on spills or shared memory over the limit")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--jobs", type=int, default=0, help="compile processes (default: CPU count)")
    parser.add_argument("--json", action="store_true", help="print the rows and the kernel modules as JSON only")
    parser.add_argument("--modules", nargs="*", help="only these kernel modules (implies --no-write)")
    parser.add_argument("--cached-only", action="store_true", help="compile nothing; table of the cached rows")
    args = parser.parse_args(argv)
    rows = collect(args.jobs, args.modules, args.cached_only)
    if args.json:
        print(json.dumps({"modules": sorted(kernel_modules()), "rows": rows}))
        return 0
    expected = sum(len(m.AOT_CONFIGS) for name, m in kernel_modules().items()
                   if not args.modules or name in args.modules) * len(ARCHS)
    text = table(rows, expected - len(rows))
    print(text)
    if not args.no_write and not args.modules:
        write(text)
    bad = problems(rows)
    for p in bad:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
