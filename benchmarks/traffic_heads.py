"""Memory traffic of the semantic-attention and ATM kernels vs. the minimum and eager PyTorch, and a GPU time model.

Shapes (issue 4), fp16 (what a GPU trains in):

* SeMask-T stage 1, windowed: B=2 images of 56x56 -> 128 windows of 7x7 (N=49), K=150, C=96;
* SeMask-T stage 3, global: N=1024 tokens (32x32), K=150, C=384, batch 2 in the issue; counted at
  batch 1 (``--stage3-batch``) because the interpreter logs every address the backward issues
  (~1.5 GB of logs per image), and every figure of this op is linear in the batch;
* SegViT-L ATM: B=2, dim 512, h=16 (d=32), Nq=150 class tokens, Nk=1600 (40x40).

For each, forward and forward+backward:

* kernel: bytes the Triton kernels read + write, each address once per launch (the DRAM
  model), counted in Triton's interpreter by ``benchmarks.traffic.triton_bytes``; "issued"
  counts every masked-on element of every load/store (what reaches L2);
* minimum: forward reads the inputs and writes the outputs once; backward reads the inputs
  and the output gradients and writes the input gradients once (saved statistics excluded);
* eager: the reference composition, summing the inputs and outputs of every aten op it runs
  (``benchmarks.traffic.aten_bytes``).

GPU times are a MODEL, not a measurement (no GPU here): max(bytes / HBM bandwidth, FLOPs /
peak) with H100-SXM5 datasheet figures (3.35 TB/s, 989 TFLOP/s dense fp16).  Kernel FLOPs
count the tiles the kernels issue (padding and recomputation included); eager FLOPs count the
matmuls PyTorch runs.  The eager time model ignores launch overheads (it flatters eager).

    TRITON_INTERPRET=1 python benchmarks/traffic_heads.py          # ~10 minutes on 2 cores

Writes the tables into ``benchmarks/results/traffic.md`` between ``<!-- heads:begin -->`` and
``<!-- heads:end -->`` (other sections of that file are left as they are).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

import semask_fast  # noqa: E402
from semask_fast import reference as ref  # noqa: E402
from benchmarks.traffic import aten_bytes, minimum_bytes, triton_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "traffic.md"
BEGIN, END = "<!-- heads:begin -->", "<!-- heads:end -->"
GPU = dict(name="H100-SXM5", bw=3.35e12, half=989e12)


def _randn(*shape, scale=1.0, gen):
    return (torch.randn(*shape, generator=gen) * scale).to(torch.float16).requires_grad_()


# --------------------------------------------------------------------------- #
# Cases
# --------------------------------------------------------------------------- #
def semantic_case(name, B, N, K, C):
    from semask_fast.kernels.semantic_attention import backward_config, forward_config

    g = torch.Generator().manual_seed(0)
    sq, sk = _randn(B, N, K, scale=0.25, gen=g), _randn(B, N, K, scale=0.25, gen=g)
    yv = _randn(B, N, C, gen=g)
    dout = torch.randn(B, N, C, generator=g).half()
    inputs = [sq, sk, yv]

    def fwd(backend):
        return (semask_fast.semantic_attention(sq, sk, yv, backend=backend),)

    # Issued FLOPs of the kernels: padded tiles, S recomputed per C tile, dP = dO Yv^T in both backward kernels.
    f, b = forward_config(N, K, C, sq.dtype), backward_config(N, K, C, sq.dtype)
    pad = lambda n, blk: triton.cdiv(n, blk) * blk  # noqa: E731
    nm, nn, kk, cc = pad(N, f["BLOCK_M"]), pad(N, f["BLOCK_N"]), pad(K, f["BLOCK_K"]), pad(C, f["BLOCK_C"])
    ctiles = cc // f["BLOCK_C"]
    kflops_f = 2 * B * nm * nn * (kk * ctiles + cc)
    nb, kp, cb = pad(N, b["BLOCK_M"]), b["BLOCK_KP"], pad(C, b["BLOCK_C"])
    # S in every (key block, C tile) program and in the query kernel; dP, dYv, dSk, dSq.
    kflops_b = 2 * B * nb * nb * (kp * (cb // b["BLOCK_C"] + 1) + 2 * cb + cb + 2 * kp)
    eflops_f = 2 * B * N * N * (K + C)
    eflops_b = 2 * B * N * N * (2 * K + 2 * C)
    out = torch.empty(B, N, C, dtype=torch.float16)
    fmin = minimum_bytes(inputs, [out])
    bmin = minimum_bytes(inputs + [dout], inputs)
    return dict(name=name, shape=f"B_={B}, N={N}, K={K}, C={C}", fwd=fwd, inputs=inputs, gouts=[dout],
                eager=lambda: (ref.semantic_attention(sq, sk, yv),), fmin=fmin, bmin=bmin,
                kflops=(kflops_f, kflops_b), eflops=(eflops_f, eflops_b))


def atm_case(name, B, H, NQ, NK, D):
    from semask_fast.kernels.atm_attention import backward_config, forward_config

    g = torch.Generator().manual_seed(0)
    q, k, v = _randn(B, H, NQ, D, gen=g), _randn(B, H, NK, D, gen=g), _randn(B, H, NK, D, gen=g)
    dout = torch.randn(B, H, NQ, D, generator=g).half()
    dmask = torch.randn(B, NQ, NK, generator=g).half()
    inputs = [q, k, v]

    def fwd(backend):
        return semask_fast.atm_attention(q, k, v, backend=backend)

    f, b = forward_config(H, NQ, NK, D, q.dtype), backward_config(NQ, NK, D, q.dtype)
    pad = lambda n, blk: triton.cdiv(n, blk) * blk  # noqa: E731
    dp = triton.next_power_of_2(D)
    # Forward: S twice (pass 1 and 2), P V once.  Backward: S and dP in both kernels, dV, dK, dQ.
    kflops_f = 2 * B * H * pad(NQ, f["BLOCK_M"]) * pad(NK, f["BLOCK_N"]) * dp * 3
    kflops_b = 2 * B * H * pad(NQ, b["BLOCK_M"]) * pad(NK, b["BLOCK_N"]) * dp * 7
    eflops_f = 2 * B * H * NQ * NK * D * 2
    eflops_b = 2 * B * H * NQ * NK * D * 4
    out = torch.empty(B, H, NQ, D, dtype=torch.float16)
    mask = torch.empty(B, NQ, NK, dtype=torch.float16)
    fmin = minimum_bytes(inputs, [out, mask])
    bmin = minimum_bytes(inputs + [dout, dmask], inputs)
    return dict(name=name, shape=f"B={B}, h={H}, Nq={NQ}, Nk={NK}, d={D}", fwd=fwd, inputs=inputs,
                gouts=[dout, dmask], eager=lambda: ref.atm_attention(q, k, v), fmin=fmin, bmin=bmin,
                kflops=(kflops_f, kflops_b), eflops=(eflops_f, eflops_b))


def _with_grads(run, case):
    def both():
        outs = run()
        torch.autograd.grad(outs, case["inputs"], case["gouts"])
    return both


def _time_us(nbytes, flops):
    return 1e6 * max(nbytes / GPU["bw"], flops / GPU["half"])


def measure(case):
    rows = []
    for phase, idx in (("fwd", 0), ("fwd+bwd", 1)):
        if idx == 0:
            kern = triton_bytes(lambda: case["fwd"]("triton"))
            eager = aten_bytes(case["eager"])
            minimum = case["fmin"]
            kflops, eflops = case["kflops"][0], case["eflops"][0]
        else:
            kern = triton_bytes(_with_grads(lambda: case["fwd"]("triton"), case))
            eager = aten_bytes(_with_grads(case["eager"], case))
            minimum = case["fmin"] + case["bmin"]
            kflops, eflops = sum(case["kflops"]), sum(case["eflops"])
        rows.append(dict(phase=phase, kernel=kern.total, issued=kern.read_issued + kern.written_issued,
                         launches=kern.launches, minimum=minimum, eager=eager,
                         t_kernel=_time_us(kern.total, kflops), t_eager=_time_us(eager, eflops)))
    return rows


def _mb(x):
    return f"{x / 1e6:.2f}"


def table(results) -> str:
    lines = ["| op | shape | phase | kernel MB (launches) | kernel/min | issued MB | minimum MB | eager MB "
             "| eager/kernel | model kernel us | model eager us |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, rows in results:
        for r in rows:
            lines.append(f"| {case['name']} | {case['shape']} | {r['phase']} | {_mb(r['kernel'])} ({r['launches']}) "
                         f"| {r['kernel'] / r['minimum']:.2f} | {_mb(r['issued'])} | {_mb(r['minimum'])} "
                         f"| {_mb(r['eager'])} | {r['eager'] / r['kernel']:.1f}x | {r['t_kernel']:.1f} "
                         f"| {r['t_eager']:.1f} |")
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    body = RESULTS.read_text() if RESULTS.exists() else "# Memory traffic\n\n"
    section = f"{BEGIN}\n{text}{END}"
    if BEGIN in body and END in body:
        head, rest = body.split(BEGIN, 1)
        body = head + section + rest.split(END, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(body)


def main():
    # Count the tiles a GPU runs, not the interpreter's large test tiles.
    from semask_fast.kernels import atm_attention, mask_similarity, semantic_attention

    for module in (atm_attention, mask_similarity, semantic_attention):
        module.INTERPRETER_TILES = False
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage3-batch", type=int, default=1, help="images for SeMask-T stage 3 (issue: 2)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args()
    cases = [semantic_case("semantic_attention (SeMask-T stage 1, windowed)", 128, 49, 150, 96),
             semantic_case("semantic_attention (SeMask-T stage 3, global)", args.stage3_batch, 1024, 150, 384),
             atm_case("atm_attention (SegViT-L)", 2, 16, 150, 1600, 32)]
    results = []
    for case in cases:
        t0 = time.time()
        results.append((case, measure(case)))
        print(f"{case['name']}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    text = ("Measured by `TRITON_INTERPRET=1 python benchmarks/traffic_heads.py` (fp16).  kernel: unique bytes "
            "per launch (DRAM model) counted in Triton's interpreter; issued: every masked-on element of every "
            "load/store; minimum: inputs and output gradients read once, outputs and input gradients written once; "
            "eager: inputs + outputs of every aten op of the reference.  "
            f"**GPU times are a model, not a measurement**: max(bytes / {GPU['bw'] / 1e12:.2f} TB/s, FLOPs / "
            f"{GPU['half'] / 1e12:.0f} TFLOP/s) for {GPU['name']}; kernel FLOPs as issued (padded tiles, "
            "recomputation), eager without launch overheads.  SeMask-T stage 3 is counted at batch "
            f"{args.stage3_batch} (the issue's batch 2 doubles every figure of that row).\n\n" + table(results))
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
