"""Planted bugs, each of which a named test must catch.

    python scripts/mutations.py [--list] [--only NAME ...]

Each mutation replaces one exact snippet of one source file (it must occur exactly once), runs the
named tests, and counts as caught when they fail; the file is restored afterwards whatever
happens.  The tests run from this checkout with its root first on ``sys.path``; the script first
checks that the package, its Triton kernels and its C++/CUDA sources would be imported from this
checkout (an editable install of another checkout maps ``semask_fast.csrc`` to that one's
``csrc/``: then it stops and says so).  C++ mutations rebuild their extension (cached by content,
so restoring costs nothing): the whole list takes about 10 minutes on 2 cores, which is why CI
does not run it; run it after touching a kernel.  Exit status 1 when a mutation survives.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the checkout
    old: str
    new: str
    tests: Sequence[str]  # pytest arguments: files, node ids, -k expressions
    why: str
    #: Runs only where the cpu kernels use the CPU's matrix unit (AMX) for bfloat16: elsewhere the
    #: mutated code never runs, so the mutation is skipped (and said so).
    matrix_unit: bool = False


MUTATIONS: List[Mutation] = [
    # ----------------------------------------------------------------- cpu kernels
    Mutation("cpu window: softmax without the row maximum", "csrc/cpu/window_attention_kernels.h",
             "const Vec<T> e = vexp2_nonpositive(vload(st + size_t(j) * np + i) - m);",
             "const Vec<T> e = vexp(vload(st + size_t(j) * np + i) * kLn2<T>);",
             ["tests/ops/test_window_attention.py", "-k", "peaked and cpu"],
             "logits past 88.7 overflow exp"),
    Mutation("cpu window: mask_value ignored (always -100)", "csrc/cpu/window_attention_kernels.h",
             "a[size_t(j) * n + i] = region[i] != region[j] ? T(p.mask_value) : T(0);",
             "a[size_t(j) * n + i] = region[i] != region[j] ? T(-100) : T(0);",
             ["tests/ops/test_window_attention.py", "-k", "mild and cpu"],
             "-100 and -1e4 both saturate the softmax; -1.5 does not"),
    Mutation("cpu window: rowsum(P dP) not divided by rowsum(P)", "csrc/cpu/window_attention_kernels.h",
             "vstore(delta + i, weighted / total);",
             "vstore(delta + i, weighted);",
             ["tests/ops/test_window_attention.py", "-k", "peaked and cpu"],
             "the recomputed P's lse error times |dP| at logits near 120"),
    Mutation("cpu window: dQ without the scale", "csrc/cpu/window_attention_kernels.h",
             "product<T>(n, dp, n, dpt, 1, np, k.ptr, k.ld, t.ptr, t.ld, false, nullptr, &next, scales);",
             "product<T>(n, dp, n, dpt, 1, np, k.ptr, k.ld, t.ptr, t.ld, false, nullptr, &next, nullptr);",
             ["tests/ops/test_window_attention.py", "-k", "parity and cpu and swin-t and float32"],
             "a gradient-only bug"),
    Mutation("cpu online softmax: running sum not rescaled", "csrc/cpu/sf_cpu.h",
             "vstore(l, vload(l) * al + sum);",
             "vstore(l, vload(l) + sum);",
             ["tests/ops/test_semantic_attention.py", "-k", "peaked and cpu and several"],
             "only the multi-block online loop rescales"),
    Mutation("cpu ATM: mask logits summed over heads, not averaged", "csrc/cpu/atm_attention.cpp",
             "std::min(L, nq - i), inv_heads);",
             "std::min(L, nq - i), T(1));",
             ["tests/ops/test_atm_attention.py", "-k", "parity and cpu and float32"],
             "SegViT's mask logits are the head mean"),
    Mutation("cpu mask similarity: patch norm squared", "csrc/cpu/mask_similarity.cpp",
             "rp[r] = T(1) / std::sqrt(rp[r]);",
             "rp[r] = T(1) / rp[r];",
             ["tests/ops/test_mask_similarity.py", "-k", "cpu and float32"],
             "cosines need unit rows"),
    # ----------------------------------------------------------------- Triton kernels (interpreter)
    Mutation("triton: softmax without the running maximum", "semask_fast/kernels/_common.py",
             "    p = tl.exp(s - m_exp[:, None])",
             "    p = tl.exp(s)",
             ["tests/ops/test_window_attention.py::test_window_peaked_logits",
              "tests/ops/test_shifted_window_attention.py::test_shifted_window_mild_mask_value_and_peaked",
              "tests/ops/test_semantic_attention.py::test_semantic_peaked_logits",
              "tests/ops/test_atm_attention.py::test_atm_peaked_logits"],
             "logits past 88.7 overflow exp"),
    Mutation("triton: running sum not rescaled", "semask_fast/kernels/_common.py",
             "    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)",
             "    return m_new, alpha, p, l_i + tl.sum(p, 1)",
             ["tests/ops/test_window_attention.py::test_window_peaked_logits",
              "tests/ops/test_window_attention.py::test_window_mild_mask_value",
              "tests/ops/test_semantic_attention.py::test_semantic_peaked_logits", "-k", "four-tiles or key-loop"],
             "only multi-tile paths rescale"),
    Mutation("triton: a tile of -inf logits not guarded", "semask_fast/kernels/_common.py",
             '    m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)',
             "    m_exp = m_new",
             ["tests/ops/test_window_attention.py::test_infinite_shift_mask_value"],
             "only mask_value=-inf makes a whole key tile -inf"),
    Mutation("triton window: mask_value ignored (always -100)", "semask_fast/kernels/window_attention.py",
             "        s += tl.where(ri[:, None] == rj[None, :], 0.0, mask_value)",
             "        s += tl.where(ri[:, None] == rj[None, :], 0.0, -100.0)",
             ["tests/ops/test_window_attention.py::test_window_mild_mask_value",
              "tests/ops/test_shifted_window_attention.py::test_shifted_window_mild_mask_value_and_peaked"],
             "-100 and -1e4 both saturate the softmax; -1.5 does not"),
    Mutation("triton window: backward-only dropout scale missing on dP", "semask_fast/kernels/window_attention.py",
             "        dp = dropped(dp, keep, dropout_p)",
             "        dp = tl.where(keep, dp, 0.0)",
             ["tests/ops/test_window_attention.py::test_window_dropout_replay"],
             "forward-only checks cannot see it"),
    # ----------------------------------------------------------------- CUDA sources (SIMT harness)
    Mutation("cuda window: mask_value ignored (always -100)", "csrc/include/sf_window_attention_fwd.cuh",
             "  if (p.shifted) x += ri.region == rj.region ? 0.f : p.mask_value;",
             "  if (p.shifted) x += ri.region == rj.region ? 0.f : -100.f;",
             ["tests/ops/test_window_attention.py", "-k", "mild and simt and float32"],
             "-100 and -1e4 both saturate the softmax; -1.5 does not"),
    Mutation("cuda ATM: row statistics written before every lane has read them", "csrc/include/sf_atm_attention_fwd.cuh",
             """        // memory access, the __syncwarp does).
        __syncwarp();
        if (lane == 0) {""",
             """        // memory access, the __syncwarp does).
        if (lane == 0) {""",
             ["tests/harness/test_race.py", "-k", "atm"],
             "ordered only by shuffles: the race detector, not a parity test, sees it"),
    Mutation("cuda engine: FFMA softmax without the running maximum", "csrc/include/sf_attention.cuh",
             "  prob = x == kNegInf ? 0.f : __expf(x - m_new);",
             "  prob = x == kNegInf ? 0.f : __expf(x);",
             ["tests/ops/test_window_attention.py", "tests/ops/test_semantic_attention.py", "-k",
              "peaked and simt and float32"],
             "logits past 88.7 overflow exp; fp32 runs the FFMA forward of window and semantic attention"),
    Mutation("cuda engine: tensor-core softmax without the running maximum", "csrc/include/sf_attention.cuh",
             "        const float prob = s[st][e] == kNegInf ? 0.f : __expf(s[st][e] - m_new[h2]);",
             "        const float prob = s[st][e] == kNegInf ? 0.f : __expf(s[st][e]);",
             ["tests/ops/test_window_attention.py", "tests/ops/test_semantic_attention.py", "-k",
              "peaked and simt and (float16 or bfloat16)"],
             "logits past 88.7 overflow exp; fp16 / bf16 run the tensor-core forward of window and semantic attention"),
    Mutation("cuda engine: backward-only dropout scale missing on dP", "csrc/include/sf_attention.cuh",
             "  return {prob * f, prob * (dp * f - delta)};",
             "  return {prob * f, prob * (dp * (f != 0.f) - delta)};",
             ["tests/ops/test_window_attention.py", "tests/ops/test_atm_attention.py", "-k",
              "simt_window_dropout_replay or simt_atm_dropout_replay or atm_dropout_replay_splits"],
             "forward-only checks cannot see it; the replayed keep-mask gives the reference the same dropout"),
    Mutation("cuda window: fused backward reads P and dS before every warp has staged them",
             "csrc/include/sf_window_attention_bwd.cuh",
             "    __syncthreads();  // P and dS of every row are staged\n",
             "",
             ["tests/harness/test_race.py", "-k", "window"],
             "warps issuing the same operations hide the race from a parity test; the race detector sees it"),
    Mutation("cuda ATM: two key ranges not combined", "csrc/ops/atm_attention.cu",
             "  if (p.splits > 1) {",
             "  if (p.splits > 2) {",
             ["tests/ops/test_atm_attention.py", "-m", "harness", "-k", "split"],
             "the split forward writes partials; only the combine kernel writes out and lse"),
    # ------------------------------------------------- cpu kernels on the matrix unit (AMX)
    Mutation("cpu matrix unit: VNNI pairs of rows interleaved in the wrong order", "csrc/cpu/sf_cpu_matrix.h",
             "_mm512_storeu_si512(out + 2 * c, _mm512_permutex2var_epi16(a, lo, b));",
             "_mm512_storeu_si512(out + 2 * c, _mm512_permutex2var_epi16(b, lo, a));",
             ["tests/ops/test_mask_similarity.py", "-k", "cpu_reduced and bfloat16 and matrix-unit"],
             "every packed B operand with two real rows per pair goes through it", matrix_unit=True),
    Mutation("cpu semantic, matrix unit: dSq^T not accumulated over key blocks", "csrc/cpu/semantic_attention.cpp",
             "product(k, n, m, a_op, even(m), b_op, dsq_t, ln, j0 > 0);",
             "product(k, n, m, a_op, even(m), b_op, dsq_t, ln, false);",
             ["tests/ops/test_semantic_attention.py", "-k", "cpu_reduced and bfloat16 and matrix-unit"],
             "N = 131 and 300 have several key blocks of 64", matrix_unit=True),
    Mutation("cpu semantic, matrix unit: logits rows without the padded stride", "csrc/cpu/semantic_attention.cpp",
             "const int64_t lk = tile_ld(n), lc = tile_ld(c), lp = even(n);",
             "const int64_t lk = sf::cpu::round_up(n, 32), lc = tile_ld(c), lp = even(n);",
             ["tests/ops/test_semantic_attention.py", "-k", "cpu_reduced and bfloat16 and matrix-unit"],
             "N = 512 pads the tiles' row stride to 528 columns", matrix_unit=True),
    Mutation("cpu ATM, matrix unit: the mask logits' gradient dropped", "csrc/cpu/atm_attention.cpp",
             "vstore(dr + j, sc * (vload(pr + j) * (vload(dr + j) - delta) + vload(dm + j) * mean));",
             "vstore(dr + j, sc * (vload(pr + j) * (vload(dr + j) - delta)));",
             ["tests/ops/test_atm_attention.py", "-k", "cpu_reduced and bfloat16 and matrix-unit"],
             "dM / h enters dS", matrix_unit=True),
    Mutation("cpu mask similarity, matrix unit: dC not accumulated over row blocks", "csrc/cpu/mask_similarity.cpp",
             "product(K, D, rows, g_s, even(rows), p_rows, dct, ld, blk > 0);",
             "product(K, D, rows, g_s, even(rows), p_rows, dct, ld, false);",
             ["tests/ops/test_mask_similarity.py", "-k", "cpu_reduced and bfloat16 and matrix-unit"],
             "Np = 129 has three row blocks of 64", matrix_unit=True),
    # ----------------------------------------------------------------- Python layer
    Mutation("validation: a shift equal to the window accepted", "semask_fast/ops/_common.py",
             "if any(s >= w for s, w in zip(shift, ws)):",
             "if any(s > w for s, w in zip(shift, ws)):",
             ["tests/test_validation.py"],
             "shift must be smaller than the window"),
    Mutation("reference: shift mask region rule off by one", "semask_fast/reference.py",
             "ry = _axis_regions(nwh * wh, wh, shift_size[0], device)",
             "ry = _axis_regions(nwh * wh, wh, max(shift_size[0] - 1, 0), device)",
             ["tests/reference/test_reference.py"],
             "the reference is checked against the official code's transcription"),
]


def _imports_from_this_checkout() -> str:
    """'' when the package, its kernels and csrc resolve inside ROOT, else what resolves elsewhere."""
    code = ("import importlib.util, semask_fast, semask_fast.kernels, semask_fast._build as b; "
            "print(semask_fast.__file__); print(semask_fast.kernels.__file__); print(b.csrc_dir())")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        return out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "import failed"
    elsewhere = [p for p in out.stdout.split() if not Path(p).resolve().is_relative_to(ROOT)]
    return ", ".join(elsewhere)


def _matrix_unit_here() -> bool:
    """Whether this checkout's cpu kernels run bfloat16 on the matrix unit on this machine."""
    code = "import torch; from semask_fast.backends.cpu import matrix_unit_dtypes as d; print(torch.bfloat16 in d())"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    return out.stdout.strip().endswith("True")


def run_one(m: Mutation) -> bool:
    """True when the tests fail with the mutation in place (caught)."""
    path = ROOT / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        raise SystemExit(f"{m.name}: the snippet occurs {original.count(m.old)} times in {m.file} (expected once); "
                         "update the mutation list")
    try:
        path.write_text(original.replace(m.old, m.new))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
                                cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        path.write_text(original)
    if result.returncode == 5:
        raise SystemExit(f"{m.name}: the tests {' '.join(m.tests)} selected nothing")
    if result.returncode not in (0, 1):  # 2-4: collection error, interruption, usage: not a verdict
        raise SystemExit(f"{m.name}: pytest could not run the tests (exit {result.returncode}):\n"
                         + "\n".join((result.stdout + result.stderr).splitlines()[-15:]))
    return result.returncode == 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the mutations and the tests meant to catch them")
    parser.add_argument("--only", action="append", help="run only mutations whose name contains this (repeatable)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(o in m.name for o in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name}\n    {m.file}; caught by: pytest {' '.join(m.tests)}\n    ({m.why})")
        return 0
    elsewhere = _imports_from_this_checkout()
    if elsewhere:
        print(f"these would be imported from outside {ROOT}: {elsewhere}; reinstall this checkout "
              "(pip install -e .) before mutating it")
        return 2
    survived, skipped = [], []
    unit = _matrix_unit_here()
    for m in chosen:
        if m.matrix_unit and not unit:
            print(f"skipped  {m.name} (no matrix unit for bfloat16 here: the mutated code does not run)")
            skipped.append(m.name)
            continue
        start = time.time()
        caught = run_one(m)
        print(f"{'caught  ' if caught else 'SURVIVED'} {m.name} ({time.time() - start:.0f} s)", flush=True)
        if not caught:
            survived.append(m.name)
    ran = len(chosen) - len(skipped)
    print(f"{ran - len(survived)} of {ran} planted bugs caught" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
