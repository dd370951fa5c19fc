"""The ops inside ``torch.compile``: the kernel call is a graph break (dynamo does not trace into
the launchers, Triton's interpreter or the extension ops), the code around it is compiled, and the
compiled function computes what the eager one does, forward and backward, on the kernel backend.

``backend="aot_eager"`` runs dynamo and AOTAutograd (where an untraceable op would fail) without
inductor's C++ code generation, which would only slow this test down.
"""

import subprocess
import sys

import pytest
import torch

import semask_fast
from semask_fast import record_dispatch
from tests.conftest import require_backend


def _window_attention(device):
    t = {name: torch.randn(2, 2, 49, 16, device=device) for name in ("q", "k", "v")}
    t["table"] = torch.randn(169, 2, device=device) * 0.1
    return t, lambda q, k, v, table, backend: semask_fast.window_attention(
        q, k, v, table, window_size=7, shift_size=3, grid=(1, 2), backend=backend)


def _window_partition(device):
    return {"x": torch.randn(1, 10, 12, 8, device=device)}, lambda x, backend: semask_fast.window_partition(
        x, 7, 3, backend=backend)


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
    "shifted_window_attention": _shifted_window_attention,
    "semantic_attention": _semantic_attention,
    "atm_attention": _atm_attention,
    "mask_similarity": _mask_similarity,
}


@pytest.mark.parametrize("op", list(CASES))
def test_compiled_function_matches_eager(kernel_backend, op):
    device = require_backend(op, kernel_backend)
    tensors, call = CASES[op](device)

    def loss(**t):
        # Compiled code on both sides of the op, so dynamo has a graph to build around the break.
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
    value, grads, ran = run(torch.compile(loss, backend="aot_eager"))
    assert ran == [(op, kernel_backend, "forward"), (op, kernel_backend, "backward")]
    torch.testing.assert_close(value, want_value, rtol=1e-5, atol=1e-5)
    for name in tensors:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_importing_the_package_imports_neither_triton_nor_dynamo():
    # Triton's interpreter is chosen by TRITON_INTERPRET before triton is imported (the CLI sets it
    # after importing semask_fast): an import of dynamo (which imports triton) at package import,
    # e.g. a module-level torch.compiler.disable, broke every nested @triton.jit call under it.
    code = "import sys, semask_fast; print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
