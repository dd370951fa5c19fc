"""Helpers of the tests that run the CUDA C++ sources (csrc/ops/*.cu) through the SIMT harness: the
"cuda sources" sections of tests/ops/test_<op>.py and the shared tests of tests/harness/test_simt.py."""

import concurrent.futures
import importlib

import torch

from semask_fast.backends import registry

BACKEND = "simt"
IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731


def randn(g, *shape, scale=1.0):
    """float64 normal samples from generator g, times scale."""
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def cuda_module(name):
    return importlib.import_module(f"semask_fast.backends.cuda.{name}")


def _spy_library(monkeypatch, op, records):
    """Run ``op``'s harness library as usual and, for each kernel named in ``records``, append
    ``records[name](*arguments)`` (what reached the kernel, tensors as passed) to the returned list."""
    impl = registry.implementation(op, BACKEND)
    lib = impl.library()
    calls = []

    class Spy:
        def __getattr__(self, name):
            kernel = getattr(lib, name)
            if name not in records:
                return kernel

            def spied(*args):
                calls.append(records[name](*args))
                return kernel(*args)

            return spied

    spy = Spy()
    monkeypatch.setattr(impl, "library", lambda: spy)
    return calls


def spy_atm_library(monkeypatch):
    """Record what reaches the harness library's ATM kernels (tensors as passed, the forward's key
    ranges) while still running them; returns the list of calls."""
    return _spy_library(monkeypatch, "atm_attention", {
        "atm_attention_forward": lambda q, k, v, scale, dropout_p, seed, splits: {
            "call": "forward", "q": q, "k": k, "v": v, "splits": splits},
        "atm_attention_backward": lambda dout, dmask, q, k, v, *rest: {
            "call": "backward", "dout": dout, "dmask": dmask, "q": q, "k": k, "v": v},
    })


def spy_window_library(monkeypatch):
    """Record what reaches the harness library's window kernels (tensors as passed, the backward's
    windows per chunk) while still running them; returns the list of calls."""
    return _spy_library(monkeypatch, "window_attention", {
        "window_attention_forward": lambda q, k, v, *rest: {"call": "forward", "q": q, "k": k, "v": v},
        # rest ends with windows_per_chunk, fused, need_dq, need_dkv, need_table.
        "window_attention_backward": lambda dout, q, k, v, out, lse, *rest: {
            "call": "backward", "dout": dout, "q": q, "k": k, "v": v, "per_chunk": rest[-5], "fused": rest[-4]},
    })


def assert_override_is_scoped(override, run, planned):
    """A plan override (a context manager) holds inside its block, nests, restores the outer choice
    and does not reach another thread; run() returns the plan the kernels received."""
    with override(3):
        assert run() == 3
        with override(2):
            assert run() == 2
        assert run() == 3
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert pool.submit(run).result() == planned
    assert run() == planned
