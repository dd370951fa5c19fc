"""The machine a benchmark ran on, and the files it writes: the markdown table, the plot, the CSV.

Used by ``python -m semask_fast bench`` (:mod:`semask_fast._bench` times, this module reports).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import __version__
from . import _bench

#: /proc/cpuinfo flags that decide how fast the kernels can be (vector width, bf16/fp16, AMX).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "sve")


def _cpuinfo() -> Dict[str, str]:
    info: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def isa_flags() -> List[str]:
    """The :data:`ISA_FLAGS` this CPU has."""
    present = set((_cpuinfo().get("flags") or _cpuinfo().get("Features") or "").split())
    return [f for f in ISA_FLAGS if f in present]


def march_native() -> str:
    """What g++'s ``-march=native`` resolves to here (the cpu backend's default build target)."""
    gxx = shutil.which("g++")
    if not gxx:
        return "g++ not found"
    out = subprocess.run([gxx, "-march=native", "-Q", "--help=target"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "-march=":
            return parts[1]
    return "unknown"


def machine_line() -> str:
    """One line naming the machine: CPU, cores, ISA, compiler target, torch and its threads."""
    isa = " ".join(isa_flags()) or "no listed ISA flags"
    return (f"{cpu_model()}, {os.cpu_count()} cores ({platform.machine()}; {isa}); "
            f"g++ -march=native = {march_native()}; torch {torch.__version__}, {torch.get_num_threads()} threads")


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------- #
# Markdown
# --------------------------------------------------------------------------- #
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _ms(row: Optional[dict]) -> str:
    return "-" if not row or row.get("seconds") is None else f"{row['seconds'] * 1e3:.2f}"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(row: Optional[dict]) -> str:
    return "-" if not row or row.get("pct_sgemm") is None else f"{row['pct_sgemm']:.0f}%"


def summary_rows(rows: Sequence[dict], modes: Sequence[str]) -> List[List[str]]:
    """Per case and mode: the fastest peer, our fastest backend and the speedup."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        line = [next(r["case_name"] for r in rows if r["case"] == case)]
        for mode in modes:
            peer, ours = _bench.fastest_peer(rows, case, mode), _bench.fastest_ours(rows, case, mode)
            line += [f"{peer['impl']} {_ms(peer)}" if peer else "-",
                     f"{ours['impl'].replace('semask_fast ', '')} {_ms(ours)}" if ours else "-",
                     _ratio(ours["ratio"]) if ours else "-", _pct(ours)]
        out.append(line)
    return out


def summary_table(rows: Sequence[dict], modes: Sequence[str]) -> str:
    header = ["case"]
    for mode in modes:
        header += [f"{mode}: fastest peer (ms)", f"{mode}: semask_fast (ms)", f"{mode}: speedup", "% sgemm"]
    return _table(header, summary_rows(rows, modes))


def rows_table(rows: Sequence[dict]) -> str:
    body = []
    for r in rows:
        mem = "-" if r.get("memory") is None else f"{r['memory'] / 2 ** 20:.1f}"
        gflops = "-" if r.get("gflops") is None else f"{r['gflops']:.1f}"
        body.append([r["case"], r["mode"], r["impl"], _ms(r), _ratio(r.get("ratio")), gflops, _pct(r), mem, r["note"]])
    return _table(["case", "mode", "implementation", "ms", "vs fastest peer", "GFLOP/s", "% sgemm",
                   "working memory (MiB)", "note"], body)


def header_lines(machine: str, dtype: torch.dtype, scale: str, sgemm_gflops: float, command: str,
                 allocator: Optional[str] = None) -> List[str]:
    lines = [
        f"Machine: {machine}.",
        f"Run: `{command}`, {str(dtype).replace('torch.', '')}, {scale} shapes, {_utc_now()}, "
        f"semask_fast {__version__}.",
        f"sgemm rate: {sgemm_gflops:.0f} GFLOP/s (fp32 `torch.mm` of 2048x2048 matrices, best of 5, "
        f"{torch.get_num_threads()} threads), measured in the same run.",
        f"Allocator: {allocator or 'as the process found it'}.",
    ]
    if dtype in (torch.float16, torch.bfloat16):
        from .backends.cpu import matrix_unit_summary

        lines.append(f"Matrix unit of the cpu kernels: {matrix_unit_summary()}. % sgemm compares with the "
                     "fp32 rate above (products on a matrix unit can exceed it).")
    return lines


