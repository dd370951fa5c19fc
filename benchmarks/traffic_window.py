"""Memory traffic of the Swin window kernels at Swin-T stage 1, and a GPU time model.

Shape (issue 3): B=8, 56x56 tokens, C=96, h=3 (d=32), window 7, shift 3, i.e.
512 windows of N=49.  For each op, forward and forward+backward:

* kernel: bytes the Triton kernels read + write, counted in Triton's interpreter
  (``benchmarks.traffic.triton_bytes``; each address once per launch = the DRAM
  model, and every masked-on access = "issued");
* minimum: inputs read once and outputs written once (backward: q, k, v, out,
  dout, logsumexp in; dq, dk, dv, d(table) out);
* eager: the reference composition, summing the inputs and outputs of every aten
  op it runs (``benchmarks.traffic.aten_bytes``).

The GPU times are a MODEL, not a measurement (no GPU here): max(bytes / HBM
bandwidth, FLOPs / peak) with the datasheet figures below.

    TRITON_INTERPRET=1 python benchmarks/traffic_window.py            # full shape, fp32 (minutes)
    TRITON_INTERPRET=1 python benchmarks/traffic_window.py --batch 1  # quicker, same ratios

Writes the tables into ``benchmarks/results/traffic.md`` between
``<!-- window:begin -->`` and ``<!-- window:end -->``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import semask_fast  # noqa: E402
from semask_fast import reference as ref  # noqa: E402
from benchmarks.traffic import aten_bytes, minimum_bytes, triton_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "traffic.md"
BEGIN, END = "<!-- window:begin -->", "<!-- window:end -->"

#: Datasheet figures for the time model: HBM bytes/s, dense FLOP/s (fp32 SIMT, and fp16/bf16 tensor cores).
GPUS = {
    "A100-SXM4-80GB": {"bw": 2.039e12, "float32": 19.5e12, "half": 312e12},
    "H100-SXM5": {"bw": 3.35e12, "float32": 67e12, "half": 989e12},
}


def _grads(outs, inputs, gouts):
    return torch.autograd.grad(outs, [t for t in inputs if t is not None and t.requires_grad], gouts)


def window_attention_case(b, dtype):
    """The core op on (B*nW, h, N, d), with the in-kernel shift mask."""
    h, d, ws, grid = 3, 32, (7, 7), (8, 8)
    g = torch.Generator().manual_seed(0)
    b_ = b * grid[0] * grid[1]
    q, k, v = (torch.randn(b_, h, 49, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
    table = (torch.randn(169, h, generator=g) * 0.02).to(dtype).requires_grad_()
    kw = dict(window_size=ws, shift_size=(3, 3), grid=grid)

    def run(backend):
        return semask_fast.window_attention(q, k, v, table, backend=backend, **kw)

    out = run("reference").detach()
    dout = torch.randn_like(out)
    lse = torch.empty(b_, h, 49, dtype=torch.float32)
    fwd_min = minimum_bytes([q, k, v, table], [out])
    bwd_min = minimum_bytes([q, k, v, out, dout, lse], [q, k, v, table])
    flops = 4 * b_ * h * 49 * 49 * d
    return dict(name="window_attention", run=run, inputs=[q, k, v, table], dout=dout,
                eager_fwd=lambda: ref.window_attention(q, k, v, table, **kw), fwd_min=fwd_min,
                bwd_min=bwd_min, lse=lse, flops=flops)


def shifted_window_case(b, dtype):
    """Zero-copy op on the (B, H, W, 3C) qkv image vs. roll + partition + attention + merge + roll."""
    h, d, ws, hw = 3, 32, (7, 7), (56, 56)
    c = h * d
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, *hw, 3 * c, generator=g).to(dtype).requires_grad_()
    table = (torch.randn(169, h, generator=g) * 0.02).to(dtype).requires_grad_()
    kw = dict(num_heads=h, window_size=ws, shift_size=(3, 3))

    def run(backend):
        return semask_fast.shifted_window_attention(qkv, table, backend=backend, **kw)

    out = run("reference").detach()
    dout = torch.randn_like(out)
    b_ = b * 64
    lse = torch.empty(b_, h, 49, dtype=torch.float32)
    fwd_min = minimum_bytes([qkv, table], [out])
    bwd_min = minimum_bytes([qkv, out, dout, lse], [qkv, table])
    flops = 4 * b_ * h * 49 * 49 * d
    return dict(name="shifted_window_attention (zero-copy)", run=run, inputs=[qkv, table], dout=dout,
                eager_fwd=lambda: ref.shifted_window_attention(qkv, table, **kw), fwd_min=fwd_min,
                bwd_min=bwd_min, lse=lse, flops=flops)


def partition_case(b, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 56, 56, 96, generator=g).to(dtype).requires_grad_()

    def run(backend):
        return semask_fast.window_partition(x, 7, 3, backend=backend)

    out = run("reference").detach()
    return dict(name="window_partition (roll+partition)", run=run, inputs=[x], dout=torch.randn_like(out),
                eager_fwd=lambda: ref.window_partition(x, (7, 7), (3, 3)), fwd_min=minimum_bytes([x], [out]),
                bwd_min=minimum_bytes([out], [x]), lse=None, flops=0)


def measure(case):
    run, inputs, dout = case["run"], case["inputs"], case["dout"]
    fwd = triton_bytes(lambda: run("triton"))
    both = triton_bytes(lambda: _grads(run("triton"), inputs, dout))
    eager_fwd = aten_bytes(case["eager_fwd"])
    eager_both = aten_bytes(lambda: _grads(case["eager_fwd"](), inputs, dout))
    # Training writes the logsumexp in forward and reads it in backward: both are in the fwd+bwd minimum.
    lse = minimum_bytes([], [case["lse"]])
    return dict(fwd=fwd, both=both, eager_fwd=eager_fwd, eager_both=eager_both,
                min_fwd=case["fwd_min"], min_both=case["fwd_min"] + lse + case["bwd_min"])


def _mb(x):
    return f"{x / 1e6:.2f}"


def report(b, dtype, results, flops) -> str:
    lines = [f"Swin-T stage 1: B={b}, 56x56, C=96, h=3, d=32, ws=7, shift 3 ({b * 64} windows of N=49), "
             f"{str(dtype).replace('torch.', '')}. Command: `TRITON_INTERPRET=1 python benchmarks/traffic_window.py"
             f"{'' if b == 8 else f' --batch {b}'}{'' if dtype == torch.float32 else ' --dtype ' + str(dtype)[6:]}`.",
             "",
             "Bytes in MB. kernel = unique addresses per launch (DRAM model), issued = every masked-on access; "
             "eager = sum of inputs+outputs of every aten op of the reference. minimum: inputs once, outputs once "
             "(fwd: q, k, v, table -> out; fwd+bwd adds the fp32 logsumexp written and read, and q, k, v, out, dout "
             "-> dq, dk, dv, d(table)).",
             "",
             "| op | pass | kernel | issued | minimum | kernel / min | eager | eager / min | launches |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results:
        for label, t, mn, eager in (("fwd", r["fwd"], r["min_fwd"], r["eager_fwd"]),
                                    ("fwd+bwd", r["both"], r["min_both"], r["eager_both"])):
            lines.append(f"| {name} | {label} | {_mb(t.total)} | {_mb(t.read_issued + t.written_issued)} | "
                         f"{_mb(mn)} | {t.total / mn:.3f} | {_mb(eager)} | {eager / mn:.2f} | {t.launches} |")
    lines += ["", "**GPU time MODEL** (not measured: no GPU here): max(bytes / HBM bandwidth, FLOPs / peak), "
              "FLOPs of the useful N=49 products (fwd 4·B_·h·N²·d, fwd+bwd 3.5× that); peak = fp32 SIMT for fp32, "
              "dense tensor cores for fp16/bf16.", "",
              "| op | pass | GPU | kernel model (us) | eager bytes-only model (us) |", "|---|---|---|---|---|"]
    kind = "float32" if dtype == torch.float32 else "half"
    for name, r in results:
        f = flops.get(name, 0)
        for label, t, eager, fl in (("fwd", r["fwd"], r["eager_fwd"], f), ("fwd+bwd", r["both"], r["eager_both"],
                                                                          3.5 * f)):
            for gpu, spec in GPUS.items():
                model = max(t.total / spec["bw"], fl / spec[kind]) * 1e6
                lines.append(f"| {name} | {label} | {gpu} | {model:.1f} | {eager / spec['bw'] * 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def write(text: str, path: Path = RESULTS) -> None:
    """Replace the window section of the results file (creating it if needed), leaving other sections alone."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Memory traffic\n\n")
    old = path.read_text()
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
    else:
        head, tail = old.rstrip("\n") + "\n\n## Swin window attention (issue 3)\n\n", "\n"
    path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    results, flops = [], {}
    for make in (window_attention_case, shifted_window_case, partition_case):
        case = make(args.batch, dtype)
        print(f"measuring {case['name']}...", file=sys.stderr, flush=True)
        results.append((case["name"], measure(case)))
        flops[case["name"]] = case["flops"]
    text = report(args.batch, dtype, results, flops)
    print(text)
    if not args.no_write:
        write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
