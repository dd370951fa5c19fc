"""Autograd behaves as for PyTorch's own ops, on every backend: saved tensors go through
``save_for_backward`` (version counter, saved-tensor hooks, non-reentrant checkpointing),
``needs_input_grad`` reaches the implementation, double backward raises, and dropout draws
its seed from torch's generator (``torch.manual_seed`` reproduces it, each call advances it).
"""

import pytest
import torch
import torch.utils.checkpoint

import semask_fast
from semask_fast import record_dispatch
from semask_fast.backends import registry
from semask_fast.ops.window_attention import WindowAttentionInputs
from semask_fast.testing import TOLERANCES
from tests.conftest import require_backend

#: Backends these tests run on (kernel backends skip where they cannot run here).
BACKENDS = ["cpu", "reference", "triton"]


def _window_inputs(device, table_grad=True):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 16, 16, generator=g).to(device).requires_grad_() for _ in range(3))
    table = (torch.randn(49, 2, generator=g) * 0.1).to(device).requires_grad_(table_grad)
    return q, k, v, table


def _window_attention(q, k, v, table, backend, dropout_p=0.0):
    return semask_fast.window_attention(q, k, v, table, window_size=4, shift_size=2, grid=(2, 2),
                                        dropout_p=dropout_p, backend=backend)


def _device(backend):
    return require_backend("window_attention", backend)


