"""Memory traffic of the CUDA C++ kernels, counted in the SIMT harness, vs. the minimum and eager PyTorch.

The kernels of ``csrc/ops`` run on the CPU in the SIMT harness, built in the ``trace`` flavour:
g++ instruments every load and store of the kernel source, and ``csrc/harness/sf_trace.h``
counts those that fall inside the op's tensors (inputs, outputs, workspaces), per launch
(``semask_fast._traffic.harness_bytes``).  So these figures are measured on the real kernel code
(tile loops, padding, recomputation included), not derived from a model:

* kernel: unique bytes per launch, summed over launches (the DRAM model: a launch's repeated
  reads of the same bytes hit in cache); issued: every access (what reaches L1/L2);
* minimum: forward reads the inputs and writes the outputs once; backward reads the inputs and
  the output gradients and writes the input gradients once (saved statistics excluded);
* eager: the reference composition (:mod:`semask_fast.reference`, called directly: through the
  op, ``backend="reference"`` is one opaque custom op), summing the inputs and outputs of every
  aten op it runs, forward and autograd backward;
* triton: the Triton kernels of the same op on the same tensors, counted the same way (unique
  bytes per launch) in Triton's interpreter with the tiles a GPU runs, so each row compares the
  two implementations like for like.

The harness runs every GPU thread of every block with an instrumented call per memory access,
so the shapes are the issue's paper shapes at batch 1 (and fewer spatial tokens where noted);
each shape says what it is.  Traffic grows linearly with the batch, so the ratios carry over.
Memory that the bindings clear with ``at::zeros`` (not a kernel of ours) is not counted.

    python benchmarks/traffic_cuda.py [--no-write] [--only NAME ...]

Writes a table into ``benchmarks/results/traffic.md`` between ``<!-- cuda:begin -->`` and
``<!-- cuda:end -->``.  Needs g++, ninja and the CUDA headers (CUDA_HOME), like the harness.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The Triton column counts in Triton's interpreter, which must be chosen before the kernels import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import semask_fast  # noqa: E402
from semask_fast import record_dispatch  # noqa: E402
from semask_fast import reference as ref  # noqa: E402
from semask_fast.backends.cuda import SimtImpl  # noqa: E402
from benchmarks.traffic import (aten_bytes, gpu_tiles, harness_bytes, minimum_bytes, triton_bytes,  # noqa: E402
                                write_section)



@contextlib.contextmanager
def traced_harness():
    """Make the ``cpu`` (SIMT harness) backend load the trace build of each source."""
    SimtImpl.flavour = "trace"
    try:
        yield
    finally:
        SimtImpl.flavour = "simt"


def _randn(*shape, dtype, scale=1.0, gen):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_()


def window_case(dtype, B=1, res=56, C=96, heads=3, ws=7, shift=3):
    g = torch.Generator().manual_seed(0)
    d, nW, n = C // heads, (res // ws) ** 2, ws * ws
    q, k, v = (_randn(B * nW, heads, n, d, dtype=dtype, gen=g) for _ in range(3))
    table = _randn((2 * ws - 1) ** 2, heads, dtype=dtype, scale=0.02, gen=g)
    dout = torch.randn(B * nW, heads, n, d, generator=g).to(dtype)
    kw = dict(window_size=(ws, ws), shift_size=(shift, shift), grid=(res // ws, res // ws))

    def run(backend):
        return (semask_fast.window_attention(q, k, v, table, **kw, backend=backend),)

    inputs = [q, k, v, table]
    return dict(name=f"window_attention (Swin-T stage 1, B={B}, {str(dtype)[6:]})", op="window_attention",
                source="window_attention.cu", shape=f"B*nW={B * nW}, h={heads}, N={n}, d={d}, shift {shift}",
                run=run, inputs=inputs, gouts=[dout], outputs=[dout],
                eager=lambda: (ref.window_attention(q, k, v, table, **kw),))


def partition_case(dtype, B=1, res=56, C=96, ws=7, shift=3):
    g = torch.Generator().manual_seed(0)
    x = _randn(B, res, res, C, dtype=dtype, gen=g)
    nW = (res // ws) ** 2
    dout = torch.randn(B * nW, ws, ws, C, generator=g).to(dtype)

    def run(backend):
        return (semask_fast.window_partition(x, ws, shift, backend=backend),)

    return dict(name=f"window_partition (Swin-T stage 1, B={B}, {str(dtype)[6:]})", op="window_partition",
                source="window_process.cu", shape=f"{res}x{res}x{C}, ws {ws}, shift {shift}", run=run,
                inputs=[x], gouts=[dout], outputs=[dout], eager=lambda: (ref.window_partition(x, (ws, ws), (shift, shift)),),
                linear=True)


def semantic_case(label, B, N, K, C, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    sq, sk = _randn(B, N, K, dtype=dtype, scale=0.25, gen=g), _randn(B, N, K, dtype=dtype, scale=0.25, gen=g)
    yv = _randn(B, N, C, dtype=dtype, gen=g)
    dout = torch.randn(B, N, C, generator=g).to(dtype)

    def run(backend):
        return (semask_fast.semantic_attention(sq, sk, yv, backend=backend),)

    return dict(name=f"semantic_attention ({label}, {str(dtype)[6:]})", op="semantic_attention",
                source="semantic_attention.cu", shape=f"B_={B}, N={N}, K={K}, C={C}", run=run,
                inputs=[sq, sk, yv], gouts=[dout], outputs=[dout], eager=lambda: (ref.semantic_attention(sq, sk, yv),))


def atm_case(label, B, H, NQ, NK, D, dtype=torch.float16, splits=None):
    """``splits``: the CUDA forward's key ranges, forced (None: the plan's choice, which trades the
    fp32 partials' traffic for more blocks when the grid is small; see plan_splits)."""
    from semask_fast.backends.cuda import atm_attention as cuda_atm

    g = torch.Generator().manual_seed(0)
    q, k, v = (_randn(B, H, n, D, dtype=dtype, gen=g) for n in (NQ, NK, NK))
    dout = torch.randn(B, H, NQ, D, generator=g).to(dtype)
    dmask = torch.randn(B, NQ, NK, generator=g).to(dtype)
    planned = cuda_atm.plan_splits(B, H, NQ, NK, dtype, D, sms=cuda_atm.HARNESS_MULTIPROCESSORS)
    ranges = f"{splits} key range{'s' if splits > 1 else ''}, forced" if splits else f"{planned} key ranges, planned"

    def run(backend):
        with cuda_atm.forward_splits(splits):
            return semask_fast.atm_attention(q, k, v, backend=backend)

    return dict(name=f"atm_attention ({label}, {str(dtype)[6:]}, {ranges})", op="atm_attention",
                source="atm_attention.cu", shape=f"B={B}, h={H}, Nq={NQ}, Nk={NK}, d={D}", run=run,
                inputs=[q, k, v], gouts=[dout, dmask], outputs=[dout, dmask], eager=lambda: ref.atm_attention(q, k, v))


