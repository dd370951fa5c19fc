"""Export: ``torch.export.export`` keeps every op as one ``semask_fast`` node (its fake implementation
gives the shapes) and the exported program computes what the model does; each op lowers to its
reference math (``semask_fast.ops._library.decompositions()`` for ``run_decompositions``; registered in
``torch._decomp``'s table within ``lowered_to_reference()``), so that ``torch.onnx.export(..., dynamo=True)``
produces a model of standard ONNX ops that
onnxruntime runs with PyTorch's outputs (fp32, within 1e-4).
"""

import warnings

import pytest
import torch

import semask_fast
import semask_fast.models
from semask_fast.ops import SPECS
from semask_fast.ops._library import decompositions, lowered_to_reference
from semask_fast.testing import EXACT, TOLERANCES, assert_close

timm = pytest.importorskip("timm")

FP32 = TOLERANCES[torch.float32][0]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback and exporter chatter
        yield


def _swin(zero_copy: bool):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    assert semask_fast.patch_timm(model, zero_copy=zero_copy) == 12
    return model, (torch.randn(1, 3, 224, 224),)


def _padded_swin():
    """A small timm Swin whose 9 x 13 token grid pads to windows of 4: the zero-copy op pads."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(36, 52), patch_size=4,
                              window_size=4, embed_dim=16, depths=(2,), num_heads=(2,), num_classes=3).eval()
    assert semask_fast.patch_timm(model, zero_copy=True) == 2
    return model, (torch.randn(1, 3, 36, 52),)


def _semantic_layer():
    torch.manual_seed(0)
    layer = semask_fast.models.SemanticLayer(48, 11, window_size=7).eval()
    for p in layer.parameters():  # the official init zeroes the residual branch: make it count
        torch.nn.init.normal_(p, std=0.2)
    return layer, (torch.randn(2, 14 * 21, 48), 14, 21)


MODELS = {
    "swin-t": lambda: _swin(False),
    "swin-t zero_copy": lambda: _swin(True),
    "swin zero_copy padded": _padded_swin,
    "semantic layer": _semantic_layer,
}
#: The ops each model's exported graph calls.
OPS = {
    "swin-t": {"window_attention"},
    "swin-t zero_copy": {"shifted_window_attention"},
    "swin zero_copy padded": {"shifted_window_attention"},
    "semantic layer": {"window_partition", "semantic_attention", "window_merge"},
}


def _ours(graph) -> set:
    return {n.target.name().split("::")[1].split(".")[0] for n in graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target.namespace == "semask_fast"}


def _assert_close(actual, expected):
    actual = actual if isinstance(actual, (tuple, list)) else (actual,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(torch.as_tensor(a), e, atol=FP32.atol, rtol=FP32.rtol)


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_keeps_the_ops_and_computes_the_model(name):
    model, args = MODELS[name]()
    with torch.no_grad():
        expected = model(*args)
        ep = torch.export.export(model, args)
        assert _ours(ep.graph) == OPS[name]
        _assert_close(ep.module()(*args), expected)
        lowered = ep.run_decompositions(decompositions())
        assert _ours(lowered.graph) == set()
        _assert_close(lowered.module()(*args), expected)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
def test_export_with_a_dynamic_image_size(strict):
    """H and W as export dims: the ops' validation takes the symbolic sizes (their schemas are SymInt),
    in torch.export's default non-strict mode too, and the program runs another size."""

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = semask_fast.models.SemanticLayer(16, 5, window_size=4)

        def forward(self, x):
            b, h, w, c = x.shape
            return self.m(x.reshape(b, h * w, c), h, w)[0]

    torch.manual_seed(0)
    model = Layer().eval()
    dims = {"x": {1: torch.export.Dim("H", min=2, max=64), 2: torch.export.Dim("W", min=2, max=64)}}
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randn(2, 9, 13, 16),), dynamic_shapes=dims, strict=strict)
        other = torch.randn(2, 11, 6, 16)
        _assert_close(ep.module()(other), model(other))


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_runs_in_onnxruntime_with_pytorchs_outputs(name, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, args = MODELS[name]()
    with torch.no_grad():
        expected = model(*args)
        with lowered_to_reference():
            program = torch.onnx.export(model, args, dynamo=True, verbose=False)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, "every op lowered to standard ONNX"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), tensors)}
    _assert_close([torch.from_numpy(o) for o in session.run(None, feeds)], expected)


def test_every_op_has_a_decomposition_to_aten_registered_only_while_lowering():
    table = decompositions()
    assert set(table) == {spec.forward_op._opoverload for spec in SPECS.values()}
    with lowered_to_reference():
        assert all(torch._decomp.decomposition_table[op] == fn for op, fn in table.items())
    assert not set(table) & set(torch._decomp.decomposition_table)


def test_onnx_export_without_lowering_names_the_op():
    pytest.importorskip("onnxscript")
    model, args = _semantic_layer()
    with pytest.raises(Exception, match="No ONNX function found for .*semask_fast"):
        torch.onnx.export(model, args, dynamo=True, verbose=False)


def test_decomposition_returns_what_the_op_returns():
    """Same number, shapes and dtypes of results as the op (outputs, residuals, seed)."""
    q = torch.randn(2, 1, 16, 8)
    table = torch.randn(49, 1)
    spec = SPECS["window_attention"]
    args = (q, q, q, table, None, [4, 4], [0, 0], None, 8 ** -0.5, -100.0, 0.1, "cpu")
    real = spec.forward_op(*args)
    lowered = spec.decompose(*args)
    assert [(t.shape, t.dtype) for t in lowered] == [(t.shape, t.dtype) for t in real]
    with torch.no_grad():
        expected = semask_fast.window_attention(q, q, q, table, window_size=4, backend="reference")
    no_dropout = spec.decompose(*args[:-2], 0.0, "cpu")
    assert_close(no_dropout[0], expected, tol=EXACT)
