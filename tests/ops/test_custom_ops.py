"""Every op is a ``torch.library`` custom op that passes ``torch.library.opcheck`` (schema, autograd
registration, fake implementation against the real one, AOTAutograd with dynamic shapes, forward
and backward) on every backend that can run here, on the small cases of ``semask_fast.testing``.
"""

import pytest
import torch

import semask_fast
from semask_fast import record_dispatch
from semask_fast.ops import SPECS
from semask_fast.testing import small_cases
from tests.conftest import require_backend

#: Backends opcheck runs on: the kernel backends (Triton and the SIMT harness on small cases) and the reference.
BACKENDS = ["cpu", "reference", "triton", "cuda", pytest.param("simt", marks=pytest.mark.harness)]

CASES = {f"{case.op}: {case.name}": case for case in small_cases()}


def _op_arguments(case, backend, monkeypatch):
    """The custom op's arguments for ``case`` (recorded from the public function's call)."""
    spec = SPECS[case.op]
    calls = []
    real = spec.forward_op

    def recorder(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(spec, "forward_op", recorder)
    tensors = {n: None if t is None else t.float().requires_grad_(n in case.grad_names)
               for n, t in case.tensors(torch.Generator().manual_seed(0)).items()}
    case.fn(backend=backend, **tensors)
    monkeypatch.undo()
    (args,) = calls
    return spec, args


def test_every_op_is_a_custom_op_in_the_semask_fast_namespace():
    assert [case.op for case in small_cases()] and set(SPECS) == {case.op for case in small_cases()}
    for name, spec in SPECS.items():
        assert getattr(torch.ops.semask_fast, name).default is spec.forward_op._opoverload
        assert getattr(torch.ops.semask_fast, f"{name}_backward").default is spec.backward_op._opoverload
        assert str(spec.forward_op._opoverload._schema).endswith("str backend) -> Tensor[]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case, backend, monkeypatch):
    case = CASES[case]
    device = require_backend(case.op, backend)
    spec, args = _op_arguments(case, backend, monkeypatch)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    with record_dispatch() as ran:
        results = torch.library.opcheck(spec.forward_op, args)
    assert all(r == "SUCCESS" for r in results.values()), results
    assert {b for _, b, _ in ran} == {backend}
    assert {phase for _, _, phase in ran} == {"forward", "backward"}


def test_schema_types_follow_the_input_fields():
    schema = str(SPECS["window_merge"].forward_op._opoverload._schema)
    # Image sizes may be symbolic under dynamic shapes; window geometry is a static int list.
    assert "SymInt H, SymInt W" in schema and "int[] window_size" in schema
    schema = str(SPECS["window_attention"].forward_op._opoverload._schema)
    assert "Tensor? bias_table" in schema and "SymInt[]? grid" in schema and "float dropout_p" in schema
    backward = str(SPECS["window_attention"].backward_op._opoverload._schema)
    assert backward.startswith("semask_fast::window_attention_backward(Tensor?[] grads, Tensor q")
    assert backward.endswith("str backend, bool[] needs) -> Tensor[]")


def test_fake_residuals_follow_the_selected_backend():
    """The fake implementation selects as the real one does, so its residuals match the backend's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    require_backend("semantic_attention", "cpu")
    args = [torch.randn(2, 6, k, dtype=torch.float16) for k in (5, 5, 7)]
    real = torch.ops.semask_fast.semantic_attention(*args, "cpu")
    with FakeTensorMode() as mode:
        fake = torch.ops.semask_fast.semantic_attention(*(mode.from_tensor(a) for a in args), "cpu")
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    assert len(real) == 3  # output, logsumexp and the float32 output of which the output is the rounding


def test_public_function_returns_only_the_outputs():
    q = torch.randn(1, 2, 5, 8)
    out = semask_fast.atm_attention(q, torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), backend="reference")
    assert isinstance(out, tuple) and [t.shape for t in out] == [(1, 2, 5, 8), (1, 5, 6)]
