"""Input validation and dispatch shared by the public ops.

Every check raises a ``ValueError`` (``TypeError`` for wrong types) whose
message names the argument and says what was expected.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import typing
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch

from ..backends.base import FLOAT_DTYPES

Pair = Tuple[int, int]
#: An int that may be symbolic under ``torch.compile(dynamic=True)`` (derived from an input's shape,
#: such as an image size): the op's schema types it ``SymInt`` so a new value does not recompile.
SymInt = typing.NewType("SymInt", int)
SymPair = Tuple[SymInt, SymInt]

#: Field type -> custom-op schema type.
_SCHEMA_TYPES = {
    torch.Tensor: "Tensor", Optional[torch.Tensor]: "Tensor?", bool: "bool", int: "int", SymInt: "SymInt",
    float: "float", Pair: "int[]", SymPair: "SymInt[]", Optional[SymPair]: "SymInt[]?",
}
_PAIR_TYPES = (Pair, SymPair, Optional[SymPair])

_ALL_FLOAT = FLOAT_DTYPES | {torch.float64}


def is_int(value: Any) -> bool:
    """An int, or a symbolic one (a size traced by torch.export / torch.compile with dynamic shapes)."""
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def to_pair(name: str, value: Any, *, minimum: int = 0) -> Pair:
    """An int or an (h, w) pair of ints, each >= minimum."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if is_int(value):
        value = (value, value)
    try:
        pair = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or not all(is_int(v) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum} on both axes, got {pair}")
    return pair  # type: ignore[return-value]


def check_tensor(name: str, t: Any, ndim: int, layout: str) -> torch.Tensor:
    """A floating tensor of rank ``ndim``; ``layout`` names the dims for the message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(t.shape)}")
    if t.dtype not in _ALL_FLOAT:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    """Same device (and dtype) as the reference argument."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must share a device")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_param_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """A small parameter (bias table, LayerNorm affine) in the inputs' dtype or float32 (autocast's
    float32 parameters with half activations)."""
    if t.dtype not in (ref.dtype, torch.float32):
        also = "" if ref.dtype == torch.float32 else " or torch.float32"
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}{also}, got {t.dtype}")


def check_size(name: str, t: torch.Tensor, dim: int, what: str) -> None:
    """Dim ``dim`` of ``t`` (named ``what``) at least 1: a size the math divides by or cannot be
    empty in (a head_dim, an image side)."""
    if t.shape[dim] < 1:
        raise ValueError(f"{name} must have {what} >= 1 (dim {dim}), got shape {tuple(t.shape)}")


def check_float(name: str, value: Any) -> float:
    """A real number (int or float, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_window_geometry(window_size: Any, shift_size: Any) -> Tuple[Pair, Pair]:
    """(window, shift) pairs: window >= 1, 0 <= shift < window on each axis."""
    ws = to_pair("window_size", window_size, minimum=1)
    shift = to_pair("shift_size", shift_size)
    if any(s >= w for s, w in zip(shift, ws)):
        raise ValueError(f"shift_size must be smaller than window_size {ws} on both axes, got {shift}")
    return ws, shift


def check_bias_table(table: Optional[torch.Tensor], ref_name: str, ref: torch.Tensor, window_size: Pair,
                     heads: int) -> None:
    """A ((2Wh-1)(2Ww-1), heads) relative-position bias table in the inputs' dtype or float32."""
    if table is None:
        return
    check_tensor("bias_table", table, 2, "((2Wh-1)*(2Ww-1), heads)")
    check_like("bias_table", table, ref_name, ref, dtype=False)
    rows = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
    if tuple(table.shape) != (rows, heads):
        raise ValueError(f"bias_table must have shape ({rows}, {heads}) for window_size={window_size} and {heads} "
                         f"heads, got {tuple(table.shape)}")
    check_param_dtype("bias_table", table, ref_name, ref)


def check_probability(name: str, p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")
    return float(p)


def check_scale(name: str, scale: Any, default: float) -> float:
    if scale is None:
        return default
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a float or None, got {scale!r}")
    return float(scale)


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def _pair_flags(cls: type) -> Tuple[Tuple[str, bool], ...]:
    """(name, is a pair) per field: from_args runs per call, and comparing typing objects is slow."""
    return tuple((name, tp in _PAIR_TYPES) for name, tp in _field_types(cls).items())


def _describe_value(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')} {v.device.type}"
    return repr(v)


@dataclasses.dataclass(frozen=True)
class OpInputs:
    """Validated inputs of one call.  Subclasses list their tensors first.

    The fields, in order and with their annotated types, are the arguments of the op's custom op
    (:meth:`schema_arguments`); :meth:`args` and :meth:`from_args` convert both ways.
    """

    #: Names of the tensor fields autograd differentiates, in order.
    grad_fields: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def _types(cls) -> Dict[str, Any]:
        return _field_types(cls)

    @classmethod
    def schema_arguments(cls) -> List[str]:
        """``"<type> <name>"`` per field, as a custom op's schema writes them."""
        out = []
        for name, tp in cls._types().items():
            if tp not in _SCHEMA_TYPES:
                raise TypeError(f"{cls.__name__}.{name}: no custom-op schema type for {tp}")
            out.append(f"{_SCHEMA_TYPES[tp]} {name}")
        return out

    @classmethod
    def tensor_fields(cls) -> Tuple[str, ...]:
        return tuple(n for n, tp in cls._types().items() if tp in (torch.Tensor, Optional[torch.Tensor]))

    @classmethod
    def from_args(cls, args: typing.Sequence[Any]) -> "OpInputs":
        """The inputs from the op's arguments (lists back to pairs)."""
        return cls(**{name: tuple(v) if pair and v is not None else v
                      for (name, pair), v in zip(_pair_flags(cls), args)})

    def args(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def differentiable(self) -> Tuple[Optional[torch.Tensor], ...]:
        return tuple(getattr(self, f) for f in self.grad_fields)

    @property
    def main(self) -> torch.Tensor:
        return getattr(self, self.grad_fields[0])

    @property
    def device(self) -> torch.device:
        return self.main.device

    @property
    def dtype(self) -> torch.dtype:
        return self.main.dtype

    @property
    def is_empty(self) -> bool:
        return any(t is not None and t.numel() == 0 for t in self.differentiable())

    def replace(self, **changes: Any) -> "OpInputs":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                parts.append(f"{f.name}={_describe_value(v)}")
        return ", ".join(parts)


__all__ = [
    "Pair", "is_int", "to_pair", "check_tensor", "check_like", "check_param_dtype", "check_size", "check_float",
    "check_bool", "check_probability", "check_scale", "check_window_geometry", "check_bias_table",
    "OpInputs", "SymInt", "SymPair",
]
