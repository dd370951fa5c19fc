"""Window roll/pad/partition and its inverse: the public ops and their inputs."""

from __future__ import annotations

import dataclasses

import torch

from .. import reference as ref
from ._common import OpInputs, Pair, SymInt, check_bool, check_size, check_tensor, check_window_geometry, is_int
from ._library import OpSpec


def padded_grid(H: int, W: int, window_size: Pair) -> Pair:
    """(nWh, nWw): windows per image after padding H x W to window multiples."""
    return -(-H // window_size[0]), -(-W // window_size[1])


@dataclasses.dataclass(frozen=True)
class WindowPartitionInputs(OpInputs):
    x: torch.Tensor
    window_size: Pair
    shift_size: Pair
    pad_then_roll: bool

    grad_fields = ("x",)


@dataclasses.dataclass(frozen=True)
class WindowMergeInputs(OpInputs):
    windows: torch.Tensor  # always (B*nW, Wh, Ww, C)
    window_size: Pair
    shift_size: Pair
    H: SymInt
    W: SymInt
    pad_then_roll: bool

    grad_fields = ("windows",)


def window_partition(x: torch.Tensor, window_size, shift_size=0, pad_then_roll: bool = True,
                     backend: str = "auto") -> torch.Tensor:
    """Pad to window multiples, roll by -shift, and cut into windows.

    Args:
        x: (B, H, W, C) tokens, any H and W.
        window_size: Wh, Ww (int or pair).
        shift_size: cyclic shift (int or pair), each < the window.
        pad_then_roll: True pads (with zeros) then rolls, as the segmentation Swin
            that SeMask builds on; False rolls then pads, as timm (SPEC.md section 1).
        backend: ``"auto"`` or a backend name.

    Returns:
        (B*nW, Wh, Ww, C) windows, window index fastest, windows row-major.
    """
    check_tensor("x", x, 4, "(B, H, W, C)")
    for dim, what in ((1, "H"), (2, "W"), (3, "C")):
        check_size("x", x, dim, what)
    ws, shift = check_window_geometry(window_size, shift_size)
    return PARTITION(backend, x=x, window_size=ws, shift_size=shift,
                     pad_then_roll=check_bool("pad_then_roll", pad_then_roll))[0]


def window_merge(windows: torch.Tensor, window_size, shift_size, H: int, W: int, pad_then_roll: bool = True,
                 backend: str = "auto") -> torch.Tensor:
    """Exact inverse of :func:`window_partition`: merge windows, un-roll, crop.

    Args:
        windows: (B*nW, Wh, Ww, C) or (B*nW, N, C).
        window_size, shift_size, pad_then_roll: as given to :func:`window_partition`.
        H, W: the unpadded image size.

    Returns:
        (B, H, W, C).
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() not in (3, 4):
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows must have shape (B*nW, Wh, Ww, C) or (B*nW, N, C), got {shape}")
    check_tensor("windows", windows, windows.dim(), "(B*nW, Wh, Ww, C)")
    check_size("windows", windows, windows.dim() - 1, "C")
    ws, shift = check_window_geometry(window_size, shift_size)
    for name, size in (("H", H), ("W", W)):
        if not is_int(size) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if windows.dim() == 3:
        if windows.shape[1] != ws[0] * ws[1]:
            raise ValueError(f"windows must have N = {ws[0] * ws[1]} tokens for window_size={ws}, "
                             f"got shape {tuple(windows.shape)}")
        windows = windows.view(windows.shape[0], ws[0], ws[1], windows.shape[2])
    elif tuple(windows.shape[1:3]) != ws:
        raise ValueError(f"windows must have window dims {ws}, got shape {tuple(windows.shape)}")
    nwh, nww = padded_grid(H, W, ws)
    if windows.shape[0] % (nwh * nww):
        raise ValueError(f"windows has {windows.shape[0]} windows, not a multiple of the {nwh * nww} "
                         f"windows of a {H}x{W} image with window_size={ws}")
    return MERGE(backend, windows=windows, window_size=ws, shift_size=shift, H=H, W=W,
                 pad_then_roll=check_bool("pad_then_roll", pad_then_roll))[0]


def _partition_like(inp: WindowPartitionInputs):
    b, h, w, c = inp.x.shape
    nwh, nww = padded_grid(h, w, inp.window_size)
    return (inp.x.new_empty((b * nwh * nww, *inp.window_size, c)),)


def _merge_like(inp: WindowMergeInputs):
    nwh, nww = padded_grid(inp.H, inp.W, inp.window_size)
    windows = inp.windows
    return (windows.new_empty((windows.shape[0] // (nwh * nww), inp.H, inp.W, windows.shape[-1])),)


PARTITION = OpSpec(
    "window_partition", WindowPartitionInputs, outputs=("windows",), outputs_like=_partition_like,
    reference=lambda inp, keep: (ref.window_partition(inp.x, inp.window_size, inp.shift_size, inp.pad_then_roll),))
MERGE = OpSpec(
    "window_merge", WindowMergeInputs, outputs=("x",), outputs_like=_merge_like,
    reference=lambda inp, keep: (ref.window_merge(inp.windows, inp.window_size, inp.shift_size, inp.H, inp.W,
                                                  inp.pad_then_roll),))

__all__ = ["window_partition", "window_merge", "padded_grid", "WindowPartitionInputs", "WindowMergeInputs",
           "PARTITION", "MERGE"]
