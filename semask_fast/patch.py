"""``semask_fast.patch(model)``: put the fast ops under every Swin attention layer of a model, in place.

Layers are recognised by structure (parameter and buffer names, attributes, the forward's
parameter names), never by importing their framework; before a layer is replaced, every
assumption its replacement makes is checked (bias table shape, the relative position index
itself, projection sizes, no cosine attention), and a layer that fails a check is left as
it is with the reason in the report.  Replacements adopt the original tensors: state_dict
keys, shapes, devices, dtypes, train/eval mode, dropout rates and optimizers stay valid.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .nn import swin_families as fam
from .nn.timm_patch import check_patch_arguments, patch_timm
from .nn.window_attention import WindowAttention
from .reference import relative_position_index

__all__ = ["patch", "PatchReport", "PatchedModule", "LeftModule"]


@dataclasses.dataclass(frozen=True)
class PatchedModule:
    path: str  #: dotted path in the model ("" is the model itself)
    family: str  #: which Swin code the layer comes from
    replacement: str  #: what runs now


@dataclasses.dataclass(frozen=True)
class LeftModule:
    path: str
    cls: str  #: the layer's class, qualified by its module
    reason: str  #: why it was left as it is


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` replaced and what it left, with the reason; ``print(report)`` shows both."""

    backend: str
    zero_copy: bool
    patched: List[PatchedModule] = dataclasses.field(default_factory=list)
    left: List[LeftModule] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"semask_fast.patch: {len(self.patched)} patched, {len(self.left)} left "
                 f"(backend={self.backend!r}, zero_copy={self.zero_copy})"]
        lines += [f"  patched {p.path or '<model>'}: {p.family} -> {p.replacement}" for p in self.patched]
        lines += [f"  left    {m.path or '<model>'} ({m.cls}): {m.reason}" for m in self.left]
        return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Structure
# --------------------------------------------------------------------------- #
_V2_MARKERS = ("logit_scale", "cpb_mlp", "continuous_position_bias_mlp")
_CANDIDATE_MARKERS = ("relative_position_bias_table", "w_msa") + _V2_MARKERS


def _forward_params(m: nn.Module) -> List[str]:
    try:
        return list(inspect.signature(m.forward).parameters)
    except (TypeError, ValueError):
        return []


def _linear(m: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in names)


def _pair(v) -> Optional[Tuple[int, int]]:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v), int(v)
    if isinstance(v, (tuple, list, torch.Size)) and len(v) == 2 and all(isinstance(s, numbers.Integral) for s in v):
        return int(v[0]), int(v[1])
    return None


def _has_table(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "relative_position_bias_table", None), nn.Parameter)
            and isinstance(m._buffers.get("relative_position_index"), torch.Tensor))


def _window_core(m: nn.Module) -> bool:
    """qkv and proj projections, a relative position table and its index, heads and a window."""
    return (_linear(m, "qkv", "proj") and _has_table(m) and isinstance(getattr(m, "num_heads", None), int)
            and _pair(getattr(m, "window_size", None)) is not None)


def _v2_reason(m: nn.Module) -> Optional[str]:
    found = [a for a in _V2_MARKERS if hasattr(m, a)]
    if found:
        return (f"Swin V2 cosine attention with a continuous position bias ({', '.join(found)}): "
                "not supported by semask_fast.patch yet")
    return None


def _table_reason(table: torch.Tensor, index: torch.Tensor, window: Tuple[int, int], heads: int) -> Optional[str]:
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    if table.dim() != 2 or tuple(table.shape) != (rows, heads):
        return (f"relative_position_bias_table has shape {tuple(table.shape)}, expected ({rows}, {heads}) for "
                f"window {window} and {heads} heads")
    n = window[0] * window[1]
    if index.numel() != n * n or not torch.equal(index.detach().reshape(n, n).cpu().long(),
                                                 relative_position_index(window)):
        return f"relative_position_index is not Swin's index for window {window}"
    return None


def _qkv_reason(m: nn.Module, heads: int) -> Optional[str]:
    dim = m.qkv.in_features
    if m.qkv.out_features != 3 * dim or m.proj.in_features != dim or dim % heads:
        return (f"qkv {m.qkv.in_features}->{m.qkv.out_features}, proj {m.proj.in_features}->{m.proj.out_features} "
                f"with {heads} heads is not the official C -> 3C, C -> C with C divisible by the heads")
    return None


def _dropout(m: nn.Module, name: str) -> Optional[nn.Dropout]:
    d = getattr(m, name, None)
    return d if isinstance(d, nn.Dropout) else None


