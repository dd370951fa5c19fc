"""pytest-benchmark of every op on each available backend, beside eager PyTorch.

    python -m pytest benchmarks/test_bench_ops.py --benchmark-enable --benchmark-group-by=param:case

Not part of the test suite (``testpaths = tests``).  On a machine without a GPU
only the eager reference is timed: the Triton interpreter and the SIMT harness
are correctness tools (``python -m semask_fast bench --include-tools`` times
them anyway, labelled).
"""

import pytest
import torch

from semask_fast._bench import bench_cases
from semask_fast.backends import registry

CASES = bench_cases("small")


def _params():
    for case in CASES:
        for backend in registry.BACKENDS:
            yield pytest.param(case, backend, id=f"{case.op}-{backend}")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case,backend", list(_params()))
def test_bench(benchmark, case, backend, mode):
    why = registry.reasons(case.op, backend)
    impl = registry.implementation(case.op, backend)
    device = impl.preferred_device() if impl else None
    if why or backend == "cpu" or (backend == "triton" and device.type == "cpu"):
        pytest.skip("; ".join(why) or "correctness tool, not a speed")
    tensors = case.make(device, torch.float32)
    if mode == "fwd+bwd":
        for t in tensors.values():
            t.requires_grad_()
    benchmark.extra_info.update(case=case.name, backend=backend, mode=mode)

    def step():
        out = case.call(backend, **tensors)
        if mode == "fwd+bwd":
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