READING = """\
How to read it: **ms** is the median of at least 5 timed repetitions (at least 0.5 s in all) after
one warm-up call (which includes `torch.compile`'s compilation). **vs fastest peer** is the fastest
peer's time over the row's time in the same case and mode (> 1: faster than every peer; peers are
everything that is not semask_fast, eager PyTorch included, and only those that compute every
output and gradient the op computes). **GFLOP/s** counts the useful flops analytically: the matrix
products of the forward (window/ATM attention 4·N_q·N_k·d per head, semantic attention
2·N²·(K+C), mask similarity 2·N_p·K·D), and twice that for the backward (no recomputation
counted). **% sgemm** is that rate over the machine's sgemm rate above. **Working memory** is the
peak of torch's CPU allocator during one step (torch.profiler with `profile_memory=True`: every
allocation and free in time order) less the outputs and gradients the step returns; inputs are
allocated before the step; memory a kernel keeps outside torch's allocator (per-thread tiles) is
not seen. fwd+bwd computes the gradient of every differentiable input (q, k, v and the bias
table for window attention) against fixed random output gradients. **ran** names the aten
kernel SDPA took (flash = its fused CPU kernel; math = the unfused fallback)."""


def write_markdown(path: str, rows: Sequence[dict], modes: Sequence[str], header: Sequence[str],
                   e2e: Optional[dict] = None, plot_name: Optional[str] = None) -> None:
    parts = ["# CPU benchmark: semask_fast side by side with PyTorch", "", *header, "", READING, ""]
    parts += ["## Summary", "", summary_table(rows, modes), ""]
    if plot_name:
        parts += [f"![speedup vs the fastest peer]({plot_name})", ""]
    if e2e:
        parts += ["## End to end: timm Swin-T", "", e2e_markdown(e2e), ""]
    parts += ["## Every row", "", rows_table(rows), ""]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(parts))


def e2e_markdown(e2e: dict) -> str:
    head = (f"`{e2e['model']}`, random weights, B={e2e['batch']}, {e2e['size']}x{e2e['size']}, fp32, "
            f"{e2e['threads']} threads. Inference: `model.eval()` under `torch.no_grad()`; training step: "
            f"forward, cross-entropy, backward, SGD step. Median of {e2e['reps']} repetitions after a warm-up. "
            "Outputs are compared with timm as shipped on the same weights and input. The last row is a bound, not "
            "a model: the zero-copy model with the attention skipped (qkv and output projections kept), the time "
            "everything else takes in inference; no attention kernel can do better than its ratio.")
    body = [[r["name"], r["backend"], f"{r['infer_s'] * 1e3:.0f} ms", f"{r['images_per_s']:.1f}",
             _ratio(r["infer_ratio"]), "-" if r["train_s"] is None else f"{r['train_s'] * 1e3:.0f} ms",
             _ratio(r["train_ratio"]),
             "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"] for r in e2e["rows"]]
    table = _table(["model", "attention ran on", "inference", "images/s", "vs faster timm", "training step",
                    "vs faster timm", "max abs diff of outputs"], body)
    return head + "\n\n" + table


README_BEGIN = "<!-- bench_cpu:results:begin -->"
README_END = "<!-- bench_cpu:results:end -->"


def readme_markers(dtype: torch.dtype) -> Tuple[str, str]:
    """The README markers around a dtype's generated results (float32: README_BEGIN / README_END)."""
    if dtype == torch.float32:
        return README_BEGIN, README_END
    name = str(dtype).replace("torch.", "")
    return f"<!-- bench_cpu_{name}:results:begin -->", f"<!-- bench_cpu_{name}:results:end -->"