def _first_reason(*checks: Callable[[], Optional[str]]) -> Optional[str]:
    for check in checks:
        reason = check()
        if reason:
            return reason
    return None


# --------------------------------------------------------------------------- #
# Families: recognise (structure), check (exactness), replace
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class _Family:
    name: str
    looks_like: Callable[[nn.Module], bool]
    why_not: Callable[[nn.Module], Optional[str]]
    #: (model, path, module, backend, zero_copy) -> description of what runs now
    apply: Callable[[nn.Module, str, nn.Module, str, bool], str]
    replaces_module: bool = True  # False: binds a new forward onto the module


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _official_window_reason(m: nn.Module) -> Optional[str]:
    window, heads = _pair(m.window_size), m.num_heads
    return _first_reason(
        lambda: _v2_reason(m),
        lambda: None if _forward_params(m)[:2] == ["x", "mask"] else "forward is not forward(x, mask=None)",
        lambda: None if isinstance(getattr(m, "scale", None), numbers.Real) else "no numeric scale attribute",
        lambda: None if _dropout(m, "attn_drop") and _dropout(m, "proj_drop") else "attn_drop / proj_drop are "
                                                                                     "not nn.Dropout",
        lambda: _qkv_reason(m, heads),
        lambda: _table_reason(m.relative_position_bias_table, m.relative_position_index, window, heads))


def _official_window(m: nn.Module, backend: str) -> fam.SwinWindowAttention:
    return fam.SwinWindowAttention.from_module(m, dim=m.qkv.in_features, num_heads=m.num_heads,
                                               window_size=_pair(m.window_size), scale=float(m.scale),
                                               attn_drop=m.attn_drop, proj_drop=m.proj_drop, backend=backend)


def _apply_official_window(model, path, m, backend, zero_copy) -> str:
    _set_submodule(model, path, _official_window(m, backend))
    return "semask_fast.nn.SwinWindowAttention"


def _looks_like_shift_window_msa(m: nn.Module) -> bool:
    return isinstance(getattr(m, "w_msa", None), nn.Module) and _forward_params(m)[:2] == ["query", "hw_shape"]


def _shift_window_msa_reason(m: nn.Module) -> Optional[str]:
    w = m.w_msa
    ws, shift = m.window_size, getattr(m, "shift_size", None)
    return _first_reason(
        lambda: None if _window_core(w) else f"w_msa ({type(w).__name__}) is not a window attention with qkv, proj "
                                             "and a relative position table",
        lambda: _official_window_reason(w),
        lambda: None if isinstance(ws, int) and _pair(w.window_size) == (ws, ws) else
        f"window_size {ws!r} is not an int equal to w_msa.window_size {w.window_size!r}",
        lambda: None if isinstance(shift, int) and 0 <= shift < ws else f"shift_size {shift!r} not in [0, {ws})",
        lambda: None if isinstance(getattr(m, "drop", None), nn.Module) else "no drop module")


def _apply_shift_window_msa(model, path, m, backend, zero_copy) -> str:
    new = fam.ShiftWindowMSA(_official_window(m.w_msa, backend), m.window_size, m.shift_size, m.drop,
                             pad_small_map=bool(getattr(m, "pad_small_map", True)), zero_copy=zero_copy)
    new.train(m.training)
    _set_submodule(model, path, new)
    return f"semask_fast.nn.ShiftWindowMSA ({'zero-copy' if zero_copy else 'partition/merge'}, pad then roll)"


def _looks_like_torchvision(m: nn.Module) -> bool:
    return (_linear(m, "qkv", "proj") and _forward_params(m) == ["x"] and _pair(getattr(m, "window_size", None))
            is not None and _pair(getattr(m, "shift_size", None)) is not None
            and isinstance(getattr(m, "num_heads", None), int) and hasattr(m, "attention_dropout"))


def _torchvision_reason(m: nn.Module) -> Optional[str]:
    window, heads = _pair(m.window_size), m.num_heads
    shift = _pair(m.shift_size)
    return _first_reason(
        lambda: _v2_reason(m),
        lambda: None if _has_table(m) else "no relative_position_bias_table / relative_position_index",
        lambda: None if all(0 <= s < w for s, w in zip(shift, window)) else f"shift_size {shift} not below "
                                                                                f"the window {window}",
        lambda: None if all(isinstance(getattr(m, a, None), numbers.Real) for a in ("attention_dropout", "dropout"))
        else "attention_dropout / dropout are not numbers",
        lambda: _qkv_reason(m, heads),
        lambda: _table_reason(m.relative_position_bias_table, m.relative_position_index, window, heads))


