"""pytest-benchmark of every op on each available backend and each peer, beside eager PyTorch.

    python -m pytest benchmarks/test_bench_ops.py --benchmark-enable --benchmark-group-by=param:case

Not part of the test suite (``testpaths = tests``).  On a machine without a GPU
only the eager reference and the peers are timed: the Triton interpreter and the
SIMT harness are correctness tools (``python -m semask_fast bench --include-tools``
times them anyway, labelled).
"""

import pytest
import torch

from semask_fast._bench import bench_cases, make_step
from semask_fast.backends import registry

CASES = bench_cases("small")


def _run(benchmark, call, tensors, mode, device):
    benchmark(make_step(call, tensors, mode, device))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case,backend", [pytest.param(c, b, id=f"{c.op}-{b}") for c in CASES
                                          for b in registry.BACKENDS])
def test_bench(benchmark, case, backend, mode):
    why = registry.reasons(case.op, backend)
    impl = registry.implementation(case.op, backend)
    device = impl.preferred_device() if impl else None
    if why or backend == "cpu" or (backend == "triton" and device.type == "cpu"):
        pytest.skip("; ".join(why) or "correctness tool, not a speed")
    benchmark.extra_info.update(case=case.name, backend=backend, mode=mode)
    _run(benchmark, lambda **t: case.call(backend, **t), case.make(device, torch.float32), mode, device)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case,peer", [pytest.param(c, name, id=f"{c.op}-peer-{name}")
                                       for c in CASES for name in c.peers])
def test_bench_peer(benchmark, case, peer, mode):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    benchmark.extra_info.update(case=case.name, backend=f"peer: {peer}", mode=mode)
    _run(benchmark, case.peers[peer], case.make(device, torch.float32), mode, device)