def readme_results(rows: Sequence[dict], modes: Sequence[str], header: Sequence[str], e2e: Optional[dict],
                   plot_path: Optional[str]) -> str:
    """The README's generated part of "CPU performance": machine, run, summary, plot, end to end."""
    parts = [*header, "", summary_table(rows, modes), ""]
    if plot_path:
        parts += [f"![speedup vs the fastest peer, per case, fwd and fwd+bwd]({plot_path})", ""]
    if e2e:
        parts += ["End to end, timm Swin-T (same weights; inference and a training step):", "", e2e_markdown(e2e)]
    return "\n".join(parts).rstrip("\n")


def update_readme(path: str, text: str, dtype: torch.dtype = torch.float32) -> bool:
    """Replaces what stands between the dtype's markers (:func:`readme_markers`) in ``path`` by
    ``text``; False (nothing written) when the file or a marker is missing."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        content = f.read()
    first, last = readme_markers(dtype)
    begin, end = content.find(first), content.find(last)
    if begin < 0 or end < begin:
        return False
    content = content[:begin + len(first)] + "\n" + text + "\n" + content[end:]
    with open(path, "w") as f:
        f.write(content)
    return True


# --------------------------------------------------------------------------- #
# Plot
# --------------------------------------------------------------------------- #
def write_plot(path: str, rows: Sequence[dict], modes: Sequence[str], title: str) -> bool:
    """Per case, bars of speedup over the fastest peer for every implementation, one panel per mode.
    Returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return False
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["counts_as_peer"] or r["kind"] == "ours"))
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 0.18 * len(cases) * max(1, len(impls)) + 2),
                             sharey=True, squeeze=False)
    height = 0.8 / max(1, len(impls))
    colors = plt.get_cmap("tab10")
    for ax, mode in zip(axes[0], modes):
        for j, impl in enumerate(impls):
            ys, ratios = [], []
            for i, case in enumerate(cases):
                row = next((r for r in rows if r["case"] == case and r["mode"] == mode and r["impl"] == impl), None)
                if row and row.get("ratio"):
                    ys.append(i + (j - (len(impls) - 1) / 2) * height)
                    ratios.append(row["ratio"])
            # Bars grow from 1 (the fastest peer): right is faster, left is slower.
            ax.barh(ys, [r - 1 for r in ratios], left=1, height=height, label=impl, color=colors(j))
            fastest = [y for y, r in zip(ys, ratios) if r == 1.0]  # the fastest peer: a zero-length bar, marked
            ax.scatter([1.0] * len(fastest), fastest, color=colors(j), marker="D", s=14, zorder=3)
            if impl.startswith("semask_fast"):
                for y, r in zip(ys, ratios):
                    ax.annotate(f"{r:.2f}x", (max(r, 1), y), xytext=(3, 0), textcoords="offset points",
                                va="center", fontsize="x-small")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(base=2))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(mode)
        ax.set_xlabel("speedup vs the fastest peer (log scale; 1x = the fastest peer)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(cases)))
    axes[0][0].set_yticklabels(cases)
    axes[0][0].invert_yaxis()  # shared: once for all panels
    fig.suptitle(title, fontsize="small", y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=len(impls), fontsize="small",
               bbox_to_anchor=(0.5, 0.96))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- #
# CSV (appended, Liger-style: one line per row with the machine, time and version)
# --------------------------------------------------------------------------- #
CSV_FIELDS = ["when", "version", "machine", "dtype", "case", "mode", "impl", "kind", "seconds", "ratio", "gflops",
              "pct_sgemm", "memory", "note"]


def append_csv(path: str, rows: Sequence[dict], machine: str, dtype: torch.dtype) -> None:
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(dict(r, when=now, version=__version__, machine=machine, dtype=str(dtype).replace("torch.", "")))
