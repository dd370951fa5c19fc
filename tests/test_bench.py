"""The benchmark measures what it says: every peer computes what our op computes (outputs and the
gradients it claims), the flop counts are the products' flops, the memory measure sees a known
temporary, SDPA takes the kernel the table says, and the CLI names the machine and writes its table."""

import os
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from semask_fast import _bench, _bench_e2e, _bench_report
from semask_fast.__main__ import main
from semask_fast.testing import TOLERANCES, assert_close
from tests.conftest import onednn

# The paper cases' geometry, tiny: a padded shifted grid (16 tokens -> 3x3 windows of 7), one
# unshifted window, a 12-wide window, semantic attention with K > C (Yv padded for SDPA) and
# K < C (Sq, Sk padded), ATM, Segmenter.
TINY = [
    _bench.window_case("window-padded", "padded shifted", 2, 16, 2, head_dim=4),
    _bench.window_case("window-single", "one window", 2, 7, 3, head_dim=8),
    _bench.window_case("window-12", "ws 12", 1, 24, 2, window=12, head_dim=4),
    _bench.semantic_case("semantic-k-wide", "K > C", 3, 9, 6, 4),
    _bench.semantic_case("semantic-c-wide", "K < C", 2, 17, 5, 7),
    _bench.atm_case("atm", "ATM", 2, 3, 5, 11, 4),
    _bench.mask_similarity_case("mask", "Segmenter", 2, 6, 5, 8),
]


def _run(fn, inputs, mode, grads=None):
    """Outputs (and in fwd+bwd the gradients) of ``fn`` on copies of ``inputs``."""
    step = _bench.Step(fn, inputs, mode, grads)
    outs = step()
    return [o.detach() for o in outs], {n: t.grad for n, t in step.inputs.items() if t.grad is not None}


@pytest.mark.parametrize("case", TINY, ids=[c.key for c in TINY])
def test_peers_compute_what_the_op_computes(case):
    inputs = case.make(torch.float64, torch.Generator().manual_seed(0))
    want_out, want_grads = _run(lambda **t: case.call("reference", **t), inputs, "fwd+bwd")
    assert set(want_grads) == set(inputs)
    for peer in case.peers:
        # The uncompiled form: torch.compile does not change the math, and FlexAttention's
        # score_mod is checked by flex_attention's own eager path.
        mode = "fwd+bwd" if peer.backward else "fwd"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex_attention warns when it runs uncompiled
            got_out, got_grads = _run(peer.fn, inputs, mode, peer.grads)
        assert len(got_out) == len(want_out), peer.name
        for g, w in zip(got_out, want_out):
            assert_close(g, w, torch.float64, what=peer.name)
        assert set(got_grads) == (set(peer.grads or inputs) if peer.backward else set()), peer.name
        for name, g in got_grads.items():
            assert_close(g, want_grads[name], torch.float64, backward=True, what=f"{peer.name} d{name}")


def test_every_attention_case_has_the_four_peers():
    for case in _bench.bench_cases("small"):
        names = {p.name for p in case.peers}
        assert {"eager", "torch.compile(eager)"} <= names
        if case.op != "mask_similarity":
            assert {"SDPA", "FlexAttention (compiled)"} <= names
            flex = next(p for p in case.peers if p.name.startswith("Flex"))
            assert not flex.backward and "no CPU backward" in flex.note


def test_paper_cases_cover_the_papers():
    keys = [c.key for c in _bench.bench_cases("paper")]
    assert keys == [f"swin-t-{r}-s{s}" for r in (224, 512) for s in (1, 2, 3, 4)] + [
        "swin-b-384-s1", "semask-t-s1-windowed", "semask-t-s3-global", "segvit-l-atm", "segmenter-b-mask"]
    by_key = {c.key: c for c in _bench.bench_cases("paper")}
    # 512^2: 128x128 stage-1 tokens padded to 133 = 19x19 windows per image, B=8.
    assert "2888 windows x 3 heads" in by_key["swin-t-512-s1"].name
    assert "512 windows x 4 heads, N=144" in by_key["swin-b-384-s1"].name
    assert "no shift" in by_key["swin-t-224-s4"].name


