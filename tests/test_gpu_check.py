"""``python -m semask_fast gpu-check``: what it runs (its dry run covers every op x backend x dtype, the
compiled layers and every benchmark case), that it fails loudly without a GPU, and its CPU-side
logic (orchestration, report, the peers' constants placed on the benchmark's device)."""

import subprocess
import sys

import pytest
import torch

from semask_fast import __main__ as cli
from semask_fast import _bench, _gpu_check
from semask_fast.ops import SPECS
from semask_fast.testing import small_cases


def test_dry_run_lists_every_op_backend_and_dtype(capsys):
    assert cli.main(["gpu-check", "--dry-run"]) == 0
    text = capsys.readouterr().out
    for case in small_cases():
        for backend in ("cuda", "triton"):
            for dtype in ("float32", "float16", "bfloat16"):
                assert f"{case.op} [{case.name}] {backend} {dtype}" in text
    assert {case.op for case in small_cases()} == set(SPECS)
    for name in _gpu_check.COMPILE_MODELS:
        assert f"{name}: torch.compile(fullgraph=True)" in text
    for case in _bench.bench_cases("paper"):
        for mode in ("fwd", "fwd+bwd"):
            assert f"{case.key} bfloat16 {mode}: eager, SDPA, cuda, triton" in text
        for backend in ("cuda", "triton"):
            for dtype in ("float32", "bfloat16"):
                assert f"{case.key} {backend} {dtype}" in text
    assert "-gencode=arch=compute_90,code=compute_90" in text


def test_dry_run_follows_the_options(capsys):
    assert cli.main(["gpu-check", "--dry-run", "--step", "bench", "--bench-dtype", "float16", "float32",
                     "--compiled-peers"]) == 0
    text = capsys.readouterr().out
    assert "parity:" not in text and "build:" not in text and "bench:" in text
    assert "float16 fwd: eager, SDPA, FlexAttention (compiled), torch.compile(eager), cuda, triton" in text
    assert "float32 fwd+bwd" in text


def test_fails_loudly_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["gpu-check", "--out", ""]) == 2
    err = capsys.readouterr().err
    assert "gpu-check FAILED" in err and "needs a CUDA GPU and found none" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's exit status")
