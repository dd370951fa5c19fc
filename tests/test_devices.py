"""Devices, with mocked GPUs: kernels launch on the inputs' device; compute capability and shared
memory are checked on the inputs' device, not the current one; the CUDA build carries PTX for
GPUs newer than its machine code (or, without PTX, declares them unsupported, so that
``backend="auto"`` falls back instead of failing with "no kernel image")."""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import semask_fast
from semask_fast import _build
from semask_fast.backends import BackendNotSupportedError, base, registry
from semask_fast.backends import cuda as cuda_backend
from semask_fast.backends import triton as triton_backend
from semask_fast.ops import SPECS
from semask_fast.ops.semantic_attention import SemanticAttentionInputs


@pytest.fixture
def gpus(monkeypatch):
    """Mocks the CUDA devices: ``gpus({0: (7, 5), 1: (9, 0)})`` makes cuda:0 a 7.5 and cuda:1 a 9.0
    GPU, current device 0; Triton is taken off its interpreter."""
    def install(capabilities, smem=None):
        def capability(device=None):
            index = torch.device(device).index if device is not None else 0
            return capabilities[0 if index is None else index]

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
        monkeypatch.setattr(triton_backend, "interpreting", lambda: False)

    return install


def _semantic_inputs(device):
    with FakeTensorMode():
        sq, sk, yv = (torch.empty(2, 16, c, device=device) for c in (8, 8, 12))
    return SemanticAttentionInputs(sq=sq, sk=sk, yv=yv)


def test_triton_capability_is_checked_on_the_inputs_device(gpus):
    gpus({0: (7, 5), 1: (9, 0)})
    impl = registry.implementation("semantic_attention", "triton")
    assert triton_backend.triton_reasons() == []  # cuda:1 can run the kernels
    assert impl.not_supported_reasons(_semantic_inputs("cuda:1")) == []
    (reason,) = impl.not_supported_reasons(_semantic_inputs("cuda:0"))
    assert reason == "cuda:0: compute capability 7.5 (needs >= 8.0)"


def test_triton_unavailable_when_no_device_can_run_it(gpus):
    gpus({0: (7, 5), 1: (7, 0)})
    assert triton_backend.triton_reasons() == ["cuda:0: compute capability 7.5 (needs >= 8.0)",
                                               "cuda:1: compute capability 7.0 (needs >= 8.0)"]


def test_auto_skips_the_backends_the_inputs_device_cannot_run(gpus, monkeypatch):
    gpus({0: (9, 0), 1: (7, 5)})
    monkeypatch.setattr(cuda_backend.CudaImpl, "build_reasons", lambda self: ["nvcc not found (mocked)"])
    assert registry.select("semantic_attention", _semantic_inputs("cuda:0"), "auto").backend == "triton"
    with pytest.warns(RuntimeWarning, match="triton: cuda:1: compute capability 7.5"):
        assert registry.select("semantic_attention", _semantic_inputs("cuda:1"), "auto").backend == "reference"
    with pytest.raises(BackendNotSupportedError, match="cuda:1: compute capability 7.5"):
        registry.select("semantic_attention", _semantic_inputs("cuda:1"), "triton")


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_cuda_build_runs_on_every_gpu_from_sm80(capability):
    assert _build.cuda_arch_reasons(capability) == []


def test_cuda_build_embeds_ptx_for_its_newest_target():
    newest = _build.CUDA_ARCHS[-1]
    assert _build.CUDA_PTX_ARCH == newest
    assert f"-gencode=arch=compute_{newest},code=compute_{newest}" in _build.CUDA_CFLAGS
    for arch in _build.CUDA_ARCHS:
        assert f"-gencode=arch=compute_{arch},code=sm_{arch}" in _build.CUDA_CFLAGS


def test_without_ptx_newer_gpus_are_declared_unsupported(monkeypatch):
    monkeypatch.setattr(_build, "CUDA_PTX_ARCH", None)
    assert _build.cuda_arch_reasons((8, 6)) == []  # sm_80 machine code runs on every 8.x
    (reason,) = _build.cuda_arch_reasons((10, 0))
    assert reason.startswith("compute capability 10.0: the kernels are built as machine code for sm_80, sm_90, no PTX")
    assert _build.cuda_arch_reasons((7, 5))