def _apply_torchvision(model, path, m, backend, zero_copy) -> str:
    _set_submodule(model, path, fam.ShiftedWindowAttention.from_torchvision(m, backend, zero_copy))
    return f"semask_fast.nn.ShiftedWindowAttention ({'zero-copy' if zero_copy else 'partition/merge'}, pad then roll)"


def _bind_forward(m: nn.Module, fn, backend: str, path: str) -> None:
    m.forward = fam.BoundPatch(m, fn, backend=backend, where=path)


def _looks_like_hf_v4(m: nn.Module) -> bool:
    return (_linear(m, "query", "key", "value") and _has_table(m)
            and _forward_params(m)[:4] == ["hidden_states", "attention_mask", "head_mask", "output_attentions"])


def _hf_v4_reason(m: nn.Module) -> Optional[str]:
    window, heads = _pair(getattr(m, "window_size", None)), getattr(m, "num_attention_heads", None)
    size = getattr(m, "attention_head_size", None)
    return _first_reason(
        lambda: _v2_reason(m),
        lambda: None if window and isinstance(heads, int) and isinstance(size, int) else
        "window_size / num_attention_heads / attention_head_size missing",
        lambda: None if all(getattr(m, n).out_features == heads * size for n in ("query", "key", "value")) else
        "query/key/value widths differ from num_attention_heads * attention_head_size (pruned heads?)",
        lambda: None if _dropout(m, "dropout") else "dropout is not nn.Dropout",
        lambda: _table_reason(m.relative_position_bias_table, m.relative_position_index, window, heads))


def _apply_hf_v4(model, path, m, backend, zero_copy) -> str:
    _bind_forward(m, fam.hf_swin_self_attention_forward, backend, path)
    return "forward: semask_fast.nn.swin_families.hf_swin_self_attention_forward (original when weights are asked)"


def _looks_like_hf_v5(m: nn.Module) -> bool:
    params = inspect.signature(m.forward).parameters if _forward_params(m) else {}
    return (_linear(m, "q_proj", "k_proj", "v_proj", "o_proj")
            and _has_table(getattr(m, "relative_position_bias", nn.Module()))
            and list(params)[:2] == ["hidden_states", "attention_mask"]
            and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()))


def _hf_v5_reason(m: nn.Module) -> Optional[str]:
    bias = m.relative_position_bias
    window, heads = _pair(getattr(bias, "window_size", None)), getattr(m, "num_attention_heads", None)
    head_dim = getattr(m, "head_dim", None)
    return _first_reason(
        lambda: _v2_reason(m) or _v2_reason(bias),
        lambda: None if window and isinstance(heads, int) and isinstance(head_dim, int) else
        "window_size / num_attention_heads / head_dim missing",
        lambda: None if isinstance(getattr(m, "scaling", None), numbers.Real) and isinstance(
            getattr(m, "attention_dropout", None), numbers.Real) else "scaling / attention_dropout are not numbers",
        lambda: None if getattr(bias, "window_area", None) == window[0] * window[1] else "window_area mismatch",
        lambda: None if all(getattr(m, n).out_features == heads * head_dim for n in ("q_proj", "k_proj", "v_proj"))
        else "q/k/v widths differ from num_attention_heads * head_dim",
        lambda: _table_reason(bias.relative_position_bias_table, bias.relative_position_index, window, heads))


def _apply_hf_v5(model, path, m, backend, zero_copy) -> str:
    _bind_forward(m, fam.hf_swin_attention_forward, backend, path)
    return "forward: semask_fast.nn.swin_families.hf_swin_attention_forward (original when weights are asked)"


def _looks_like_timm(m: nn.Module) -> bool:
    # The class name only routes the layer to patch_timm; the structure is checked as for any layer.
    cls = type(m)
    return (cls.__module__ == "timm.models.swin_transformer" and cls.__name__ == "WindowAttention"
            and _window_core(m) and _forward_params(m)[:2] == ["x", "mask"])


def _timm_reason(m: nn.Module) -> Optional[str]:
    window, heads = _pair(m.window_size), m.num_heads
    return _table_reason(m.relative_position_bias_table, m.relative_position_index, window, heads)


def _looks_like_official_window(m: nn.Module) -> bool:
    return _window_core(m) and _forward_params(m)[:1] == ["x"]


_TIMM = "timm Swin WindowAttention"

def _timm_description(model, path, m, backend, zero_copy) -> str:
    # patch_timm patched the whole model; a block with timm's dynamic_mask keeps the copy path.
    block = model.get_submodule(path.rpartition(".")[0])
    zero_copy = zero_copy and not getattr(block, "dynamic_mask", False)
    return "semask_fast.nn.WindowAttention (patch_timm" + (", zero-copy block)" if zero_copy else ")")