def mask_case(label, B, N, K, C, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    patches, classes = _randn(B, N, C, dtype=dtype, gen=g), _randn(B, K, C, dtype=dtype, gen=g)
    dout = torch.randn(B, N, K, generator=g).to(dtype)

    def run(backend):
        return (semask_fast.mask_similarity(patches, classes, backend=backend),)

    return dict(name=f"mask_similarity ({label}, {str(dtype)[6:]})", op="mask_similarity",
                source="mask_similarity.cu", shape=f"B={B}, N={N}, K={K}, C={C}", run=run,
                inputs=[patches, classes], gouts=[dout], outputs=[dout],
                eager=lambda: (ref.mask_similarity(patches, classes),))


def cases():
    return [
        partition_case(torch.float16),
        window_case(torch.float32),
        window_case(torch.float16),
        semantic_case("SeMask-T stage 1, windowed, B=1", 64, 49, 150, 96),
        semantic_case("SeMask-T stage 3, global, 16x16 of the 32x32 tokens", 1, 256, 150, 384),
        atm_case("SegViT-L, B=1, 20x20 of the 40x40 tokens", 1, 16, 150, 400, 32),
        atm_case("SegViT-L, B=1, 20x20 of the 40x40 tokens", 1, 16, 150, 400, 32, splits=1),
        mask_case("Segmenter ViT-B, ADE20K, B=1, 32x32 tokens", 1, 1024, 150, 768),
    ]


def measure(case, detail: bool = False) -> list:
    """[(phase, kernel Traffic, minimum, eager, triton Traffic)] for fwd and fwd+bwd; asserts the
    harness and the Triton kernels ran.
    ``detail`` prints the bytes of every tensor region (inputs by position, then allocations)."""
    inputs, gouts = case["inputs"], case["gouts"]
    rows = []
    for phase in ("fwd", "fwd+bwd"):
        def fn(backend, phase=phase):
            outs = case["run"](backend)
            if phase == "fwd+bwd":
                torch.autograd.grad(outs, inputs, gouts)

        def want(backend, phase=phase):
            return [(case["op"], backend, "forward")] + ([(case["op"], backend, "backward")]
                                                         if phase == "fwd+bwd" else [])

        regions = []
        with traced_harness(), record_dispatch() as ran:
            kernel = harness_bytes(case["source"], lambda lib: fn("simt"), inputs + gouts, regions)
        if detail:
            _print_regions(case, phase, regions)
        assert ran == want("simt"), f"{case['name']}: expected {want('simt')}, ran {ran}"
        with record_dispatch() as ran:
            triton = triton_bytes(lambda: fn("triton"))
        assert ran == want("triton"), f"{case['name']}: expected {want('triton')}, ran {ran}"
        if phase == "fwd":
            minimum = minimum_bytes(inputs, case["outputs"])
            eager = aten_bytes(case["eager"])
        else:
            # A data-movement op's backward needs only the output gradients.
            needs = gouts if case.get("linear") else inputs + gouts
            minimum = minimum_bytes(inputs, case["outputs"]) + minimum_bytes(needs, inputs)

            def eager_both():
                torch.autograd.grad(case["eager"](), inputs, gouts)
            eager = aten_bytes(eager_both)
        rows.append((phase, kernel, minimum, eager, triton))
    return rows


def _print_regions(case, phase, regions):
    named = {t.data_ptr(): f"{kind}{i} {tuple(t.shape)}" for kind, ts in (("input", case["inputs"]),
                                                                            ("grad_out", case["gouts"]))
             for i, t in enumerate(ts)}
    print(f"{case['name']} {phase}: per region (bytes; unique per launch summed, issued)")
    for r in regions:
        if r["read"] or r["written"]:
            name = named.get(r["begin"], "allocated" if r["allocated"] else "?")
            print(f"  {name:32s} size {r['bytes']:>10}  read {r['read']:>10} / {r['read_issued']:>11}  "
                  f"written {r['written']:>10} / {r['written_issued']:>10}")


def _mb(x):
    return f"{x / 1e6:.2f}"


def table(results) -> str:
    lines = ["| op | shape | phase | launches | kernel MB | kernel/min | issued/min | minimum MB | triton/min "
             "(launches) | eager MB | eager/kernel |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, rows in results:
        for phase, t, minimum, eager, tr in rows:
            issued = t.read_issued + t.written_issued
            lines.append(f"| {case['name']} | {case['shape']} | {phase} | {t.launches} | {_mb(t.total)} "
                         f"| {t.total / minimum:.2f} | {issued / minimum:.2f} | {_mb(minimum)} "
                         f"| {tr.total / minimum:.2f} ({tr.launches}) | {_mb(eager)} | {eager / t.total:.1f}x |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--only", nargs="*", help="cases whose name contains one of these")
    parser.add_argument("--detail", action="store_true", help="print the bytes of every tensor region")
    args = parser.parse_args()
    gpu_tiles()
    chosen = [c for c in cases() if not args.only or any(s in c["name"] for s in args.only)]
    results = []
    for case in chosen:
        results.append((case, measure(case, args.detail)))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    text = ("## CUDA C++ kernels (counted in the SIMT harness)\n\n"
            "Produced by `python benchmarks/traffic_cuda.py`.  kernel: unique bytes per launch of the CUDA "
            "kernels, counted on the real kernel code by the instrumented harness build "
            "(`csrc/harness/sf_trace.h`); issued: every load and store; minimum: inputs and output gradients "
            "read once, outputs and input gradients written once; eager: inputs + outputs of every aten op of "
            "the reference; triton: the Triton kernels on the same tensors, unique bytes per launch counted in "
            "Triton's interpreter with the GPU tiles.  Shapes are the paper shapes at batch 1 (the harness "
            "executes every GPU thread on the CPU); traffic is linear in the batch, so the ratios carry over.  "
            "The ATM forward runs twice: with the key ranges its plan picks (on this small grid, 10 blocks of "
            "class tokens for 132 SMs, the roofline model of `plan_splits` trades the fp32 partials' traffic "
            "for more blocks) and forced to one range, the like-for-like row against the Triton kernel.\n\n"
            + table(results))
    print(text)
    if not args.no_write and not args.only:
        write_section("cuda", text)


if __name__ == "__main__":
    main()