@pytest.mark.parametrize("case", TINY, ids=[c.key for c in TINY])
def test_flop_count_matches_a_direct_count(case):
    """The analytic count is exactly the matrix-product flops torch counts on the op's eager math
    (the reference backend runs inside our custom op, opaque to the counter), forward and
    forward+backward."""
    inputs = case.make(torch.float64, torch.Generator().manual_seed(0))
    eager = next(p for p in case.peers if p.name == "eager")
    for mode in _bench.MODES:
        step = _bench.Step(eager.fn, inputs, mode, eager.grads)
        with FlopCounterMode(display=False) as counter:
            step()
        assert counter.get_total_flops() == _bench.step_flops(case.flops, mode), mode


def test_working_memory_sees_a_temporary():
    n = 1 << 20
    step = _bench.Step(lambda x: (x * 2).sum(dim=0), {"x": torch.ones(n, 4)}, "fwd")
    nbytes, _ = _bench.working_memory(step)
    assert n * 4 * 4 <= nbytes < 2 * n * 4 * 4  # the (n, 4) fp32 temporary, not the (4,) output


_FAULTS_OF_A_REUSED_BLOCK = """
import ctypes, resource, sys
from semask_fast import _bench
if sys.argv[1] == "recycle":
    assert "32 MiB" in _bench.recycle_allocations()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def faults(nbytes=16 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(nbytes)
    libc.memset(block, 1, nbytes)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""


def test_the_bench_recycles_large_temporaries_for_every_contender():
    """In a fresh process, glibc maps a second 16 MiB block afresh after freeing the first (its
    threshold follows what was freed before, so the peers' timings depended on what the process
    had run before); after recycle_allocations the freed block is reused: (almost) no page faults."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the C library is not glibc")

    def second_block_faults(mode):
        run = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REUSED_BLOCK, mode], capture_output=True, text=True,
                             check=True)
        return int(run.stdout.split()[-1])

    assert second_block_faults("default") > 2000  # 4096 pages of 4 KiB
    assert second_block_faults("recycle") < 200


def test_sdpa_runs_flash_unless_the_table_needs_a_gradient():
    """The claim behind the SDPA rows: the 4-D form takes the flash kernel; with the bias table
    requiring grad PyTorch falls back to the math kernel."""
    case = TINY[0]
    inputs = case.make(torch.float32, torch.Generator().manual_seed(0))
    sdpa = next(p for p in case.peers if p.name == "SDPA")
    assert _bench.working_memory(_bench.Step(sdpa.fn, inputs, "fwd"))[1] == ["flash"]
    assert _bench.working_memory(_bench.Step(sdpa.fn, inputs, "fwd+bwd"))[1] == ["math"]
    frozen = _bench.Step(sdpa.fn, inputs, "fwd+bwd", grads=("q", "k", "v"))
    assert _bench.working_memory(frozen)[1] == ["flash", "flash bwd"]


@pytest.fixture
def fast_bench(monkeypatch):
    """Tiny cases, no compilation, one call per timing."""
    monkeypatch.setattr(_bench, "bench_cases", lambda scale: TINY[:1] + TINY[-1:])
    monkeypatch.setattr(_bench, "quick_case", lambda: TINY[0])
    monkeypatch.setattr(_bench, "compile_peer", lambda fn: fn)
    monkeypatch.setattr(_bench, "time_step", lambda step, **kw: (step(), (1e-3, 3))[1])
    monkeypatch.setattr(_bench, "sgemm_rate", lambda *a, **kw: 100.0)


