"""pytest-benchmark of the CPU benchmark's cases: every peer and every available semask_fast CPU
backend, forward and forward+backward (the cases, peers and steps of ``python -m semask_fast bench``).

    python -m pytest benchmarks/test_bench_ops.py --benchmark-enable --benchmark-group-by=param:case,param:mode
    SEMASK_FAST_BENCH_SCALE=paper python -m pytest benchmarks/test_bench_ops.py --benchmark-enable ...

Not part of the test suite (``testpaths = tests``).  Small shapes (the paper cases at batch 1) unless
``SEMASK_FAST_BENCH_SCALE=paper``.  Correctness tools (the SIMT harness, Triton's interpreter) are
not timed; compiled peers compile on their first call (pytest-benchmark's calibration absorbs it).
"""

import functools
import os

import pytest
import torch

from semask_fast import _bench

CASES = {c.key: c for c in _bench.bench_cases(os.environ.get("SEMASK_FAST_BENCH_SCALE", "small"))}
_bench.recycle_allocations()  # the allocator as `python -m semask_fast bench` sets it, for every contender


@functools.lru_cache(maxsize=None)
def _contenders(key: str):
    """name -> contender, built once per case so each compiled peer compiles once."""
    return {c.name: c for c in _bench.contenders(CASES[key])}


def _params():
    for key, case in CASES.items():
        names = [p.name for p in case.peers] + [f"semask_fast {b}" for b in _bench.our_backends(case.op)]
        for name in names:
            yield pytest.param(key, name, id=f"{key}-{name}")


@pytest.mark.parametrize("mode", _bench.MODES)
@pytest.mark.parametrize("case,impl", list(_params()))
def test_bench(benchmark, case, impl, mode):
    contender = _contenders(case)[impl]
    if mode == "fwd+bwd" and not contender.backward:
        pytest.skip(contender.note)
    if mode == "fwd" and contender.grads is not None:
        pytest.skip("the same forward as the peer it derives from")
    benchmark.extra_info.update(case=CASES[case].name, impl=impl, kind=contender.kind, mode=mode,
                                gflop=_bench.step_flops(CASES[case].flops, mode) / 1e9)
    step = _bench.Step(contender.fn, CASES[case].make(torch.float32, torch.Generator().manual_seed(0)), mode,
                       contender.grads)
    benchmark(step)
