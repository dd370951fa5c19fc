"""Test configuration shared by every test file.

Without a CUDA device, the Triton kernels run on CPU tensors in Triton's
interpreter: TRITON_INTERPRET must be set before ``semask_fast.kernels`` is
first imported, i.e. here, before any test module is collected.
"""

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from semask_fast.backends import registry  # noqa: E402

#: Kernel backends every op test runs over.  ``cpu`` is the native C++ CPU backend
#: (csrc/cpu); ``simt`` is the CUDA C++ source run by the CPU SIMT harness
#: (``pytest -k harness`` selects it).
KERNEL_BACKENDS = [
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda"),
    pytest.param("cpu", id="cpu"),
    pytest.param("simt", id="simt", marks=pytest.mark.harness),
]

#: Backends that must run here (comma list, e.g. "triton,cpu" in CI): for them a
#: missing backend fails the test instead of skipping it.
REQUIRED_BACKENDS = {b for b in os.environ.get("SEMASK_FAST_REQUIRE_BACKENDS", "").split(",") if b}


def require_toolchain(flavour: str, backend: str) -> None:
    """Skip (or fail, if ``backend`` is required here) when the ``flavour`` build (cuda, simt,
    trace: see ``semask_fast._build``) has no toolchain on this machine."""
    from semask_fast import _build

    reasons = _build.toolchain_reasons(flavour)
    if reasons:
        msg = f"{flavour} build impossible here: " + "; ".join(reasons)
        if backend in REQUIRED_BACKENDS:
            pytest.fail(msg)
        pytest.skip(msg)


def require_backend(op: str, backend: str) -> torch.device:
    """Skip when ``backend`` has no implementation of ``op``; skip (or fail, if the
    backend is required here) when it has one that cannot run on this machine.
    Returns the device its inputs go on."""
    impl = registry.implementation(op, backend)
    if impl is None:
        pytest.skip(f"{backend} has no implementation of {op}")
    why = impl.availability_reasons()
    if why:
        msg = f"{backend} cannot run {op} here: {'; '.join(why)}"
        if backend in REQUIRED_BACKENDS:
            pytest.fail(msg)
        pytest.skip(msg)
    return impl.preferred_device()


@contextlib.contextmanager
def onednn(enabled: bool):
    """oneDNN switched on or off, as a user would (the cpu kernels' matrix-unit products come from it)."""
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved


def cpu_matrix_unit(dtype: torch.dtype) -> bool:
    """Whether the cpu kernels run ``dtype`` on the matrix unit here (AMX; csrc/cpu/sf_cpu_matrix.h)."""
    from semask_fast.backends.cpu import matrix_unit_dtypes

    require_backend("semantic_attention", "cpu")
    return dtype in matrix_unit_dtypes()


def next_seed(backend: str, op: str = "window_attention", device=None) -> int:
    """The dropout seed ``backend``'s implementation draws next for inputs on ``device`` (from
    torch's generator of that device, as the op does): tests call it after ``torch.manual_seed``
    to replay a mask."""
    from semask_fast.backends.base import draw_seed

    return int(draw_seed(torch.device(device or "cpu"), registry.implementation(op, backend).seed_bound))


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request) -> str:
    """Each kernel backend in turn (tests call ``require_backend`` with their op)."""
    return request.param


@pytest.fixture
def semantic_launches(monkeypatch) -> list:
    """The (sq, sk, yv) tensors each Triton semantic_attention forward launch receives (as they reach
    the launcher, to check that views are not copied on the way)."""
    require_backend("semantic_attention", "triton")
    from semask_fast.kernels import semantic_attention as kernels

    seen = []
    launch = kernels.semantic_attention_forward

    def spy(sq, sk, yv, **kw):
        seen.append((sq, sk, yv))
        return launch(sq, sk, yv, **kw)

    monkeypatch.setattr(kernels, "semantic_attention_forward", spy)
    return seen