def test_cuda_backend_checks_the_inputs_device(gpus, monkeypatch):
    gpus({0: (12, 0), 1: (7, 5)})
    monkeypatch.setattr(_build, "CUDA_PTX_ARCH", None)
    impl = registry.implementation("semantic_attention", "cuda")
    assert impl.device_reasons(torch.device("cuda", 1)) == ["cuda:1: compute capability 7.5 (needs >= 8.0)"]
    (reason,) = impl.device_reasons(torch.device("cuda", 0))
    assert reason.startswith("cuda:0: compute capability 12.0") and "no PTX" in reason
    assert cuda_backend.cuda_device_reasons() == [impl.device_reasons(torch.device("cuda", i))[0] for i in (0, 1)]
    monkeypatch.setattr(_build, "CUDA_PTX_ARCH", "90")
    assert cuda_backend.cuda_device_reasons() == []  # cuda:0 runs the PTX
    assert impl.device_reasons(torch.device("cuda", 0)) == []


def test_atm_split_plan_reads_the_inputs_device(gpus, monkeypatch):
    # The plan's multiprocessor count is the inputs' device's; the shared-memory limit is read by
    # the C++ side from the inputs' device (atm_attention_shared_memory, tested in the harness).
    from semask_fast.backends.cuda import atm_attention as cuda_atm

    gpus({0: (9, 0), 1: (8, 6)})

    class Props:
        def __init__(self, sms):
            self.multi_processor_count = sms

    sms = {0: 132, 1: 20}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props(sms[torch.device(device).index]))
    cuda_atm._multiprocessors.cache_clear()
    try:
        assert cuda_atm._multiprocessors(torch.device("cuda", 0)) == 132
        assert cuda_atm._multiprocessors(torch.device("cuda", 1)) == 20
    finally:
        cuda_atm._multiprocessors.cache_clear()


# --------------------------------------------------------------------------- #
# Launches happen under the inputs' device
# --------------------------------------------------------------------------- #
def test_on_device_makes_a_cuda_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with base.on_device(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with base.on_device(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_every_implementation_runs_under_its_inputs_device(monkeypatch):
    """Forward and backward of every op (any backend: Triton and CUDA launch on the current
    device) run inside ``on_device(inputs' device)``."""
    from semask_fast.ops import _library

    active, seen = [], []

    @contextlib.contextmanager
    def recorder(device):
        active.append(device)
        yield
        active.pop()

    real_select = registry.select

    def select(op, inp, backend):
        impl = real_select(op, inp, backend)

        class Spy(type(impl)):
            def forward(self, inp, seed):
                seen.append((op, "forward", list(active)))
                return super().forward(inp, seed)

            def backward(self, inp, *args):
                seen.append((op, "backward", list(active)))
                return super().backward(inp, *args)

        return Spy()

    monkeypatch.setattr(_library, "on_device", recorder)
    monkeypatch.setattr(registry, "select", select)
    q = torch.randn(2, 1, 16, 8, requires_grad=True)
    semask_fast.window_attention(q, q, q, window_size=4, backend="reference").sum().backward()
    assert seen == [("window_attention", "forward", [q.device]), ("window_attention", "backward", [q.device])]
    assert set(SPECS)  # every op goes through the same OpSpec.run_forward / run_backward


@pytest.mark.parametrize("version, available", [("3.6.0", False), ("3.8.0", True), ("4.0.1", True)])
def test_triton_interpreter_declares_the_triton_it_needs(monkeypatch, version, available):
    """Triton 3.6's interpreter cannot run the kernels (seen beside the first GPU run): the triton
    backend on CPU tensors says so instead of failing inside a kernel."""
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(triton_backend, "interpreting", lambda: True)
    reasons = triton_backend.triton_reasons()
    assert (reasons == []) == available
    if not available:
        assert reasons == [f"Triton {version}'s interpreter cannot run these kernels (needs Triton >= 3.8; "
                           "compiled kernels on a GPU are unaffected)"]
        assert registry.reasons("semantic_attention", "triton") == reasons