_FAMILIES: Sequence[_Family] = (
    _Family("mmseg/mmdet/mmpretrain ShiftWindowMSA", _looks_like_shift_window_msa, _shift_window_msa_reason,
            _apply_shift_window_msa),
    _Family("torchvision ShiftedWindowAttention", _looks_like_torchvision, _torchvision_reason, _apply_torchvision),
    _Family("transformers Swin attention (v5 layout)", _looks_like_hf_v5, _hf_v5_reason, _apply_hf_v5,
            replaces_module=False),
    _Family("transformers Swin self-attention (v4 layout)", _looks_like_hf_v4, _hf_v4_reason, _apply_hf_v4,
            replaces_module=False),
    _Family(_TIMM, _looks_like_timm, _timm_reason, _timm_description),
    _Family("official Swin / SeMask WindowAttention or mm* WindowMSA", _looks_like_official_window,
            _official_window_reason, _apply_official_window),
)

_OURS = (WindowAttention, fam.ShiftWindowMSA)
_OUR_FORWARDS = (fam.hf_swin_self_attention_forward, fam.hf_swin_attention_forward)


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _already_patched(m: nn.Module) -> bool:
    bound = m.__dict__.get("forward")
    return isinstance(m, _OURS) or (isinstance(bound, fam.BoundPatch) and bound.fn in _OUR_FORWARDS)


def _is_candidate(m: nn.Module) -> bool:
    return any(hasattr(m, a) for a in _CANDIDATE_MARKERS)


def patch(model: nn.Module, backend: str = "auto", zero_copy: bool = True) -> PatchReport:
    """Replace, in place, every Swin attention layer of ``model`` that semask_fast computes exactly.

    Recognised by structure: timm's Swin ``WindowAttention`` (through :func:`semask_fast.patch_timm`);
    the official Swin / SeMask ``WindowAttention`` and mm*'s ``WindowMSA`` (windows in, the
    block's mask passed to ``forward(x, mask)``); mmseg / mmdet / mmpretrain ``ShiftWindowMSA``;
    torchvision's ``ShiftedWindowAttention``; transformers' Swin attention in the v4 layout
    (``SwinSelfAttention``) and the v5 layout (``SwinAttention``), whose forward is replaced and
    runs the original when the caller asks for attention weights.  Swin V2 (cosine attention)
    and anything that fails a check are left, with the reason.

    Args:
        model: any ``nn.Module``; its layers are replaced in place (the model itself is not).
        backend: ``"auto"`` or a backend name, used by every replaced layer.
        zero_copy: whole-image layers (ShiftWindowMSA, torchvision, timm blocks) run
            :func:`semask_fast.shifted_window_attention` on the qkv image; ``False`` keeps the
            partition and merge copies (as :func:`semask_fast.window_partition` / ``window_merge``).

    Returns:
        :class:`PatchReport`: each patched layer's path, family and replacement, and each
        Swin-like layer left with its reason.
    """
    check_patch_arguments(model, backend, zero_copy)
    report = PatchReport(backend=backend, zero_copy=zero_copy)
    done: List[str] = []  # subtrees already patched (or ours): not entered
    noted: List[str] = []  # subtrees with a "left" entry: their parts are not reported again
    timm_paths: List[str] = []

    def inside(path: str, roots: List[str]) -> bool:
        return any(r == "" or path == r or path.startswith(r + ".") for r in roots)

    for path, m in list(model.named_modules()):
        if inside(path, done):
            continue
        if _already_patched(m):
            done.append(path)
            continue
        family = next((f for f in _FAMILIES if f.looks_like(m)), None)
        reason = family.why_not(m) if family else None
        if family and not reason and path == "" and family.replaces_module:
            reason = "it is the model passed in, which cannot be replaced in place: patch a module containing it"
        if family and not reason:
            if family.name == _TIMM:
                timm_paths.append(path)
            report.patched.append(PatchedModule(path, family.name, family.apply(model, path, m, backend, zero_copy)))
            done.append(path)
        elif (family or _is_candidate(m)) and not inside(path, noted):
            report.left.append(LeftModule(path, _qualname(m), reason or _v2_reason(m) or
                                          "a relative position table or window attention parts, in no layout "
                                          "semask_fast recognises"))
            noted.append(path)
    if timm_paths:
        patch_timm(model, backend=backend, zero_copy=zero_copy)
        missed = [p for p in timm_paths if not isinstance(model.get_submodule(p), WindowAttention)]
        if missed:
            raise RuntimeError(f"patch_timm left {missed}, which semask_fast.patch recognised as timm's")
    return report
