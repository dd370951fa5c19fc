"""Memory traffic of the semantic-attention and ATM kernels vs. the minimum and eager PyTorch, and a GPU time model.

Shapes (issue 4), fp16 (what a GPU trains in):

* SeMask-T stage 1, windowed: B=2 images of 56x56 -> 128 windows of 7x7 (N=49), K=150, C=96;
* SeMask-T stage 3, global: N=1024 tokens (32x32), K=150, C=384, B=2;
* SegViT-L ATM: B=2, dim 512, h=16 (d=32), Nq=150 class tokens, Nk=1600 (40x40).

For each, forward and forward+backward:

* kernel: bytes the Triton kernels read + write, each address once per launch (the DRAM
  model).  Derived from the launches (``semantic_model``, ``atm_model``: every kernel reads each
  tensor it touches once and writes each output once), and first checked to equal the count of
  Triton's interpreter (``semask_fast._traffic.triton_bytes``, with the GPU tiles) on small shapes;
  the script fails if they differ.  The interpreter is too slow (and its address logs too big)
  at the full shapes on this 2-core machine.  "issued" (every masked-on element of every
  load/store, what reaches L2) is reported for the checked shapes;
* minimum: forward reads the inputs and writes the outputs once; backward reads the inputs
  and the output gradients and writes the input gradients once (saved statistics excluded);
* eager: the reference composition, summing the inputs and outputs of every aten op it runs
  (``semask_fast._traffic.aten_bytes``).

GPU times are a MODEL, not a measurement (no GPU here): max(bytes / HBM bandwidth, FLOPs /
peak) with H100-SXM5 datasheet figures (3.35 TB/s, 989 TFLOP/s dense fp16).  Kernel FLOPs
count the tiles the kernels issue (padding and recomputation included); eager FLOPs count the
matmuls PyTorch runs.  The eager time model ignores launch overheads (it flatters eager).

    TRITON_INTERPRET=1 python benchmarks/traffic_heads.py          # a few minutes on 2 cores

Writes the tables into ``benchmarks/results/traffic.md`` between ``<!-- heads:begin -->`` and
``<!-- heads:end -->`` (other sections of that file are left as they are).
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
import triton  # noqa: E402

import semask_fast  # noqa: E402
from semask_fast import reference as ref  # noqa: E402
from benchmarks.traffic import aten_bytes, gpu_tiles, minimum_bytes, triton_bytes, write_section  # noqa: E402

GPU = dict(name="H100-SXM5", bw=3.35e12, half=989e12)


def _randn(*shape, scale=1.0, gen):
    return (torch.randn(*shape, generator=gen) * scale).to(torch.float16).requires_grad_()


# --------------------------------------------------------------------------- #
# The kernels' traffic derived from their launches (checked against the interpreter count)
# --------------------------------------------------------------------------- #
def semantic_model(B, N, K, C, elt):
    """(fwd, fwd+bwd) unique bytes: fwd reads sq, sk, yv, writes out and the fp32 lse; backward:
    the query-major kernel reads sq, sk, yv, out, dout, lse and writes D = rowsum(dout * out) (fp32)
    and dSq; the key-major kernel reads sq, sk, yv, dout, lse, D and writes dSk, dYv."""
    s, v, r = B * N * K * elt, B * N * C * elt, B * N * 4
    fwd = 2 * s + v + v + r
    bwd = (2 * s + 3 * v + r) + (r + s) + (2 * s + 2 * v + 2 * r) + (s + v)
    return fwd, fwd + bwd


def atm_model(B, H, NQ, NK, D, elt):
    """(fwd, fwd+bwd): fwd reads q, k, v, writes out, the mask logits and the fp32 lse; backward:
    row_dot reads dout, out, writes delta; the key-major and query-major kernels each read q, k,
    v, dout, d(mask logits), lse, delta; they write dk, dv and dq."""
    q, kv, m, r = B * H * NQ * D * elt, B * H * NK * D * elt, B * NQ * NK * elt, B * H * NQ * 4
    fwd = q + 2 * kv + q + m + r
    bwd = (2 * q + r) + 2 * (q + 2 * kv + q + m + 2 * r) + 2 * kv + q
    return fwd, fwd + bwd


# --------------------------------------------------------------------------- #
# Cases
# --------------------------------------------------------------------------- #
def semantic_case(name, B, N, K, C):
    from semask_fast.kernels.semantic_attention import backward_plan, forward_plan

    g = torch.Generator().manual_seed(0)
    sq, sk = _randn(B, N, K, scale=0.25, gen=g), _randn(B, N, K, scale=0.25, gen=g)
    yv = _randn(B, N, C, gen=g)
    dout = torch.randn(B, N, C, generator=g).half()
    inputs = [sq, sk, yv]

    def fwd(backend):
        return (semask_fast.semantic_attention(sq, sk, yv, backend=backend),)

    # Issued FLOPs of the kernels (padded tiles and recomputation included).  Forward: S per C tile, P Yv.
    f = forward_plan(B, N, K, C, sq.dtype, interpreter=False)
    bwd = backward_plan(B, N, K, C, sq.dtype, interpreter=False)
    pad = lambda n, blk: triton.cdiv(n, blk) * blk  # noqa: E731
    nm, nn, kk, cc = pad(N, f["BLOCK_M"]), pad(N, f["BLOCK_N"]), pad(K, f["BLOCK_K"]), pad(C, f["BLOCK_C"])
    kflops_f = 2 * B * nm * nn * (kk * (cc // f["BLOCK_C"]) + cc)
    # Query-major: S, dP = dO Yv^T, dSq.  Key-major: S and dYv per C tile, dP once (all of C), dSk.
    # K is held as two register pieces of BLOCK_KA + BLOCK_KB columns.
    q, kv = bwd["q"], bwd["kv"]
    kp = q["BLOCK_KA"] + q["BLOCK_KB"]
    kflops_q = 2 * B * pad(N, q["BLOCK_M"]) * pad(N, q["BLOCK_N"]) * (2 * kp + pad(C, q["BLOCK_C"]))
    ctiles = triton.cdiv(C, kv["BLOCK_C"])
    dp_c = kv["BLOCK_C"] if kv["SINGLE_C"] else pad(C, kv["BLOCK_CD"])
    kflops_kv = 2 * B * pad(N, kv["BLOCK_M"]) * pad(N, kv["BLOCK_N"]) * ((kp + kv["BLOCK_C"]) * ctiles + dp_c + kp)
    kflops_b = kflops_q + kflops_kv
    eflops_f = 2 * B * N * N * (K + C)
    eflops_b = 2 * B * N * N * (2 * K + 2 * C)
    out = torch.empty(B, N, C, dtype=torch.float16)
    fmin = minimum_bytes(inputs, [out])
    bmin = minimum_bytes(inputs + [dout], inputs)
    return dict(name=name, shape=f"B_={B}, N={N}, K={K}, C={C}", fwd=fwd, inputs=inputs, gouts=[dout],
                model=semantic_model(B, N, K, C, 2),
                eager=lambda: (ref.semantic_attention(sq, sk, yv),), fmin=fmin, bmin=bmin,
                kflops=(kflops_f, kflops_b), eflops=(eflops_f, eflops_b))


def atm_case(name, B, H, NQ, NK, D):
    from semask_fast.kernels.atm_attention import backward_plan, forward_plan

    g = torch.Generator().manual_seed(0)
    q, k, v = _randn(B, H, NQ, D, gen=g), _randn(B, H, NK, D, gen=g), _randn(B, H, NK, D, gen=g)
    dout = torch.randn(B, H, NQ, D, generator=g).half()
    dmask = torch.randn(B, NQ, NK, generator=g).half()
    inputs = [q, k, v]

    def fwd(backend):
        return semask_fast.atm_attention(q, k, v, backend=backend)

    f = forward_plan(H, NQ, NK, D, q.dtype, interpreter=False)
    b = backward_plan(H, NQ, NK, D, q.dtype, interpreter=False)["q"]
    pad = lambda n, blk: triton.cdiv(n, blk) * blk  # noqa: E731
    dp = triton.next_power_of_2(D)
    # Forward: S twice (pass 1 and 2), P V once.  Backward (heads padded to whole groups): S and dP in
    # both kernels, dV, dK, dQ.
    kflops_f = 2 * B * H * pad(NQ, f["BLOCK_M"]) * pad(NK, f["BLOCK_N"]) * dp * 3
    kflops_b = 2 * B * pad(H, b["BLOCK_G"]) * pad(NQ, b["BLOCK_M"]) * pad(NK, b["BLOCK_N"]) * dp * 7
    eflops_f = 2 * B * H * NQ * NK * D * 2
    eflops_b = 2 * B * H * NQ * NK * D * 4
    out = torch.empty(B, H, NQ, D, dtype=torch.float16)
    mask = torch.empty(B, NQ, NK, dtype=torch.float16)
    fmin = minimum_bytes(inputs, [out, mask])
    bmin = minimum_bytes(inputs + [dout, dmask], inputs)
    return dict(name=name, shape=f"B={B}, h={H}, Nq={NQ}, Nk={NK}, d={D}", fwd=fwd, inputs=inputs,
                model=atm_model(B, H, NQ, NK, D, 2), bwd_issued=atm_issued_now(B, H, NQ, NK, D),
                gouts=[dout, dmask], eager=lambda: ref.atm_attention(q, k, v), fmin=fmin, bmin=bmin,
                kflops=(kflops_f, kflops_b), eflops=(eflops_f, eflops_b))


def _with_grads(run, case):
    def both():
        outs = run()
        torch.autograd.grad(outs, case["inputs"], case["gouts"])
    return both


def _time_us(nbytes, flops):
    return 1e6 * max(nbytes / GPU["bw"], flops / GPU["half"])


def check(case) -> list:
    """Interpreter counts on a small shape; fails unless they equal the model."""
    rows = []
    fwd = triton_bytes(lambda: case["fwd"]("triton"))
    both = triton_bytes(_with_grads(lambda: case["fwd"]("triton"), case))
    for phase, counted, model in (("fwd", fwd, case["model"][0]), ("fwd+bwd", both, case["model"][1])):
        if counted.total != model:
            raise SystemExit(f"{case['name']} {case['shape']} {phase}: interpreter counted {counted.total} bytes, "
                             f"model says {model}")
        rows.append(f"| {case['name']} | {case['shape']} | {phase} | {counted.total} | {model} "
                    f"| {counted.read_issued + counted.written_issued} | {counted.launches} |")
    if case.get("bwd_issued") is not None:
        issued = both.read_issued + both.written_issued - fwd.read_issued - fwd.written_issued
        if issued != case["bwd_issued"]:
            raise SystemExit(f"{case['name']} {case['shape']} backward: interpreter issued {issued} bytes, "
                             f"model says {case['bwd_issued']}")
    return rows


def measure(case):
    rows = []
    for phase, idx in (("fwd", 0), ("fwd+bwd", 1)):
        if idx == 0:
            eager = aten_bytes(case["eager"])
            minimum = case["fmin"]
            kflops, eflops = case["kflops"][0], case["eflops"][0]
        else:
            eager = aten_bytes(_with_grads(case["eager"], case))
            minimum = case["fmin"] + case["bmin"]
            kflops, eflops = sum(case["kflops"]), sum(case["eflops"])
        kernel = case["model"][idx]
        rows.append(dict(phase=phase, kernel=kernel, minimum=minimum, eager=eager,
                         t_kernel=_time_us(kernel, kflops), t_eager=_time_us(eager, eflops)))
    return rows


def _mb(x):
    return f"{x / 1e6:.2f}"


def table(results) -> str:
    lines = ["| op | shape | phase | kernel MB | kernel/min | minimum MB | eager MB "
             "| eager/kernel | model kernel us | model eager us |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case, rows in results:
        for r in rows:
            lines.append(f"| {case['name']} | {case['shape']} | {r['phase']} | {_mb(r['kernel'])} "
                         f"| {r['kernel'] / r['minimum']:.2f} | {_mb(r['minimum'])} "
                         f"| {_mb(r['eager'])} | {r['eager'] / r['kernel']:.1f}x | {r['t_kernel']:.1f} "
                         f"| {r['t_eager']:.1f} |")
    return "\n".join(lines) + "\n"


def atm_bwd_issued(B, H, NQ, NK, D, elt, kv_rows, q_rows, kv_group, q_group):
    """Issued bytes (every masked-on element of every load/store) of the ATM backward: row_dot, then
    the key-major kernel (kv_rows keys and kv_group heads per program: k, v, dk, dv once; q, dO, lse,
    D once per key block; d(mask logits) once per head group) and the query-major one (q_rows
    queries: q, dO, dq, lse, D once; k, v once per query block; d(mask logits) once per group)."""
    qb, kb, rows, dm = B * H * NQ * D * elt, B * H * NK * D * elt, B * H * NQ * 4, B * NQ * NK * elt
    row_dot = 2 * qb + rows
    kv = 4 * kb + triton.cdiv(NK, kv_rows) * (2 * qb + 2 * rows) + triton.cdiv(H, kv_group) * dm
    q = 3 * qb + 2 * rows + triton.cdiv(NQ, q_rows) * 2 * kb + triton.cdiv(H, q_group) * dm
    return row_dot + kv + q


def atm_issued_now(B, H, NQ, NK, D, elt=2):
    from semask_fast.kernels.atm_attention import backward_plan

    c = backward_plan(H, NQ, NK, D, torch.float16 if elt == 2 else torch.float32, interpreter=False)
    return atm_bwd_issued(B, H, NQ, NK, D, elt, c["kv"]["BLOCK_N"], c["q"]["BLOCK_M"], c["kv"]["BLOCK_G"],
                          c["q"]["BLOCK_G"])


def dm_reads(B, H, NQ, NK, D) -> str:
    """d(mask logits) reads and all issued bytes of the ATM backward, heads grouped per program vs the
    earlier kernels (one head per program, 64 x 64 tiles in fp16 at d = 32)."""
    from semask_fast.kernels.atm_attention import backward_plan

    group = backward_plan(H, NQ, NK, D, torch.float16, interpreter=False)["q"]["BLOCK_G"]
    dm = B * NQ * NK * 2
    before = atm_bwd_issued(B, H, NQ, NK, D, 2, 64, 64, 1, 1)
    return (f"\nATM backward (SegViT-L, fp16), issued reads of d(mask logits): {group} heads per program, "
            f"2 x {triton.cdiv(H, group)} x {_mb(dm)} MB = {_mb(2 * triton.cdiv(H, group) * dm)} MB "
            f"(one head per program: 2 x {H} x {_mb(dm)} MB = {_mb(2 * H * dm)} MB).  All issued bytes of the "
            f"backward (model checked against the interpreter above): {_mb(atm_issued_now(B, H, NQ, NK, D))} MB "
            f"(one head per program with 64 x 64 tiles: {_mb(before)} MB).\n")


def main():
    gpu_tiles()  # count the tiles a GPU runs, not the interpreter's large test tiles
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args()
    checks = ["| check | shape | phase | counted (bytes) | model (bytes) | issued (bytes) | launches |",
              "|---|---|---|---|---|---|---|"]
    for case in (semantic_case("semantic_attention", 3, 49, 150, 40),
                 semantic_case("semantic_attention", 1, 70, 19, 70), atm_case("atm_attention", 2, 3, 40, 70, 32),
                 atm_case("atm_attention", 1, 8, 40, 70, 32)):
        checks += check(case)
    cases = [semantic_case("semantic_attention (SeMask-T stage 1, windowed)", 128, 49, 150, 96),
             semantic_case("semantic_attention (SeMask-T stage 3, global)", 2, 1024, 150, 384),
             atm_case("atm_attention (SegViT-L)", 2, 16, 150, 1600, 32)]
    results = [(case, measure(case)) for case in cases]
    text = ("Produced by `TRITON_INTERPRET=1 python benchmarks/traffic_heads.py` (fp16).  kernel: unique bytes "
            "per launch (DRAM model) from the launch model, which the interpreter count matches exactly on the "
            "checked shapes below; minimum: inputs and output gradients read once, outputs and input gradients "
            "written once; eager: inputs + outputs of every aten op of the reference.  "
            f"**GPU times are a model, not a measurement**: max(bytes / {GPU['bw'] / 1e12:.2f} TB/s, FLOPs / "
            f"{GPU['half'] / 1e12:.0f} TFLOP/s) for {GPU['name']}; kernel FLOPs as issued (padded tiles, "
            "recomputation), eager without launch overheads.\n\n" + table(results)
            + dm_reads(2, 16, 150, 1600, 32)
            + "\nInterpreter checks (GPU tiles; issued = every masked-on element of every load/store):\n\n"
            + "\n".join(checks) + "\n")
    print(text)
    if not args.no_write:
        write_section("heads", text)


if __name__ == "__main__":
    main()
