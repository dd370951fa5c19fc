"""The ops inside ``torch.compile``: every op is a custom op, so dynamo traces the layers and models
that use them with no graph break (``fullgraph=True``), the kernels run at runtime (``record_dispatch``
sees them), compiled code computes what eager code does (outputs and every gradient), and a new
input size under ``dynamic=True`` reuses the compiled code.

``backend="aot_eager"`` runs dynamo and AOTAutograd (where an op without a fake implementation or
a traceable backward would fail) without inductor's code generation, which only one test pays for.
"""

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import semask_fast
from semask_fast import record_dispatch
from semask_fast.testing import TOLERANCES
from tests.conftest import require_backend


def _window_attention(device):
    t = {name: torch.randn(2, 2, 49, 16, device=device) for name in ("q", "k", "v")}
    t["table"] = torch.randn(169, 2, device=device) * 0.1
    return t, lambda q, k, v, table, backend: semask_fast.window_attention(
        q, k, v, table, window_size=7, shift_size=3, grid=(1, 2), backend=backend)


def _window_partition(device):
    return {"x": torch.randn(1, 10, 12, 8, device=device)}, lambda x, backend: semask_fast.window_partition(
        x, 7, 3, backend=backend)


def _window_merge(device):
    return {"w": torch.randn(4, 7, 7, 8, device=device)}, lambda w, backend: semask_fast.window_merge(
        w, 7, 3, 10, 12, backend=backend)


def _shifted_window_attention(device):
    t = {"qkv": torch.randn(1, 9, 10, 3 * 2 * 16, device=device), "table": torch.randn(169, 2, device=device) * 0.1}
    return t, lambda qkv, table, backend: semask_fast.shifted_window_attention(
        qkv, table, num_heads=2, window_size=7, shift_size=3, backend=backend)


def _semantic_attention(device):
    t = {"sq": torch.randn(2, 49, 19, device=device) * 0.5, "sk": torch.randn(2, 49, 19, device=device) * 0.5,
         "yv": torch.randn(2, 49, 24, device=device)}
    return t, lambda sq, sk, yv, backend: semask_fast.semantic_attention(sq, sk, yv, backend=backend)


def _atm_attention(device):
    t = {"q": torch.randn(1, 2, 20, 16, device=device), "k": torch.randn(1, 2, 40, 16, device=device),
         "v": torch.randn(1, 2, 40, 16, device=device)}
    return t, lambda q, k, v, backend: semask_fast.atm_attention(q, k, v, backend=backend)


def _mask_similarity(device):
    t = {"p": torch.randn(1, 40, 32, device=device), "c": torch.randn(1, 19, 32, device=device)}
    return t, lambda p, c, backend: semask_fast.mask_similarity(p, c, norm=True, backend=backend)


CASES = {
    "window_attention": _window_attention,
    "window_partition": _window_partition,
    "window_merge": _window_merge,
    "shifted_window_attention": _shifted_window_attention,
    "semantic_attention": _semantic_attention,
    "atm_attention": _atm_attention,
    "mask_similarity": _mask_similarity,
}


def test_every_op_has_a_case():
    assert set(CASES) == set(semask_fast.ops.SPECS)


def _assert_equal(actual, expected, what: str):
    tol = TOLERANCES[torch.float32][0]
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("op", list(CASES))
def test_compiled_function_matches_eager(kernel_backend, op):
    device = require_backend(op, kernel_backend)
    tensors, call = CASES[op](device)

    def loss(**t):
        # Compiled code on both sides of the op.
        outs = call(**{k: v * 1.5 for k, v in t.items()}, backend=kernel_backend)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return sum((o.float().tanh() ** 2).sum() for o in outs)

    def run(fn):
        leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
        with record_dispatch() as ran:
            value = fn(**leaves)
            value.backward()
        return value.detach(), {k: v.grad for k, v in leaves.items()}, ran

    torch._dynamo.reset()
    want_value, want_grads, _ = run(loss)
    value, grads, ran = run(torch.compile(loss, backend="aot_eager", fullgraph=True))
    assert ran == [(op, kernel_backend, "forward"), (op, kernel_backend, "backward")]
    _assert_equal(value, want_value, "loss")
    for name in tensors:
        _assert_equal(grads[name], want_grads[name], f"d{name}")


