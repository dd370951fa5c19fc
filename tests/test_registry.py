"""Backend selection: declared support, reasons, fallback warnings, the CLI."""

import subprocess
import sys
import warnings

import pytest
import torch

import semask_fast as sf
from semask_fast.backends import BackendNotSupportedError, OpImpl, record_dispatch, registry
from semask_fast.reference import semantic_attention as ref_semantic
from semask_fast.testing import REORDERED_FP32, assert_close


class _FakeSemantic(OpImpl):
    """A 'kernel' backend for tests: the reference math with a hand-written backward."""

    op = "semantic_attention"
    backend = "cuda"
    dtypes = frozenset({torch.float32})

    def supported_devices(self):
        return frozenset({"cpu"})

    def input_reasons(self, inp):
        return [f"K={inp.sq.shape[-1]} (supported: <= 8)"] if inp.sq.shape[-1] > 8 else []

    def forward(self, inp, seed):
        p = torch.softmax(inp.sq @ inp.sk.transpose(-2, -1), -1)
        return (p @ inp.yv,), (p,)

    def residuals_like(self, inp):
        b, n, _ = inp.sq.shape
        return (inp.sq.new_empty((b, n, n)),)

    def backward(self, inp, outputs, residuals, grads, needs, seed):
        (p,), (g,) = residuals, grads
        dp = g @ inp.yv.transpose(-2, -1)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        return ds @ inp.sk, ds.transpose(-2, -1) @ inp.sq, p.transpose(-2, -1) @ g


@pytest.fixture
def fake_backend(monkeypatch):
    """Only the fake kernel backend and the reference serve semantic_attention."""
    registry._load()
    impls = registry._IMPLS["semantic_attention"]
    for other in ("triton", "cpu", "simt"):
        monkeypatch.delitem(impls, other, raising=False)
    monkeypatch.setitem(impls, "cuda", _FakeSemantic())
    monkeypatch.setattr(registry, "_warned", set())


def _inputs(k=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 6, n, generator=g, dtype=dtype).requires_grad_() for n in (k, k, 7)]


def test_auto_picks_a_supporting_kernel_backend_and_autograd_uses_its_backward(fake_backend):
    sq, sk, yv = _inputs()
    with record_dispatch() as ran:
        out = sf.semantic_attention(sq, sk, yv)
        out.sum().backward()
    assert ran == [("semantic_attention", "cuda", "forward"), ("semantic_attention", "cuda", "backward")]
    grads = [t.grad.clone() for t in (sq, sk, yv)]
    for t in (sq, sk, yv):
        t.grad = None
    ref_semantic(sq, sk, yv).sum().backward()
    for g, t in zip(grads, (sq, sk, yv)):
        assert_close(g, t.grad, tol=REORDERED_FP32)  # the fake kernel's products in another order


def test_auto_falls_back_with_one_warning_giving_reasons(fake_backend):
    sq, sk, yv = _inputs(k=9)
    expected = r"falling back to the reference backend \(cuda: K=9 \(supported: <= 8\); triton: no triton impl"
    with pytest.warns(RuntimeWarning, match=expected):
        with record_dispatch() as ran:
            sf.semantic_attention(sq, sk, yv)
    assert ran == [("semantic_attention", "reference", "forward")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sf.semantic_attention(sq, sk, yv)  # the same reason warns only once


def test_explicit_backend_that_cannot_serve_raises_with_reasons(fake_backend):
    sq, sk, yv = _inputs(dtype=torch.float64)
    expected = r"backend 'cuda' cannot serve .*dtype=float64 \(supported: float32\)"
    with pytest.raises(BackendNotSupportedError, match=expected):
        sf.semantic_attention(sq, sk, yv, backend="cuda")


def test_explicit_backend_without_implementation_raises(monkeypatch):
    registry._load()
    monkeypatch.delitem(registry._IMPLS["semantic_attention"], "simt", raising=False)
    with pytest.raises(BackendNotSupportedError, match="no simt implementation of semantic_attention"):
        sf.semantic_attention(*_inputs(), backend="simt")


def test_available_backends_lists_every_op_and_backend():
    table = sf.available_backends()
    assert set(table) == set(registry.OPS)
    for per_backend in table.values():
        assert set(per_backend) == set(registry.BACKENDS)
        assert per_backend["reference"] == []
        assert all(isinstance(r, str) and r for why in per_backend.values() for r in why)


def test_register_rejects_unknown_names():
    class Bad(OpImpl):
        op = "nope"
        backend = "cuda"

    with pytest.raises(ValueError, match="unknown op 'nope'"):
        registry.register(Bad)


def test_backward_gradient_count_is_checked(fake_backend, monkeypatch):
    monkeypatch.setattr(_FakeSemantic, "backward", lambda self, *args: (None,))
    out = sf.semantic_attention(*_inputs())
    with pytest.raises(RuntimeError, match="returned 1 gradients, expected 3"):
        out.sum().backward()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "semask_fast", *args], capture_output=True, text=True, timeout=900)


