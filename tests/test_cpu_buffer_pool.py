"""The native cpu kernels' buffer pool (csrc/cpu/sf_cpu.h, BufferPool): a large output's storage is
reused once nothing refers to it, never while a tensor or view of it lives, and the pool can be
turned off."""

import torch
from torch.profiler import ProfilerActivity, profile

import semask_fast
from semask_fast.backends.base import record_dispatch
from tests.conftest import require_backend

OP = "window_attention"


def _inputs(seed: int):
    # 256 windows x 3 heads x 49 x 32 fp32: a 4.8 MB output, over the pool's 4 MiB threshold.
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(256, 3, 49, 32, generator=gen) for _ in range(3)] + [torch.randn(169, 3, generator=gen)]


def _attention(q, k, v, table):
    with torch.no_grad(), record_dispatch() as ran:
        out = semask_fast.window_attention(q, k, v, table, window_size=7, backend="cpu")
    assert ran == [(OP, "cpu", "forward")]
    return out


def test_released_output_storage_is_reused():
    require_backend(OP, "cpu")
    first = _attention(*_inputs(0))
    address = first.data_ptr()
    del first
    assert _attention(*_inputs(1)).data_ptr() == address


def test_live_output_and_views_are_never_overwritten():
    require_backend(OP, "cpu")
    first = _attention(*_inputs(0))
    kept = first.clone()
    view = first[1:]  # the view alone keeps the storage
    del first
    second = _attention(*_inputs(1))
    assert second.data_ptr() != view.data_ptr() - view.element_size() * view.storage_offset()
    assert torch.equal(view, kept[1:])
    assert not torch.equal(second, kept)


def _allocated_output(monkeypatch, pool_mib: str) -> bool:
    """Whether a call after a released output allocates its output from torch's allocator."""
    monkeypatch.setenv("SEMASK_FAST_CPU_POOL_MIB", pool_mib)
    inputs = _inputs(0)
    released = _attention(*inputs)
    nbytes = released.nbytes
    del released
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _attention(*inputs)
    return any(e.name() == "[memory]" and e.nbytes() >= nbytes for e in prof.profiler.kineto_results.events())


def test_pool_can_be_turned_off(monkeypatch):
    require_backend(OP, "cpu")
    assert not _allocated_output(monkeypatch, "256")
    assert _allocated_output(monkeypatch, "0")