def test_the_command_exits_2_on_a_machine_without_gpu(tmp_path):
    done = subprocess.run([sys.executable, "-m", "semask_fast", "gpu-check", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "found none" in done.stderr
    assert not list(tmp_path.iterdir())


def test_run_writes_the_report_and_fails_on_any_failure(monkeypatch, tmp_path):
    monkeypatch.setattr(_gpu_check, "require_gpu", lambda: torch.device("cpu"))
    monkeypatch.setattr(_gpu_check, "machine_lines", lambda device: ["Machine: test."])
    calls = []

    def fake(name, failures):
        def step(options, deadline, *device):
            calls.append(name)
            return _gpu_check.StepResult(name, header=("what", "status"), rows=[[name, "FAIL" if failures else "ok"]],
                                         failures=failures)
        return step

    monkeypatch.setattr(_gpu_check, "step_build", fake("build", 0))
    monkeypatch.setattr(_gpu_check, "step_parity", fake("parity", 0))
    monkeypatch.setattr(_gpu_check, "step_shapes", fake("shapes", 0))
    monkeypatch.setattr(_gpu_check, "step_compile", fake("compile", 1))
    monkeypatch.setattr(_gpu_check, "step_bench", fake("bench", 0))
    status = _gpu_check.run(_gpu_check.Options(out=str(tmp_path)), echo=lambda line: None)
    assert status == 1 and calls == list(_gpu_check.STEPS)
    text = (tmp_path / "gpu_check.md").read_text()
    assert "**FAILED: 1 failure(s)**" in text and "## compile" in text and "| compile | FAIL |" in text
    assert (tmp_path / "gpu_check.json").is_file()

    monkeypatch.setattr(_gpu_check, "step_compile", fake("compile", 0))
    assert _gpu_check.run(_gpu_check.Options(out=str(tmp_path), steps=("compile",)), echo=lambda line: None) == 0
    assert "**PASSED**" in (tmp_path / "gpu_check.md").read_text()


def test_peers_build_their_constants_on_the_benchmarks_device():
    index, mask = _bench._window_geometry(7, 3, (2, 2), torch.float32, torch.device("cpu"))
    assert index.device.type == mask.device.type == "cpu"
    index, mask = _bench._window_geometry(7, 3, (2, 2), torch.float32, torch.device("meta"))
    assert index.device.type == mask.device.type == "meta"
    index, mask = _bench._window_geometry(7, 3, (2, 2), torch.float32, torch.device("cpu"))
    assert mask.device.type == "cpu"


def test_a_bench_step_computes_every_gradient_each_time():
    inputs = {"a": torch.randn(3, 4), "b": torch.randn(4, 5)}
    seen = []
    step = _gpu_check._bench_step(lambda a, b: seen.append((a, b)) or a @ b, inputs, "fwd+bwd", None)
    step()
    first = [t.grad.clone() for t in seen[0]]
    step()
    assert all(torch.equal(t.grad, g) for t, g in zip(seen[1], first))  # reset between steps, not accumulated
    assert _gpu_check._bench_step(lambda a, b: seen.append((a, b)) or a @ b, inputs, "fwd", None)() is None
    assert not any(t.requires_grad for t in seen[-1])


@pytest.mark.parametrize("name", [n for n in _gpu_check.COMPILE_MODELS if not n.startswith("swin")])
def test_compile_models_are_built_on_the_given_device(name):
    model, args = _gpu_check.compile_models(torch.device("cpu"))[name]()
    assert model.training
    assert all(a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor))
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    with torch.no_grad():
        model(*args)


def test_parity_reports_an_op_a_backend_does_not_implement_without_failing(monkeypatch):
    import semask_fast.testing as testing

    (case,) = [c for c in small_cases() if c.op == "shifted_window_attention"]
    monkeypatch.setattr(testing, "small_cases", lambda: [case])
    monkeypatch.setattr(_gpu_check, "BACKENDS", ("cuda",))  # the cuda backend has no zero-copy kernel
    result = _gpu_check.step_parity(_gpu_check.Options(), float("inf"), torch.device("cpu"))
    assert result.failures == 0
    assert result.rows == [["shifted_window_attention", case.name, "cuda", "-", "not implemented", "-"]]


def test_shapes_step_backends_share_the_reference_runs(monkeypatch):
    """At the papers' shapes the float64 and in-dtype reference runs cost more than a backend's: the
    backends of a (case, dtype) compute them once."""
    import semask_fast.testing as testing
    from semask_fast import _bench

    (case,) = [c for c in _bench.bench_cases("small") if c.op == "mask_similarity"]
    monkeypatch.setattr(_bench, "bench_cases", lambda scale: [case])
    monkeypatch.setattr(_gpu_check, "BACKENDS", ("cpu", "reference"))
    runs = []
    real = testing.run_with_grads
    monkeypatch.setattr(testing, "run_with_grads", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    result = _gpu_check.step_shapes(_gpu_check.Options(), float("inf"), torch.device("cpu"))
    assert result.failures == 0, result.rows
    assert [(r[1], r[3]) for r in result.rows] == [("cpu", "ok"), ("reference", "ok")] * len(_gpu_check.SHAPES_DTYPES)
    assert len(runs) == 2 * len(_gpu_check.SHAPES_DTYPES)  # float64 and in-dtype, once per dtype


class _FakeCuda:
    """The torch.cuda calls of the bench step, on the CPU: events read a host clock, a graph
    replays nothing (capture cannot be emulated), a capture of a step marked failing raises."""

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            import time

            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    class Stream:
        def wait_stream(self, other):
            pass

    class CUDAGraph:
        def replay(self):
            pass

    def __init__(self):
        self.fail_capture = False
        self.captures = 0

    def graph(self, graph):
        import contextlib

        fake = self

        @contextlib.contextmanager
        def capture():
            fake.captures += 1
            if fake.fail_capture:
                raise RuntimeError("operation not permitted when stream is capturing")
            yield
        return capture()

    def stream(self, stream):
        import contextlib

        return contextlib.nullcontext()

    def current_stream(self):
        return self.Stream()

    def synchronize(self):
        pass

    def reset_peak_memory_stats(self, device):
        pass

    def memory_allocated(self, device):
        return 0

    max_memory_allocated = memory_allocated


@pytest.mark.parametrize("fail_capture", [False, True])
def test_bench_times_per_call_and_graph_replays(monkeypatch, fail_capture):
    """The bench step's orchestration on CPU tensors with torch.cuda faked: every contender gets a
    per-call time and a graph-replay time, or a note that its capture failed (never a failure)."""
    fake = _FakeCuda()
    fake.fail_capture = fail_capture
    for name in ("Event", "Stream", "CUDAGraph", "graph", "stream", "current_stream", "synchronize",
                 "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    small = {c.key: c for c in _bench.bench_cases("small")}
    monkeypatch.setattr(_bench, "bench_cases", lambda scale="paper": [small["swin-t-224-s4"]])
    monkeypatch.setattr(_gpu_check, "BACKENDS", ("cpu",))
    options = _gpu_check.Options(bench_dtypes=(torch.float32,))
    result = _gpu_check.step_bench(options, float("inf"), torch.device("cpu"))
    assert result.failures == 0
    rows = [dict(zip(result.header, r)) for r in result.rows]
    assert {r["implementation"] for r in rows} >= {"eager", "SDPA", "semask_fast cpu"}
    timed = [r for r in rows if r["ms"] != "-"]
    assert len(timed) == len(rows)  # every peer runs on these CPU tensors
    assert fake.captures == len(timed)
    for r in timed:
        if fail_capture:
            assert r["graph ms"] == "-" and "graph capture failed: RuntimeError" in r["note"]
        else:
            assert float(r["graph ms"]) >= 0 and "graph" not in r["note"]
    ours = [r for r in timed if r["implementation"] == "semask_fast cpu"]
    assert {r["mode"] for r in ours} == {"fwd", "fwd+bwd"}
    assert all(r["vs fastest peer"].endswith("x") for r in ours)