@pytest.mark.filterwarnings("ignore")  # flex_attention warns when it runs uncompiled
def test_bench_cli_names_the_machine_and_writes_the_table(fast_bench, tmp_path, capsys, monkeypatch):
    csv_path = tmp_path / "rows.csv"
    assert main(["bench", "--scale", "small", "--out", str(tmp_path), "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    model = _bench_report.cpu_model()
    assert model in out.splitlines()[0] and "threads" in out.splitlines()[0]
    md = (tmp_path / "bench_cpu.md").read_text()
    assert f"Machine: {model}" in md and "sgemm rate: 100 GFLOP/s" in md and "Allocator: " in md
    for name in ("eager", "SDPA", "FlexAttention (compiled)", "torch.compile(eager)"):
        assert f"| window-padded | fwd | {name} |" in md
    assert "| window-padded | fwd+bwd | SDPA, table frozen |" in md
    assert "| window-padded | fwd | SDPA, table frozen |" not in md
    assert "| mask | fwd+bwd | torch.compile(eager) | 1.00 | 1.00x |" in md
    # GFLOP/s and % sgemm from the analytic count, against the measured (here: patched) rate.
    gflops = _bench.step_flops(TINY[-1].flops, "fwd") / 1e-3 / 1e9
    assert f"| mask | fwd | eager | 1.00 | 1.00x | {gflops:.1f} | {gflops:.0f}% |" in md
    assert "no CPU backward" in md
    assert (tmp_path / "bench_cpu.png").stat().st_size > 0
    first = csv_path.read_text().splitlines()
    assert first[0].startswith("when,") and len(first) == 1 + md.count("| window-padded |") + md.count("| mask |")
    monkeypatch.setattr(_bench, "working_memory", lambda step: (0, []))  # measured above; keep the rerun quick
    assert main(["bench", "--scale", "small", "--out", "", "--csv", str(csv_path)]) == 0
    assert len(csv_path.read_text().splitlines()) == 2 * len(first) - 1  # appended, one header


@pytest.mark.filterwarnings("ignore")
def test_bench_writes_its_results_into_the_readme(fast_bench, tmp_path, monkeypatch):
    monkeypatch.setattr(_bench, "working_memory", lambda step: (0, []))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{_bench_report.README_BEGIN}\nstale table\n{_bench_report.README_END}\noutro\n")
    assert main(["bench", "--scale", "small", "--case", "mask", "--out", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale table" not in text
    assert f"Machine: {_bench_report.cpu_model()}" in text and "| case | fwd: fastest peer (ms) |" in text
    assert text.count(_bench_report.README_BEGIN) == 1 and "(bench_cpu.png)" in text
    assert not _bench_report.update_readme(str(tmp_path / "missing.md"), "x")


@pytest.mark.filterwarnings("ignore")
def test_bench_quick_prints_speedup_against_the_best_peer(fast_bench, capsys):
    assert main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    assert _bench_report.cpu_model() in out.splitlines()[0]
    rows = [line for line in out.splitlines() if line.startswith("| fwd")]
    assert [r.split("|")[1].strip() for r in rows] == ["fwd", "fwd+bwd"]
    if _bench.our_backends("window_attention"):
        assert all("1.00x" in r for r in rows)  # every contender timed at 1 ms by the patched timer


def test_info_names_the_tools_and_the_cpu_target(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "simt" in out and "correctness tools" in out and "never chosen automatically" in out.lower()
    assert "-march=native" in out or "SEMASK_FAST_CPU_ISA=portable" in out
    assert f"SEMASK_FAST_CPU_ISA={os.environ.get('SEMASK_FAST_CPU_ISA', 'native')}" in out


def test_info_says_which_dtypes_run_on_the_matrix_unit(capsys):
    from semask_fast.backends.cpu import matrix_unit_dtypes, matrix_unit_ops

    assert set(matrix_unit_ops()) == {"semantic_attention", "atm_attention", "mask_similarity"}
    assert main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cpu matrix"))
    dtypes = matrix_unit_dtypes()
    if dtypes:
        assert "AMX" in line and all(str(d).replace("torch.", "") in line for d in dtypes)
        assert all(op in line for op in matrix_unit_ops())
    else:
        assert line.split(None, 2)[2].startswith("none: ")
    with onednn(False):
        assert matrix_unit_dtypes() == []
        assert main(["info"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cpu matrix"))
        assert "oneDNN is switched off" in line


def test_header_of_a_reduced_dtype_names_the_matrix_unit():
    from semask_fast.backends.cpu import matrix_unit_summary

    lines = _bench_report.header_lines("m", torch.bfloat16, "paper", 100.0, "cmd")
    assert lines[-1].startswith("Matrix unit of the cpu kernels: " + matrix_unit_summary())
    assert not any("Matrix unit" in x for x in _bench_report.header_lines("m", torch.float32, "paper", 100.0, "cmd"))


def test_bench_of_another_dtype_writes_its_own_folder_and_readme_part(monkeypatch, tmp_path):
    """A full bfloat16 run writes its own folder and its own README part (markers of its dtype): it
    does not overwrite the float32 tables, their README part or run the float32 end to end."""
    monkeypatch.chdir(tmp_path)
    calls = {}
    monkeypatch.setattr(_bench, "sgemm_rate", lambda: 100.0)
    monkeypatch.setattr(_bench, "run", lambda cases, dtype, *a, **k: calls.setdefault("dtype", dtype) and [])
    monkeypatch.setattr(_bench_e2e, "run", lambda **k: calls.setdefault("e2e", True))
    written = []
    monkeypatch.setattr(_bench_report, "write_markdown", lambda md, *a, **k: written.append(md))
    monkeypatch.setattr(_bench_report, "write_plot", lambda png, *a, **k: False)
    monkeypatch.setattr(_bench_report, "summary_table", lambda *a, **k: "")
    readme = tmp_path / "README.md"
    fp32_part = f"{_bench_report.README_BEGIN}\nfloat32 figures\n{_bench_report.README_END}"
    bf16_begin, bf16_end = _bench_report.readme_markers(torch.bfloat16)
    readme.write_text(f"{fp32_part}\n{bf16_begin}\nstale\n{bf16_end}\n")
    assert main(["bench", "--dtype", "bfloat16", "--readme", str(readme)]) == 0
    assert calls == {"dtype": torch.bfloat16}
    assert written == [os.path.join("benchmarks", "results", "bfloat16", "bench_cpu.md")]
    text = readme.read_text()
    assert fp32_part in text and "stale" not in text and "Run: `python -m semask_fast bench" in text


def test_e2e_times_four_settings_of_the_same_model_and_the_bound():
    pytest.importorskip("timm")
    # A narrow Swin at 112^2: windows of 7, shifted blocks in stages 1 and 2, one window in stage 3.
    e2e = _bench_e2e.run(batch=1, reps=1, progress=lambda m: None, img_size=112, depths=(2, 2, 1), embed_dim=16,
                         num_heads=(1, 2, 4))
    rows = {r["name"]: r for r in e2e["rows"]}
    assert list(rows) == ["timm (as shipped)", "timm, fused_attn=True", "patch_timm(model)",
                          "patch_timm(model, zero_copy=True)", _bench_e2e.BOUND]
    assert rows["timm (as shipped)"]["backend"] == rows["timm, fused_attn=True"]["backend"] == "timm's own code"
    assert rows["patch_timm(model)"]["backend"] != "timm's own code"
    # The bound runs no attention at all, and its outputs (not Swin's) are not compared.
    bound = rows[_bench_e2e.BOUND]
    assert bound["backend"] == "none (bound)" and bound["max_abs_diff"] is None and bound["train_s"] is None
    for r in list(rows.values())[:-1]:
        assert r["max_abs_diff"] <= TOLERANCES[torch.float32][0].atol, r["name"]
    assert max(r["infer_ratio"] for r in rows.values() if r["name"].startswith("timm")) == 1.0
    assert "| patch_timm(model, zero_copy=True) |" in _bench_report.e2e_markdown(e2e)
