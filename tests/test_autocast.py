"""Every op under ``torch.autocast`` behaves as its reference math does under the same autocast: the
same operands reach low precision (matrix-product operands in the autocast dtype, bias tables,
masks and LayerNorm parameters in float32), the outputs have the reference's dtypes, and outputs
and gradients are as close to float64 as PyTorch's own autocast computation is (``testing``'s
tolerances).  CPU autocast (bfloat16) runs here on every backend; CUDA autocast's dtype rules are
checked on fake CUDA tensors (no GPU needed), and its numbers on a GPU (``gpu-check``).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import semask_fast
from semask_fast import record_dispatch
from semask_fast.backends import registry
from semask_fast.ops import SPECS
from semask_fast.testing import EXACT, TOLERANCES, assert_close, compare, small_cases
from tests.conftest import require_backend
from tests.official import OfficialATMAttention, OfficialSemanticAttention

BACKENDS = ["reference", "cpu", "triton", "cuda", pytest.param("simt", marks=pytest.mark.harness)]
CASES = {f"{case.op}: {case.name}": case for case in small_cases()}


def _autocast_dtypes(device: torch.device):
    return [torch.bfloat16] if device.type == "cpu" else [torch.float16, torch.bfloat16]


def _record_op_inputs(monkeypatch):
    """The validated inputs (as the op's implementation receives them) of each op call."""
    seen = []
    select = registry.select

    def spy(op, inp, backend):
        seen.append(inp)
        return select(op, inp, backend)

    monkeypatch.setattr(registry, "select", spy)
    return seen


def _leaves(case, device):
    return {n: None if t is None else t.float().to(device).requires_grad_(n in case.grad_names)
            for n, t in case.tensors(torch.Generator().manual_seed(0)).items()}


def _run(fn, leaves, grad_outputs=None):
    """Outputs of ``fn(**leaves)`` and the gradients of <outputs, grad_outputs> wrt every leaf requiring grad."""
    outs = fn(**leaves)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    if grad_outputs is None:
        gen = torch.Generator().manual_seed(1)
        grad_outputs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outs]
    names = [n for n, t in leaves.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(outs, [leaves[n] for n in names], [g.to(o.dtype) for g, o in zip(grad_outputs, outs)],
                                allow_unused=True)
    return outs, {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}, grad_outputs


def _as_reference_math(spec, monkeypatch):
    """Makes the op run its reference math in plain PyTorch (what a model's own code does), so that
    autocast applies to each of its aten ops."""
    monkeypatch.setattr(spec, "forward_op", lambda *args: list(spec.reference(spec.inputs.from_args(args[:-1]), None)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_op_under_autocast_matches_the_reference_under_autocast(case, backend, monkeypatch):
    case = CASES[case]
    device = require_backend(case.op, backend)
    spec, rule = SPECS[case.op], SPECS[case.op].autocast
    for dtype in _autocast_dtypes(device):
        leaves = _leaves(case, device)
        seen = _record_op_inputs(monkeypatch)
        with torch.autocast(device.type, dtype=dtype), record_dispatch() as ran:
            outs, grads, grad_outputs = _run(lambda **t: case.fn(backend=backend, **t), leaves)
        monkeypatch.undo()
        assert ran and {b for _, b, _ in ran} == {backend}
        inp = seen[0]  # the forward's (backward selects again, with the same inputs)

        # The operands the implementation received: as the rule in the op's description says.
        for name in spec.inputs.tensor_fields():
            t = getattr(inp, name)
            if t is not None:
                lowered = rule is not None and name in rule.lowered
                assert t.dtype == (dtype if lowered else torch.float32), name

        # The reference math on the same leaves under the same autocast.
        _as_reference_math(spec, monkeypatch)
        with torch.autocast(device.type, dtype=dtype):
            base_outs, base_grads, _ = _run(lambda **t: case.fn(backend=backend, **t), _leaves(case, device),
                                            grad_outputs)
        monkeypatch.undo()
        assert [o.dtype for o in outs] == [o.dtype for o in base_outs]
        assert all(g.dtype == leaves[n].dtype for n, g in grads.items())

        # float64 truth from the operands as autocast rounded them (the leaf that became each field).
        fields = {n: getattr(inp, n) for n in spec.inputs.tensor_fields() if getattr(inp, n) is not None}
        truth_fields = {n: t.detach().double().requires_grad_() for n, t in fields.items()}
        truth_outs = spec.reference(inp.replace(**truth_fields), None)
        truth_grads = dict(zip(truth_fields, torch.autograd.grad(
            truth_outs, list(truth_fields.values()), [g.to(o.device) for g, o in zip(grad_outputs, truth_outs)],
            allow_unused=True)))
        leaf_field = {n: _field_of(leaves[n], fields, spec) for n in grads}

        fwd_tol, bwd_tol = TOLERANCES[dtype]
        results = [compare(f"output[{i}]", o, t, fwd_tol, b)
                   for i, (o, t, b) in enumerate(zip(outs, truth_outs, base_outs))]
        for n, g in grads.items():
            want = truth_grads[leaf_field[n]]
            results.append(compare(f"d{n}", g, torch.zeros_like(g, dtype=torch.float64) if want is None else want,
                                   bwd_tol, base_grads[n]))
        bad = [str(r) for r in results if not r.ok]
        assert not bad, f"{case.op} on {backend} under {dtype} autocast: " + "; ".join(bad)


def _field_of(leaf, fields, spec):
    """The op field a test leaf became (same values, maybe cast): matched by shape and values."""
    for name, t in fields.items():
        if t.shape == leaf.shape and torch.equal(t.detach().to(leaf.dtype), leaf.detach().to(t.dtype).to(leaf.dtype)):
            return name
    raise AssertionError(f"no field of {spec.name} holds the leaf of shape {tuple(leaf.shape)}")


def test_float64_inputs_are_left_alone_under_autocast():
    q = torch.randn(2, 1, 16, 8, dtype=torch.float64)
    table = torch.randn(49, 1, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = semask_fast.window_attention(q, q, q, table, window_size=4, backend="reference")
    assert out.dtype == torch.float64


def test_data_movement_keeps_its_dtype_under_autocast():
    x = torch.randn(1, 7, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        windows = semask_fast.window_partition(x, 4, 2)
        assert windows.dtype == torch.float32
        assert torch.equal(semask_fast.window_merge(windows, 4, 2, 7, 6), x)


def test_autocast_disabled_inside_runs_in_the_input_dtype():
    q = torch.randn(2, 1, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            out = semask_fast.window_attention(q, q, q, window_size=4, backend="reference")
    assert out.dtype == torch.float32


# --------------------------------------------------------------------------- #
# CUDA autocast's dtype rules, on fake CUDA tensors (no GPU needed)
# --------------------------------------------------------------------------- #
@pytest.fixture
def fake_cuda_autocast():
    """Enables CUDA autocast without a GPU (``torch.autocast`` refuses to): only its dtype rules can
    be observed, on fake CUDA tensors."""
    def enter(dtype):
        torch.set_autocast_dtype("cuda", dtype)
        torch.set_autocast_enabled("cuda", True)

    enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    yield enter
    torch.set_autocast_enabled("cuda", enabled)
    torch.set_autocast_dtype("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_autocast_output_dtypes_are_the_references(case, dtype, fake_cuda_autocast, monkeypatch):
    case = CASES[case]
    spec = SPECS[case.op]
    with FakeTensorMode():
        tensors = {n: None if t is None else torch.empty(t.shape, device="cuda")
                   for n, t in case.tensors(torch.Generator().manual_seed(0)).items()}
        seen = _record_op_inputs(monkeypatch)
        fake_cuda_autocast(dtype)
        outs = case.fn(backend="reference", **tensors)
        outs = outs if isinstance(outs, tuple) else (outs,)
        inp = seen[0]
        ref_inp = spec.inputs.from_args([getattr(inp, n) if n not in spec.inputs.tensor_fields() else
                                         tensors.get(n, getattr(inp, n)) for n in spec.arg_names])
        ref_outs = spec.reference(ref_inp, None)
        torch.set_autocast_enabled("cuda", False)
    assert [o.dtype for o in outs] == [o.dtype for o in ref_outs]
    rule = spec.autocast
    for name in spec.inputs.tensor_fields():
        t = getattr(inp, name)
        if t is not None:
            expected = dtype if rule is not None and name in rule.lowered else torch.float32
            assert t.dtype == expected, name


def test_cuda_autocast_rules_name_real_fields():
    for spec in SPECS.values():
        if spec.autocast is not None:
            fields = set(spec.inputs.tensor_fields())
            assert set(spec.autocast.lowered) | set(spec.autocast.fp32) <= fields
            assert set(spec.autocast.lowered).isdisjoint(spec.autocast.fp32)


# --------------------------------------------------------------------------- #
# The modules, against the official layers under the same autocast
# --------------------------------------------------------------------------- #
def _module_pairs():
    from timm.models import swin_transformer as timm_swin

    torch.manual_seed(0)
    theirs = timm_swin.WindowAttention(32, 2, window_size=4)
    with torch.no_grad():
        theirs.relative_position_bias_table.normal_()
    ours = semask_fast.nn.WindowAttention(32, 2, window_size=4)
    ours.load_state_dict(theirs.state_dict())
    mask = torch.where(torch.rand(2, 16, 16) < 0.3, -100.0, 0.0)
    yield "WindowAttention", ours, theirs, (torch.randn(4, 16, 32), mask)
    theirs = OfficialSemanticAttention(32, 7)
    ours = semask_fast.nn.SemanticAttention(32, 7)
    with torch.no_grad():
        theirs.gamma.fill_(0.5)
        theirs.mlp_res.weight.normal_(std=0.1)
    ours.load_state_dict(theirs.state_dict())
    yield "SemanticAttention", ours, theirs, (torch.randn(3, 16, 32),)
    theirs = OfficialATMAttention(32, num_heads=2)
    ours = semask_fast.nn.ATMAttention(32, num_heads=2)
    ours.load_state_dict(theirs.state_dict())
    yield "ATMAttention", ours, theirs, (torch.randn(2, 10, 32), torch.randn(2, 20, 32), torch.randn(2, 20, 32))


@pytest.mark.parametrize("name", ["WindowAttention", "ATMAttention", "SemanticAttention"])
def test_modules_under_autocast_match_the_official_layers(name):
    ours, theirs, args = next((o, t, a) for n, o, t, a in _module_pairs() if n == name)
    ours.eval(), theirs.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ours(*args), theirs(*args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    with torch.no_grad():
        truth = theirs.double()(*(a.double() for a in args))
    truth = truth if isinstance(truth, tuple) else (truth,)
    for i, (g, w, t) in enumerate(zip(got, want, truth)):
        assert g.dtype == w.dtype, f"output {i}"
        r = compare(f"{name} output {i}", g, t, TOLERANCES[torch.bfloat16][0], w)
        assert r.ok, str(r)


def test_compiled_under_autocast_equals_eager_under_autocast():
    torch.manual_seed(0)
    m = semask_fast.nn.WindowAttention(32, 2, window_size=4, backend="reference").eval()
    x = torch.randn(4, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = m(x)
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    assert_close(compiled, eager, tol=EXACT)


def test_unknown_autocast_field_is_refused():
    from semask_fast.ops._library import Autocast, OpSpec
    from semask_fast.ops.semantic_attention import SemanticAttentionInputs

    with pytest.raises(ValueError, match="autocast names \\['q'\\]"):
        OpSpec("autocast_probe", SemanticAttentionInputs, outputs=("out",), outputs_like=lambda inp: (),
               reference=lambda inp, keep: (), autocast=Autocast(lowered=("q",)))
    assert "autocast_probe" not in SPECS