def _close(actual, expected, what):
    tol = TOLERANCES[torch.float32][1]
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_change_of_an_input_after_forward_raises(backend):
    q, k, v, table = _window_inputs(_device(backend))
    qq = q * 1  # a non-leaf, which may be changed in place
    out = _window_attention(qq, k, v, table, backend)
    with torch.no_grad():
        qq.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensor_hooks_see_every_saved_tensor(backend):
    q, k, v, table = _window_inputs(_device(backend))
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return t

    def unpack(t):
        unpacked.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = _window_attention(q, k, v, table, backend)
    ptrs = {t.data_ptr() for t in packed}
    # The inputs themselves and the output are saved (not copies kept on the side).
    assert {t.data_ptr() for t in (q, k, v, table, out)} <= ptrs
    residuals = len(registry.implementation("window_attention", backend).residuals_like(
        WindowAttentionInputs(
            q=q, k=k, v=v, bias_table=table, mask=None, window_size=(4, 4), shift_size=(2, 2), grid=(2, 2),
            scale=0.25, mask_value=-100.0, dropout_p=0.0)))
    assert len(packed) == 4 + 1 + residuals + 1  # q, k, v, table (mask is None), out, residuals, seed
    out.sum().backward()
    assert len(unpacked) == len(packed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_reentrant_checkpoint_recomputes_and_matches(backend):
    q, k, v, table = _window_inputs(_device(backend))

    def block(q, k, v, table):
        return (_window_attention(q, k, v, table, backend, dropout_p=0.3).tanh() ** 2).sum()

    torch.manual_seed(5)
    block(q, k, v, table).backward()
    want = [t.grad.clone() for t in (q, k, v, table)]
    for t in (q, k, v, table):
        t.grad = None
    torch.manual_seed(5)
    with record_dispatch() as ran:
        torch.utils.checkpoint.checkpoint(block, q, k, v, table, use_reentrant=False).backward()
    # Recomputed in backward with the same dropout seed (checkpoint restores the RNG state).
    assert ran == [("window_attention", backend, "forward")] * 2 + [("window_attention", backend, "backward")]
    for name, g, t in zip("q k v table".split(), want, (q, k, v, table)):
        _close(t.grad, g, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_told_which_inputs_need_a_gradient(backend, monkeypatch):
    device = _device(backend)
    impl = registry.implementation("window_attention", backend)
    seen = []
    real = type(impl).backward

    def spy(self, inp, outputs, residuals, grad_outputs, needs, seed):
        seen.append(tuple(needs))
        return real(self, inp, outputs, residuals, grad_outputs, needs, seed)

    monkeypatch.setattr(type(impl), "backward", spy)
    q, k, v, table = _window_inputs(device, table_grad=False)  # a frozen bias table
    k.requires_grad_(False)
    _window_attention(q, k, v, table, backend).sum().backward()
    assert seen == [(True, False, True, False)]
    assert q.grad is not None and v.grad is not None and k.grad is None and table.grad is None
    # What was computed equals the full backward's gradients.
    q2, k2, v2, table2 = _window_inputs(device)
    _window_attention(q2, k2, v2, table2, backend).sum().backward()
    _close(q.grad, q2.grad, "dq")
    _close(v.grad, v2.grad, "dv")


def test_no_backward_runs_when_nothing_needs_a_gradient():
    q, k, v, table = (t.detach() for t in _window_inputs("cpu"))
    with record_dispatch() as ran:
        out = _window_attention(q, k, v, table, "reference")
    assert not out.requires_grad and ran == [("window_attention", "reference", "forward")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_a_clear_error(backend):
    q, k, v, table = _window_inputs(_device(backend))
    out = _window_attention(q, k, v, table, backend)
    (dq,) = torch.autograd.grad((out ** 2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="window_attention: double backward .* is not supported"):
        dq.sum().backward()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck_float64(backend):
    device = require_backend("semantic_attention", backend)
    g = torch.Generator().manual_seed(0)
    sq, sk, yv = (torch.randn(2, 5, n, generator=g, dtype=torch.float64).to(device).requires_grad_()
                  for n in (4, 4, 3))
    assert torch.autograd.gradcheck(lambda a, b, c: semask_fast.semantic_attention(a, b, c, backend=backend),
                                    (sq, sk, yv))


# --------------------------------------------------------------------------- #
# Dropout seed from torch's generator
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_follows_manual_seed_and_advances(backend):
    q, k, v, table = (t.detach() for t in _window_inputs(_device(backend)))
    torch.manual_seed(11)
    first = _window_attention(q, k, v, table, backend, dropout_p=0.5)
    second = _window_attention(q, k, v, table, backend, dropout_p=0.5)
    torch.manual_seed(11)
    again = _window_attention(q, k, v, table, backend, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_dropout_seed_is_the_generators_next_draw():
    q, k, v, table = (t.detach() for t in _window_inputs("cpu"))
    torch.manual_seed(3)
    _window_attention(q, k, v, table, "reference", dropout_p=0.5)
    after_op = torch.randint(0, 2 ** 62, (), dtype=torch.int64)
    torch.manual_seed(3)
    semask_fast.backends.draw_seed(torch.device("cpu"), 2 ** 62)
    assert torch.equal(after_op, torch.randint(0, 2 ** 62, (), dtype=torch.int64))  # one draw per call


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_that_read_the_seed_from_memory_get_the_drawn_tensor(backend, monkeypatch):
    # What a CUDA-graph replay relies on: the seed is a tensor on the inputs' device, drawn by a
    # random op (refilled on replay), and a seed_on_device implementation receives that tensor in
    # forward and backward, not a host copy of its value.
    device = _device(backend)
    impl = registry.implementation("window_attention", backend)
    seen = []
    for name in ("forward", "backward"):
        original = getattr(type(impl), name)
        monkeypatch.setattr(type(impl), name, lambda self, *a, _f=original: (seen.append(a[-1]), _f(self, *a))[1])
    q, k, v, table = _window_inputs(device)
    torch.manual_seed(5)
    _window_attention(q, k, v, table, backend, dropout_p=0.5).sum().backward()
    torch.manual_seed(5)
    drawn = semask_fast.backends.draw_seed(torch.device(device), impl.seed_bound)
    assert len(seen) == 2
    for seed in seen:
        if impl.seed_on_device:
            assert isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.device == drawn.device
            assert torch.equal(seed, drawn)
        else:
            assert seed == int(drawn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replays_draw_fresh_dropout_masks(backend):
    device = require_backend("window_attention", backend)
    q, k, v, table = (t.detach() for t in _window_inputs(device))
    _window_attention(q, k, v, table, backend, dropout_p=0.5)  # compile and load outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _window_attention(q, k, v, table, backend, dropout_p=0.5)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)


def test_no_dropout_leaves_the_generator_alone():
    q, k, v, table = (t.detach() for t in _window_inputs("cpu"))
    torch.manual_seed(3)
    _window_attention(q, k, v, table, "reference")
    drawn = torch.rand(())
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(()))


def _case_id(case):
    return f"{case.op}-{case.name.split(',')[0].replace(' ', '_')}"


@pytest.mark.parametrize("case", [c for c in semask_fast.testing.small_cases() if not c.exact], ids=_case_id)
def test_kernels_compute_each_gradient_alone(case, kernel_backend):
    # needs_input_grad reaches every kernel as flags (it skips the gradients not needed); asking for
    # one input's gradient at a time must give what the full backward gives.
    backend = kernel_backend
    device = require_backend(case.op, backend)
    tensors = {k: (v.float().to(device) if v is not None else None)
               for k, v in case.tensors(torch.Generator().manual_seed(1)).items()}

    def grads(wanted):
        leaves = {k: (v.clone().requires_grad_(k in wanted) if v is not None else None) for k, v in tensors.items()}
        with record_dispatch() as ran:
            outs = case.fn(backend, **leaves)
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            got = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(outs)), [leaves[k] for k in wanted])
        assert (case.op, backend, "backward") in ran
        return dict(zip(wanted, got))

    full = grads(case.grad_names)
    for name in case.grad_names:
        _close(grads((name,))[name], full[name], f"{case.op}: d{name} alone")