# --------------------------------------------------------------------------- #
# Layers and models, on the native cpu backend
# --------------------------------------------------------------------------- #
def _without_dropout(model: nn.Module) -> nn.Module:
    """Dropout off in train mode: compiled and eager code draw their masks differently."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return model


def _window_attention_layer(scale=1):
    m = semask_fast.nn.WindowAttention(32, 2, window_size=7, backend="cpu")
    mask = torch.where(torch.rand(2, 49, 49) < 0.2, -100.0, 0.0)
    return m, (torch.randn(4 * scale, 49, 32), mask)


def _swin_t(zero_copy):
    timm = pytest.importorskip("timm")

    def make(scale=1):
        torch.manual_seed(0)
        m = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, drop_path_rate=0.0)
        semask_fast.patch_timm(m, backend="cpu", zero_copy=zero_copy)
        return m, (torch.randn(scale, 3, 224, 224),)
    return make


def _semantic_layer(scale=1):
    from semask_fast.models import SemanticLayer

    h, w = 10 + 3 * (scale - 1), 12 + (scale - 1)
    return SemanticLayer(32, 5, window_size=7, backend="cpu"), (torch.randn(2, h * w, 32), h, w)


def _atm_layer(scale=1):
    from semask_fast.models import ATMDecoderLayer

    return ATMDecoderLayer(32, 2, backend="cpu"), (torch.randn(5, 2, 32), torch.randn(40 * scale + 3, 2, 32))


def _segmenter_head(scale=1):
    pytest.importorskip("timm")
    from semask_fast.models import MaskTransformerHead

    grid = (3 * scale, 4 + scale)
    return (MaskTransformerHead(5, 24, 32, n_layers=1, n_heads=2, backend="cpu"),
            (torch.randn(2, grid[0] * grid[1], 24), grid))


MODELS = {
    "WindowAttention": _window_attention_layer,
    "swin_t": _swin_t(False),
    "swin_t_zero_copy": _swin_t(True),
    "SemanticLayer": _semantic_layer,
    "ATMDecoderLayer": _atm_layer,
    "MaskTransformerHead": _segmenter_head,
}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(autouse=True)
def _cpu_backend():
    require_backend("window_attention", "cpu")
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(MODELS))
def test_model_traces_with_no_graph_break(name):
    model, args = MODELS[name]()
    explanation = torch._dynamo.explain(model)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", [n for n in MODELS if n != "swin_t"])  # swin_t: traced above, zero copy here
def test_compiled_model_matches_eager_with_every_gradient(name):
    torch.manual_seed(0)
    model, args = MODELS[name]()
    model = _without_dropout(model.train())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    def run(fn):
        model.zero_grad(set_to_none=True)
        with record_dispatch() as ran:
            out = fn(*args)
            loss = sum((o.float() ** 2).mean() for o in (out if isinstance(out, tuple) else (out,)))
            loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, ran

    want, want_grads, want_ran = run(model)
    got, grads, ran = run(compiled)
    assert ran == want_ran and {b for _, b, _ in ran} == {"cpu"}, ran
    for i, (a, b) in enumerate(zip(got if isinstance(got, tuple) else (got,),
                                   want if isinstance(want, tuple) else (want,))):
        _assert_equal(a, b, f"output {i}")
    assert set(grads) == set(want_grads) and grads
    for n in want_grads:
        _assert_equal(grads[n], want_grads[n], f"grad of {n}")


@pytest.mark.parametrize("name", ["WindowAttention", "SemanticLayer", "ATMDecoderLayer", "MaskTransformerHead"])
def test_a_new_input_size_does_not_recompile_under_dynamic(name):
    model, args = MODELS[name]()
    model.eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    compiled(*args)
    frames = counter.frame_count
    for scale in (2, 3):
        _, bigger = MODELS[name](scale)
        _assert_equal(_first(compiled(*bigger)), _first(model(*bigger)), f"output at scale {scale}")
    assert counter.frame_count == frames


def test_inductor_compiles_window_attention_fullgraph():
    torch.manual_seed(0)
    model, (x, mask) = _window_attention_layer()
    compiled = torch.compile(model, fullgraph=True)
    x = x.requires_grad_()
    with record_dispatch() as ran:
        out = compiled(x, mask)
        out.sum().backward()
    assert ran == [("window_attention", "cpu", "forward"), ("window_attention", "cpu", "backward")]
    dx, dtable = x.grad.clone(), model.relative_position_bias_table.grad.clone()
    x.grad = None
    model.zero_grad()
    want = model(x, mask)
    want.sum().backward()
    _assert_equal(out, want, "output")
    _assert_equal(dx, x.grad, "dx")
    _assert_equal(dtable, model.relative_position_bias_table.grad, "dtable")


def test_importing_the_package_imports_neither_triton_nor_dynamo():
    # Triton's interpreter is chosen by TRITON_INTERPRET before triton is imported (the CLI sets it
    # after importing semask_fast): an import of dynamo (which imports triton) at package import
    # broke every nested @triton.jit call under it.
    code = "import sys, semask_fast; print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
