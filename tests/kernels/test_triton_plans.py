"""The Triton launchers' contract, for every op module at once.

Every op module of ``semask_fast.kernels`` has ``<op>_forward`` / ``<op>_backward``
(allocate and return; dropout seed given by the caller) and ``forward_plan`` /
``backward_plan`` (``interpreter=False``: the tiles compiled for GPUs, which the
interpreter runs here too).  Each op's launchers, called directly with explicit plans
(GPU tiles, windows per program, dropout, adversarial inputs), are tested in the
"triton launchers" section of tests/ops/test_<op>.py with the helpers of
tests/kernels/_launch_parity.py; they replace the tests that monkeypatched
``INTERPRETER_TILES`` / ``MULTI_TILE`` and the ``windows_per_program=`` / ``wpp=``
overrides.  What holds for every module is tested here.
"""

import pytest
import torch

from tests.kernels._launch_parity import kernels


@pytest.mark.parametrize("module", ["window_attention", "atm_attention", "semantic_attention", "mask_similarity"])
def test_interpreter_plans_only_grow_tiles(module):
    """``interpreter=True`` (the default here) only makes tiles larger: the same kernels and tile names."""
    k = kernels(module)
    shapes = {"atm_attention": (4, 150, 400, 32), "semantic_attention": (2, 49, 150, 96),
              "mask_similarity": (400, 150, 64)}
    args = (k.Geometry((7, 7), 4, 2, 32),) if module == "window_attention" else shapes[module]
    for make in (k.forward_plan, k.backward_plan):
        gpu, interp = make(*args, torch.float16, interpreter=False), make(*args, torch.float16, interpreter=True)
        gpu, interp = (p if isinstance(p, dict) else {"": p} for p in (gpu, interp))
        assert gpu.keys() == interp.keys()
        for part in gpu:
            assert gpu[part].tiles.keys() == interp[part].tiles.keys()
            blocks = [t for t in gpu[part].tiles if t.startswith("BLOCK")]
            assert all(interp[part][t] >= gpu[part][t] for t in blocks), (part, gpu[part], interp[part])
