"""Memory traffic of the Swin window kernels at Swin-T stage 1, and a GPU time model.

Shape (issue 3): B=8, 56x56 tokens, C=96, h=3 (d=32), window 7, shift 3, i.e.
512 windows of N=49.  For each op, forward and forward+backward:

* kernel: bytes the Triton kernels read + write, each address once per launch
  (the DRAM model).  Derived from the launches (``attention_model``,
  ``partition_model``), and first checked to equal the count of Triton's
  interpreter (``semask_fast._traffic.triton_bytes``) on small shapes: the
  interpreter is too slow for 512 windows.  The script fails if they differ;
* minimum: inputs read once and outputs written once (backward: q, k, v, out,
  dout, logsumexp in; dq, dk, dv, d(table) out);
* eager: the reference composition, summing the inputs and outputs of every aten
  op it runs (``semask_fast._traffic.aten_bytes``), run at the full shape.

The GPU times are a MODEL, not a measurement (no GPU here): max(bytes / HBM
bandwidth, FLOPs / peak) with the datasheet figures below.

    TRITON_INTERPRET=1 python benchmarks/traffic_window.py            # fp32 and fp16 (a few minutes)

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
from benchmarks.traffic import Traffic, aten_bytes, minimum_bytes, triton_bytes, write_section  # noqa: E402


#: Datasheet figures for the time model: HBM bytes/s, dense FLOP/s (fp32 SIMT, and fp16/bf16 tensor cores).
GPUS = {
    "A100-SXM4-80GB": {"bw": 2.039e12, "float32": 19.5e12, "half": 312e12},
    "H100-SXM5": {"bw": 3.35e12, "float32": 67e12, "half": 989e12},
}


def _grads(outs, inputs, gouts):
    return torch.autograd.grad(outs, [t for t in inputs if t is not None and t.requires_grad], gouts)


# --------------------------------------------------------------------------- #
# The kernels' traffic derived from their launches (checked against the interpreter count)
# --------------------------------------------------------------------------- #


def attention_model(b, hw, h, d, ws, dtype, image, table=True, interpreter=None):
    """(fwd, bwd) Traffic of the window-attention kernels for an image batch (b, hw), unique bytes per launch,
    with the tiles of ``wa.backward_plan(..., interpreter=interpreter)`` (None: the launchers' default).

    fwd: q, k, v read once, the table column of each head, out and the fp32 logsumexp written.
    bwd, three launches with a table (one without): the main kernel reads q, k, v, out, dout, lse and the
    table and writes dq, dk, dv and per-program fp32 partial dS sums (G, h, N, N) (re-read by the later
    windows of a program when a window spans several tiles); the fold reads the N*N valid pairs of each
    partial and writes one fp32 (rows, h) sum per chunk of groups; the ordered sum reads the chunks and
    writes the table gradient.
    """
    from semask_fast.kernels import window_attention as wa

    elt = dtype.itemsize
    nwh, nww = -(-hw[0] // ws[0]), -(-hw[1] // ws[1])
    n, b_ = ws[0] * ws[1], b * nwh * nww
    tokens = b * hw[0] * hw[1] if image else b_ * n  # tokens that exist in memory
    rows = (2 * ws[0] - 1) * (2 * ws[1] - 1)
    tab = rows * h * elt if table else 0
    act = tokens * h * d * elt  # one of q, k, v, out, dout, dq, dk, dv
    lse = b_ * h * n * 4
    fwd = Traffic(read=3 * act + tab, written=act + lse, launches=1)
    plan = wa.backward_plan(wa.Geometry(ws, b_, h, d), dtype, interpreter=interpreter)
    main, wpp = plan["main"], plan["main"].per_program
    groups = b_ // wpp
    part = groups * h * n * n * 4 if table else 0  # only the real (i, j) pairs are stored
    part_reread = part if (main["NT"] > 1 and wpp > 1) else 0
    bwd = Traffic(read=5 * act + lse + tab + part_reread, written=3 * act + part, launches=1)
    if table:
        chunks = -(-groups // plan["table"]["CHUNK"]) * rows * h * 4
        fold = Traffic(read=part, written=chunks, launches=1)
        ordered_sum = Traffic(read=chunks, written=tab, launches=1)
        bwd = _plus(_plus(bwd, fold), ordered_sum)
    return fwd, bwd


def partition_model(b, hw, c, ws, elt):
    """(fwd, bwd): partition reads every pixel and writes every window token; its backward, a merge,
    reads the window tokens that map to pixels and writes every pixel."""
    nwh, nww = -(-hw[0] // ws[0]), -(-hw[1] // ws[1])
    pixels, slots = b * hw[0] * hw[1] * c * elt, b * nwh * nww * ws[0] * ws[1] * c * elt
    return Traffic(read=pixels, written=slots, launches=1), Traffic(read=pixels, written=pixels, launches=1)


def _plus(a, b):
    return Traffic(a.read + b.read, a.written + b.written, a.read_issued + b.read_issued,
                   a.written_issued + b.written_issued, a.launches + b.launches)


# --------------------------------------------------------------------------- #
# Cases: (name, inputs, run(backend), eager, minimum bytes, model)
# --------------------------------------------------------------------------- #


def window_attention_case(b, dtype, hw=(56, 56), h=3, d=32, ws=(7, 7), shift=(3, 3), interpreter=None):
    """The core op on (B*nW, h, N, d), with the in-kernel shift mask."""
    grid = (hw[0] // ws[0], hw[1] // ws[1])
    n, b_ = ws[0] * ws[1], b * grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b_, h, n, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
    table = (torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), h, generator=g) * 0.02).to(dtype).requires_grad_()
    kw = dict(window_size=ws, shift_size=shift, grid=grid)

    def run(backend):
        return semask_fast.window_attention(q, k, v, table, backend=backend, **kw)

    out = torch.empty(b_, h, n, d, dtype=dtype)
    lse = torch.empty(b_, h, n, dtype=torch.float32)
    fwd_min = minimum_bytes([q, k, v, table], [out])
    bwd_min = minimum_bytes([q, k, v, out, out, lse], [q, k, v, table])
    return dict(name="window_attention", inputs=[q, k, v, table], run=run, out_shape=out.shape,
                eager=lambda: ref.window_attention(q, k, v, table, **kw), fwd_min=fwd_min,
                both_min=fwd_min + minimum_bytes([], [lse]) + bwd_min, flops=4 * b_ * h * n * n * d,
                model=attention_model(b, hw, h, d, ws, dtype, image=False, interpreter=interpreter))


def shifted_window_case(b, dtype, hw=(56, 56), h=3, d=32, ws=(7, 7), shift=(3, 3), interpreter=None):
    """Zero-copy op on the (B, H, W, 3C) qkv image vs. roll + partition + attention + merge + roll."""
    c = h * d
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, *hw, 3 * c, generator=g).to(dtype).requires_grad_()
    table = (torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), h, generator=g) * 0.02).to(dtype).requires_grad_()
    kw = dict(num_heads=h, window_size=ws, shift_size=shift)

    def run(backend):
        return semask_fast.shifted_window_attention(qkv, table, backend=backend, **kw)

    nw = -(-hw[0] // ws[0]) * -(-hw[1] // ws[1])
    out = torch.empty(b, *hw, c, dtype=dtype)
    lse = torch.empty(b * nw, h, ws[0] * ws[1], dtype=torch.float32)
    fwd_min = minimum_bytes([qkv, table], [out])
    bwd_min = minimum_bytes([qkv, out, out, lse], [qkv, table])
    return dict(name="shifted_window_attention (zero-copy)", inputs=[qkv, table], run=run, out_shape=out.shape,
                eager=lambda: ref.shifted_window_attention(qkv, table, **kw), fwd_min=fwd_min,
                both_min=fwd_min + minimum_bytes([], [lse]) + bwd_min,
                flops=4 * b * nw * h * (ws[0] * ws[1]) ** 2 * d,
                model=attention_model(b, hw, h, d, ws, dtype, image=True, interpreter=interpreter))


def partition_case(b, dtype, hw=(56, 56), c=96, ws=(7, 7), shift=(3, 3), interpreter=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, *hw, c, generator=g).to(dtype).requires_grad_()

    def run(backend):
        return semask_fast.window_partition(x, ws, shift, backend=backend)

    nw = -(-hw[0] // ws[0]) * -(-hw[1] // ws[1])
    out = torch.empty(b * nw, ws[0], ws[1], c, dtype=dtype)
    fwd_min = minimum_bytes([x], [out])
    return dict(name="window_partition (pad+roll+partition)", inputs=[x], run=run, out_shape=out.shape,
                eager=lambda: ref.window_partition(x, ws, shift), fwd_min=fwd_min,
                both_min=fwd_min + minimum_bytes([out], [x]), flops=0,
                model=partition_model(b, hw, c, ws, x.element_size()))


CASES = (window_attention_case, shifted_window_case, partition_case)

#: Small shapes where the interpreter count must equal the model: both layouts, padding
#: (image 10x13), and (min_programs=2) the packed backward whose later windows re-read the partials.
CHECKS = [
    (window_attention_case, dict(b=1, hw=(14, 14), h=2, d=16), None),
    (window_attention_case, dict(b=1, hw=(12, 12), h=2, d=16, ws=(6, 6), shift=(3, 3)), 2),
    (shifted_window_case, dict(b=1, hw=(10, 13), h=1, d=16), None),
    (partition_case, dict(b=2, hw=(10, 13), c=8), None),
]


def check_model(dtype) -> str:
    """Counts the kernels' bytes in the interpreter on small shapes; fails unless they equal the model."""
    lines = ["| check | pass | counted (bytes) | model (bytes) | issued (bytes) |", "|---|---|---|---|---|"]
    from semask_fast.kernels import window_attention as wa

    default = wa.BWD_MIN_PROGRAMS
    for make, kw, min_programs in CHECKS:
        # A small shape only packs windows when the program target is lowered; model and kernels
        # read the same constant.
        wa.BWD_MIN_PROGRAMS = min_programs or default
        try:
            lines += _check_one(make, kw, dtype)
        finally:
            wa.BWD_MIN_PROGRAMS = default
    return "\n".join(lines) + "\n"


def _check_one(make, kw, dtype):
    case = make(dtype=dtype, **kw)
    dout = torch.randn(case["out_shape"]).to(dtype)
    fwd = triton_bytes(lambda: case["run"]("triton"))
    both = triton_bytes(lambda: _grads(case["run"]("triton"), case["inputs"], dout))
    m_fwd, m_bwd = case["model"]
    label = f"{case['name']} {kw}"
    lines = []
    for p, t, m in (("fwd", fwd, m_fwd), ("fwd+bwd", both, _plus(m_fwd, m_bwd))):
        if (t.read, t.written, t.launches) != (m.read, m.written, m.launches):
            raise AssertionError(f"{label} {p}: counted read {t.read} written {t.written} in {t.launches} "
                                 f"launches, model read {m.read} written {m.written} in {m.launches}")
        lines.append(f"| {label} | {p} | {t.total} | {m.total} | {t.read_issued + t.written_issued} |")
    return lines


def measure(case, dout):
    eager_fwd = aten_bytes(case["eager"])
    eager_both = aten_bytes(lambda: _grads(case["eager"](), case["inputs"], dout))
    m_fwd, m_bwd = case["model"]
    return dict(fwd=m_fwd, both=_plus(m_fwd, m_bwd), eager_fwd=eager_fwd, eager_both=eager_both,
                min_fwd=case["fwd_min"], min_both=case["both_min"])


def _mb(x):
    return f"{x / 1e6:.2f}"


def report(b, dtype, results, flops, checks) -> str:
    dname = str(dtype).replace("torch.", "")
    cmd = "TRITON_INTERPRET=1 python benchmarks/traffic_window.py" + ("" if dtype == torch.float32 else
                                                                      f" --dtype {dname}")
    lines = [f"### {dname}", "",
             f"Swin-T stage 1: B={b}, 56x56, C=96, h=3, d=32, ws=7, shift 3 ({b * 64} windows of N=49). "
             f"Command: `{cmd}`.", "",
             "kernel = bytes the Triton kernels read + write, each address once per launch (DRAM model), from the "
             "launch model below, which the script first checks equals the interpreter's count on small shapes. "
             "minimum = inputs once, outputs once (fwd: q, k, v, table -> out; fwd+bwd adds the fp32 logsumexp "
             "written then read, and q, k, v, out, dout -> dq, dk, dv, d(table)). eager = sum of the inputs and "
             "outputs of every aten op the reference runs. MB = 1e6 bytes.", "",
             "| op | pass | kernel (MB) | minimum (MB) | kernel / min | eager (MB) | eager / min | launches |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results:
        for label, t, mn, eager in (("fwd", r["fwd"], r["min_fwd"], r["eager_fwd"]),
                                    ("fwd+bwd", r["both"], r["min_both"], r["eager_both"])):
            lines.append(f"| {name} | {label} | {_mb(t.total)} | {_mb(mn)} | {t.total / mn:.3f} | {_mb(eager)} | "
                         f"{eager / mn:.2f} | {t.launches} |")
    lines += ["", "Model check (interpreter count == launch model, exact; issued = every masked-on access):", "",
              checks, "",
              "**GPU time MODEL, not a measurement** (no GPU here): max(bytes / HBM bandwidth, FLOPs / peak), "
              "FLOPs of the useful products (fwd 4·B_·h·N²·d, fwd+bwd 3.5x that), datasheet peaks: fp32 SIMT for "
              "fp32, dense tensor cores for fp16/bf16; 'eager' is bytes only.", "",
              "| op | pass | GPU | kernel model (us) | eager bytes-only model (us) |", "|---|---|---|---|---|"]
    kind = "float32" if dtype == torch.float32 else "half"
    for name, r in results:
        f = flops.get(name, 0)
        for label, t, eager, fl in (("fwd", r["fwd"], r["eager_fwd"], f),
                                    ("fwd+bwd", r["both"], r["eager_both"], 3.5 * f)):
            for gpu, spec in GPUS.items():
                model = max(t.total / spec["bw"], fl / spec[kind]) * 1e6
                lines.append(f"| {name} | {label} | {gpu} | {model:.1f} | {eager / spec['bw'] * 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", nargs="*", default=["float32", "float16"],
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    texts = []
    for name in args.dtype:
        dtype = getattr(torch, name)
        print(f"checking the launch model in the interpreter ({name})...", file=sys.stderr, flush=True)
        checks = check_model(dtype)
        results, flops = [], {}
        for make in CASES:
            # The figures are for the GPU tiles (the checks above ran the interpreter's).
            case = make(args.batch, dtype, interpreter=False)
            dout = torch.randn(case["out_shape"]).to(dtype)
            results.append((case["name"], measure(case, dout)))
            flops[case["name"]] = case["flops"]
        texts.append(report(args.batch, dtype, results, flops, checks))
    text = "\n".join(texts)
    print(text)
    if not args.no_write:
        write_section("window", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
