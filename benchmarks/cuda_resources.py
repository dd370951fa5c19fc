"""Per-kernel resources of the CUDA kernels (csrc/ops/*.cu) for sm_80 and sm_90, from ptxas.

Compiles the device code of every source with ``nvcc -Xptxas -v`` (the flags of the cuda
extension build, semask_fast/_build.py), with the generated instance units of the sources that have
them (``semask_fast._build.generated_files``: a kernel compiled by several units, such as a kernel
templated on the dtype alone, is one row), and writes a table of registers, spills, stack and static
shared memory per kernel instantiation into benchmarks/results/resources.md, between the
``<!-- cuda:begin -->`` and ``<!-- cuda:end -->`` markers (the Triton table has its own markers
in the same file).  Dynamic shared memory is sized at launch and is not in this table.

    CUDA_HOME=/usr/local/cuda python benchmarks/cuda_resources.py [--jobs 2] [--json out.json] [SOURCE.cu ...]

With sources named, only their rows are recompiled and replaced; the other rows stay.

tests/harness/test_build.py asserts the committed table has no spills.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from semask_fast import _build

RESULTS = Path(__file__).resolve().parent / "results" / "resources.md"
BEGIN, END = "<!-- cuda:begin -->", "<!-- cuda:end -->"
COLUMNS = ("source", "kernel", "arch", "registers", "spill_stores", "spill_loads", "stack", "smem")

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+)'")
_FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
                    r"(?P<loads>\d+) bytes spill loads")
_USED = re.compile(r"Used (?P<regs>\d+) registers(?:.*?(?P<smem>\d+) bytes smem)?")


def nvcc_command(source: Path, out_dir: Path, units_dir: Path) -> list:
    from torch.utils import cpp_extension

    home = _build.cuda_home()
    if home is None:
        raise SystemExit("nvcc not found: set CUDA_HOME")
    includes = ([_build.csrc_dir() / "include", units_dir, _build.csrc_dir()]
                + [Path(p) for p in cpp_extension.include_paths()])
    import sysconfig

    includes.append(Path(sysconfig.get_paths()["include"]))
    flags = [f for f in _build.CUDA_CFLAGS if f != "-lineinfo"] + _build._HALF_FLAGS
    # -cuda: device compilation (ptxas runs) without compiling the host side.
    return ([str(home / "bin" / "nvcc")] + flags + [f"-I{p}" for p in includes]
            + ["-Xptxas", "-v", "-cuda", str(source), "-o", str(out_dir / (source.stem + ".ii"))])


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return list(names)
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else list(names)


def short_name(name: str) -> str:
    """`(anonymous namespace)::foo<__half, true>(...)` -> `foo<__half, true>`."""
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    return name[:cut]


def parse_ptxas(source: str, log: str) -> list:
    rows, current = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"source": source, "kernel": m["name"], "arch": m["arch"]}
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current.update(stack=int(m["stack"]), spill_stores=int(m["stores"]), spill_loads=int(m["loads"]))
            continue
        m = _USED.search(line)
        if m:
            current.update(registers=int(m["regs"]), smem=int(m["smem"] or 0))
            rows.append(current)
            current = None
    names = demangle([r["kernel"] for r in rows])
    for r, n in zip(rows, names):
        r["kernel"] = short_name(n)
    return rows


def compile_unit(source: Path, unit: Path, units_dir: Path):
    """(source name, rows, error) of one translation unit of ``source`` (itself or a generated unit)."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(nvcc_command(unit, Path(tmp), units_dir), capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return source.name, None, f"{unit.name}: {_build.first_error_line(log)}"
    return source.name, parse_ptxas(source.name, log), None


def compile_sources(sources: list, jobs: int, units_root: Path):
    """Yields (source name, rows, error) per source; its units compile in parallel with the others'."""
    work = []
    for source in sources:
        units_dir = units_root / source.stem
        work += [(source, unit, units_dir) for unit in [source] + _build.write_generated("cuda", source, units_dir)]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda w: compile_unit(*w), work))
    for source in sources:
        mine = [r for r in results if r[0] == source.name]
        errors = [err for _, _, err in mine if err is not None]
        if errors:
            yield source.name, None, errors[0]
            continue
        rows = {}
        for _, found, _ in mine:
            for r in found:
                rows.setdefault((r["kernel"], r["arch"]), r)  # the same kernel in several units: one row
        yield source.name, list(rows.values()), None


def markdown(rows: list, failures: dict) -> str:
    lines = [
        "### CUDA C++ kernels (nvcc -Xptxas -v)",
        "",
        f"Generated by `python benchmarks/cuda_resources.py`; flags: `{' '.join(_build.CUDA_CFLAGS)}`. "
        "smem = static shared memory per block (dynamic shared memory is sized at launch).",
        "",
        "| source | kernel | arch | registers | spill stores (B) | spill loads (B) | stack (B) | smem (B) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["source"], r["kernel"], r["arch"])):
        lines.append(f"| {r['source']} | `{r['kernel']}` | {r['arch']} | {r['registers']} | {r['spill_stores']} | "
                     f"{r['spill_loads']} | {r['stack']} | {r['smem']} |")
    for name, err in sorted(failures.items()):
        lines.append(f"| {name} | build failed: {err.replace('|', '/')} | | | | | | |")
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    content = path.read_text() if path.exists() else (
        "# Kernel resources (registers, spills, shared memory) for sm_80 and sm_90\n\n"
        "<!-- triton:begin -->\n<!-- triton:end -->\n\n" + BEGIN + "\n" + END + "\n")
    if BEGIN not in content or END not in content:
        content = content.rstrip("\n") + "\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + BEGIN + "\n" + text + "\n" + END + tail)


def read_table(path: Path = RESULTS) -> list:
    """The rows of the committed CUDA table (what the spill test checks)."""
    if not path.exists() or BEGIN not in path.read_text():
        return []
    content = path.read_text()
    section = content.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(COLUMNS) and cells[2].startswith("sm_"):
            rows.append(dict(zip(COLUMNS, [cells[0], cells[1].strip("`"), cells[2]] + [int(c) for c in cells[3:]])))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("sources", nargs="*", help="only these csrc/ops files (default: all)")
    args = parser.parse_args(argv)
    sources = [_build.source_path(n) for n in args.sources] or _build.op_sources()
    redo = {p.name for p in sources}
    known = {p.name for p in _build.op_sources()}
    kept = [r for r in read_table() if r["source"] not in redo and r["source"] in known] if args.sources else []
    rows, failures = list(kept), {}
    with tempfile.TemporaryDirectory() as units_root:
        for name, found, err in compile_sources(sources, args.jobs, Path(units_root)):
            if err is None:
                rows.extend(found)
                print(f"{name}: {len(found)} kernel builds", file=sys.stderr)
            else:
                failures[name] = err
                print(f"{name}: FAILED: {err}", file=sys.stderr)
    write_section(markdown(rows, failures))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"{len(rows)} kernels, {len(spills)} with spills, {len(failures)} sources failed; wrote {RESULTS}")
    return 1 if failures or spills else 0


if __name__ == "__main__":
    sys.exit(main())
