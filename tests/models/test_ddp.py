"""A SeMask training step under DistributedDataParallel: 2 CPU processes (gloo).

DDP averages the processes' gradients; the loss (mmseg's mean over every pixel) of half a batch
per process then gives exactly the single-process gradient of the whole batch — provided nothing
in the model depends on which images share a process.  Two things do:

* the head's SyncBN: torch's SyncBatchNorm runs on GPUs only; built in a gloo (CPU) process
  group the model uses BatchNorm2d, each process normalising with its own batch statistics
  (``semask_fast.models.fpn_head.sync_batch_norm``), so the gradient check runs the BN layers on
  their running statistics (eval), and a second check asserts the documented per-process
  behaviour in training mode;
* dropout and drop path draw per process: switched off for the gradient check.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from semask_fast.models import create
from semask_fast.testing import TOLERANCES, assert_close, compare

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CFG = dict(num_classes=21, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), channels=16)
WORLD = 2


def _model():
    model = create("semask_swin_tiny", **CFG).double()
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.semantic_layer.class_injection[0].gamma.fill_(0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _deterministic_train(model):
    """Training mode with BN on running statistics and no dropout / drop path (see the module docstring)."""
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.Dropout, nn.Dropout2d)) or type(m).__name__ == "DropPath":
            m.eval()
    return model


class _Loss(nn.Module):
    """DDP synchronises what its wrapped module's forward computes: here the model's training loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, labels):
        return self.model.loss(images, labels)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        data = torch.load(path, weights_only=True)
        images, labels = data["images"].chunk(WORLD)[rank], data["labels"].chunk(WORLD)[rank]

        # 1. One training step under DDP: the averaged gradients.
        model = _model()
        model.load_state_dict(data["state"])
        ddp = DistributedDataParallel(_Loss(_deterministic_train(model)))
        ddp(images, labels).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}

        # 2. The head's SyncBN on a CPU process: BatchNorm2d, this process's own batch statistics.
        bn = model.decode_head.scale_heads[0][0].bn
        assert type(bn) is nn.BatchNorm2d
        bn.train()
        x = torch.randn(2, bn.num_features, 5, 5, dtype=torch.float64) + rank
        expected = (x - x.mean((0, 2, 3), keepdim=True)) / (x.var((0, 2, 3), unbiased=False, keepdim=True)
                                                            + bn.eps).sqrt()
        before = bn.running_mean.clone()
        out = bn(x)
        assert_close(out, expected * bn.weight[:, None, None] + bn.bias[:, None, None], torch.float64, what="BN")
        assert_close(bn.running_mean, 0.9 * before + 0.1 * x.mean((0, 2, 3)), torch.float64, what="running mean")
        torch.save({"grads": grads, "running_mean": bn.running_mean}, f"{path}.rank{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_step_gives_the_single_process_gradients_of_the_whole_batch(tmp_path):
    torch.manual_seed(0)
    model = _model()
    images = torch.randn(2 * WORLD, 3, 44, 52, dtype=torch.float64)
    labels = torch.randint(0, CFG["num_classes"], (2 * WORLD, 44, 52))
    labels[0, :6] = 255  # ignored pixels on one process only: exact anyway (mean over all pixels)
    path = str(tmp_path / "step.pt")
    torch.save({"state": model.state_dict(), "images": images, "labels": labels}, path)

    _deterministic_train(model).loss(images, labels).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}

    mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD, join=True)

    tol = TOLERANCES[torch.float64][1]
    means = []
    for rank in range(WORLD):
        got = torch.load(f"{path}.rank{rank}", weights_only=True)
        bad = [str(r) for r in (compare(f"rank {rank} d{n}", got["grads"][n], g, tol) for n, g in expected.items())
               if not r.ok]
        assert not bad, bad
        means.append(got["running_mean"])
    assert not torch.allclose(means[0], means[1])  # per-process BN statistics on CPU, as documented