def test_cli_info_prints_the_backend_table():
    res = _cli("info")
    assert res.returncode == 0, res.stderr
    assert "| op " in res.stdout and "| reference |" in res.stdout
    for op in registry.OPS:
        assert op in res.stdout


def test_cli_check_runs_and_reports():
    res = _cli("check", "--dtype", "float32", "--op", "mask_similarity")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checks ran, 0 failed" in res.stdout


def test_auto_on_cpu_tensors_walks_cpu_then_reference():
    """The correctness tools (Triton's interpreter, the SIMT harness) are never picked automatically:
    ``auto`` skips them even where they can run, and takes the native cpu backend (or the reference)."""
    from semask_fast.ops.semantic_attention import SemanticAttentionInputs

    sq, sk, yv = (t.detach() for t in _inputs())
    inp = SemanticAttentionInputs(sq=sq, sk=sk, yv=yv)
    for backend in ("triton", "simt"):
        impl = registry.implementation("semantic_attention", backend)
        if impl is not None:
            assert not impl.auto_selectable(inp), backend
    chosen = registry.select("semantic_attention", inp).backend
    assert chosen == ("cpu" if not registry.reasons("semantic_attention", "cpu", inp) else "reference")


def test_selection_fallback_and_dispatch_record_work_compiled(fake_backend):
    """Selection runs inside the op (and its fake implementation): compiled, the fallback still warns
    once with the reasons, and the record names the backend that ran."""
    sq, sk, yv = _inputs(k=9)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: sf.semantic_attention(a * 1, b, c), backend="aot_eager", fullgraph=True)
    with pytest.warns(RuntimeWarning, match=r"falling back to the reference backend \(cuda: K=9"):
        with record_dispatch() as ran:
            compiled(sq, sk, yv).sum().backward()
    assert ran == [("semantic_attention", "reference", "forward"), ("semantic_attention", "reference", "backward")]
    sq, sk, yv = _inputs(k=5)
    with record_dispatch() as ran:
        compiled(sq, sk, yv).sum().backward()
    assert ran == [("semantic_attention", "cuda", "forward"), ("semantic_attention", "cuda", "backward")]


def test_implementation_modules_derive_from_the_op_descriptions():
    modules = registry.implementation_modules()
    assert modules[0] == "semask_fast.backends.reference"
    families = {spec.family for spec in sf.ops.SPECS.values()}
    assert families == {"window_attention", "window_process", "shifted_window_attention", "semantic_attention",
                        "atm_attention", "mask_similarity"}
    assert set(modules[1:]) == {f"semask_fast.backends.{p}.{f}" for p in ("triton", "cuda", "cpu") for f in families}
    assert registry.OPS == tuple(sf.ops.SPECS)


def test_record_dispatch_sees_other_threads():
    """The backward of CUDA tensors runs on autograd's device threads: a record taken on the
    calling thread must see what ran there (the first GPU run missed every backward)."""
    import threading

    from semask_fast.backends.base import note_ran

    with record_dispatch() as ran:
        worker = threading.Thread(target=note_ran, args=("semantic_attention", "cuda", "backward"))
        worker.start()
        worker.join()
    note_ran("semantic_attention", "cuda", "forward")  # after the block: not recorded
    assert ran == [("semantic_attention", "cuda", "backward")]
