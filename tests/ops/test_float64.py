"""float64 parity of the cpu kernels, every op: outputs and every gradient against the float64
reference within ``TOLERANCES[torch.float64]``.

gradcheck (run per op on the cpu kernels) compares the kernels with their own finite differences,
so it cannot see a constant rounded to fp32 inside a float64 kernel (as d^-0.5 and 1/(1-p) once
were: outputs 5e-8 off); this suite can.
"""

import pytest
import torch

import semask_fast
from semask_fast.testing import assert_parity
from tests.conftest import require_backend


def _case_id(case):
    return f"{case.op}-{case.name.split(',')[0].replace(' ', '_')}"


@pytest.mark.parametrize("case", semask_fast.testing.small_cases(), ids=_case_id)
def test_cpu_float64_equals_the_reference(case):
    require_backend(case.op, "cpu")
    tensors = case.tensors(torch.Generator().manual_seed(4))
    assert_parity(case.fn, tensors, case.grad_names, torch.float64, backend="cpu", op=case.op, exact=case.exact)
