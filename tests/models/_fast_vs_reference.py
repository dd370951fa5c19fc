"""The fast backend inside a whole model against the reference: same seed and weights, loss and
every parameter gradient within testing.py's tolerances of float64 (fp32, or CPU bf16 autocast)."""

import torch

from semask_fast import record_dispatch
from semask_fast.testing import TOLERANCES, compare


def loss_and_grads(model, images, labels, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(images, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_cpu_backend_matches_reference(build, op, images, labels, autocast):
    """``build(backend, state=None)`` makes the model; ``op`` must run on the cpu backend."""
    base = build("reference")  # the reference in the same precision measures PyTorch's own error
    fast = build("cpu", base.state_dict())
    exact = build("reference", base.state_dict()).double()
    exp_loss, exp_grads = loss_and_grads(exact, images.double(), labels)
    base_loss, base_grads = loss_and_grads(base, images, labels, autocast)
    with record_dispatch() as ran:
        loss, grads = loss_and_grads(fast, images, labels, autocast)
    assert (op, "cpu", "forward") in ran and (op, "cpu", "backward") in ran
    assert all(backend == "cpu" for name, backend, _ in ran if name == op)
    fwd, bwd = TOLERANCES[torch.bfloat16 if autocast else torch.float32]
    assert grads.keys() == exp_grads.keys() and len(grads) > 10
    results = [compare("loss", loss, exp_loss, fwd, base_loss)]
    results += [compare(f"d{n}", g, exp_grads[n], bwd, base_grads[n]) for n, g in grads.items()]
    bad = [str(r) for r in results if not r.ok]
    assert not bad, bad
