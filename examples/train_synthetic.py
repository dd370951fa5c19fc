"""Train any registered model on synthetic images and labels, on whatever device exists.

    python examples/train_synthetic.py --model semask_swin_tiny --steps 20
    python examples/train_synthetic.py --model NAME --steps N --batch 4 --size 512 --device cuda --backend auto

The labels are a fixed random map of coarse blocks per image, so the loss goes down; the
progress bar shows the loss and the images per second.  ``--cfg key=value`` overrides the
model's config (e.g. ``--cfg depths=[1,1,1,1]``); values are Python literals.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from semask_fast.models import create, list_models


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=f"one of: {', '.join(list_models())}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=256, help="square image side")
    p.add_argument("--num-classes", type=int, default=150)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="auto, cuda, triton, cpu or reference")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CPU) / fp16 with a grad scaler (CUDA)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.size < 1:
        p.error("--steps, --batch and --size must be positive")
    return args


def model_cfg(pairs) -> dict:
    cfg = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--cfg expects KEY=VALUE, got {pair!r}")
        try:
            cfg[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            cfg[key] = value
    return cfg


def synthetic_batch(batch: int, size: int, num_classes: int, device, generator) -> tuple:
    """Images whose colour depends on a block label map: learnable, so the loss falls."""
    coarse = torch.randint(0, num_classes, (batch, 1, max(1, size // 32), max(1, size // 32)), generator=generator)
    labels = F.interpolate(coarse.float(), size=(size, size), mode="nearest").long()[:, 0]
    palette = torch.randn(num_classes, 3, generator=generator)
    images = palette[labels].permute(0, 3, 1, 2) + 0.1 * torch.randn(batch, 3, size, size, generator=generator)
    return images.to(device), labels.to(device)


def main(argv=None) -> list:
    """Runs the training; returns the loss of every step."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = create(args.model, num_classes=args.num_classes, backend=args.backend, **model_cfg(args.cfg))
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    cuda_amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda_amp)
    autocast = (torch.autocast(device.type, dtype=torch.float16 if cuda_amp else torch.bfloat16)
                if args.amp else contextlib.nullcontext())
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = synthetic_batch(args.batch, args.size, args.num_classes, device, gen)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.model}: {n_params:.1f}M parameters, {args.batch}x3x{args.size}x{args.size} on {device}, "
          f"backend={args.backend}")
    losses = []
    bar = tqdm(range(args.steps), unit="step")
    for _ in bar:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model.loss(images, labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())  # synchronises the device, so the timing below is the step's
        bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{args.batch / (time.perf_counter() - start):.1f}")
    return losses


if __name__ == "__main__":
    main()
