"""Every public op as a PyTorch custom op, made from one description (:class:`OpSpec`).

An :class:`OpSpec` names the op and gives its validated inputs (an :class:`OpInputs` dataclass
whose fields, in order and with their types, are the op's arguments), its outputs, their shapes
(for the fake implementation), its reference math and, for ops with dropout, the dropout mask's
shape.  From it come two custom ops in the ``semask_fast`` namespace:

* ``semask_fast::<op>(<fields>, str backend) -> Tensor[]``: the outputs, then the residuals
  (what the implementation's backward needs beyond inputs and outputs), then, for ops with
  dropout, the seed (a 0-d int64 tensor on the inputs' device).
* ``semask_fast::<op>_backward(Tensor?[] grads, <fields>, Tensor[] outputs, Tensor[] residuals,
  str backend, bool[] needs) -> Tensor[]``: the gradients of the ``grad_fields`` flagged in
  ``needs``, in order (``needs`` is autograd's ``needs_input_grad``; nothing else is computed
  where an implementation can skip it).

``backend`` is what the caller asked for ("auto" or a name): the implementation is selected when
the op runs (and again, identically, by the fake implementation, which needs the residuals'
shapes), so selection, its reasons, the one-time fallback warning and :func:`record_dispatch`
behave the same eagerly and under ``torch.compile``, where the op is one opaque node of the graph
(no graph break) and its fake implementation follows symbolic shapes.  The dropout seed is drawn
inside the forward op by a random op on the inputs' device
(:func:`~semask_fast.backends.base.draw_seed`: no host-device sync, fresh under CUDA-graph replay)
and travels to backward as that tensor; kernels that read it from device memory get the tensor.  Autograd is registered once for every op: the input tensors,
outputs and residuals go through ``save_for_backward`` (so an in-place change after forward raises
PyTorch's version-counter error, and saved-tensor hooks and non-reentrant checkpointing see them);
the backward op is once differentiable (double backward raises).

Under ``torch.autocast`` (CPU and CUDA) the forward op
runs as its reference math does there (:class:`Autocast`): the operands of its matrix products
are cast to the autocast dtype, bias tables and masks stay float32 (the kernels accumulate and
take the softmax in float32 whatever the input dtype), and an output that autocast's float32
reductions (``sum``, ``layer_norm`` on CUDA) leave in float32 is returned in float32.

``torch.export.export`` keeps each op as one node; :meth:`OpSpec.decompose` lowers it to its
reference math: :func:`decompositions` for ``ExportedProgram.run_decompositions``, and
:func:`lowered_to_reference` around ``torch.onnx.export(..., dynamo=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch._decomp

from ..backends import registry
from ..backends.base import OpImpl, draw_seed, note_ran, on_device
from ._common import OpInputs

NAMESPACE = "semask_fast"

#: Every op's description, in definition order (the order tables print them); filled by OpSpec.
SPECS: Dict[str, "OpSpec"] = {}

#: Device types whose autocast dispatch key every op with an :class:`Autocast` rule registers.
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")

_LIBRARY = torch.library.Library(NAMESPACE, "IMPL")


@dataclasses.dataclass(frozen=True)
class Autocast:
    """How an op runs under ``torch.autocast``: as its reference math does under the same autocast.

    Args:
        lowered: tensor fields cast to the autocast dtype (autocast casts a matrix product's
            operands; float64 tensors are left alone, as autocast leaves them).
        fp32: tensor fields cast to float32 (parameters the reference adds to or applies after
            the products in float32: bias tables, masks, LayerNorm weights).
        fp32_outputs: ``(inp, device_type) -> names`` of the outputs that autocast leaves in
            float32 on that device type (on CUDA autocast runs ``sum``, ``norm`` and
            ``layer_norm`` in float32; on CPU it does not).
    """

    lowered: Tuple[str, ...]
    fp32: Tuple[str, ...] = ()
    fp32_outputs: Callable[[Any, str], Tuple[str, ...]] = lambda inp, device_type: ()


class OpSpec:
    """One op: its inputs, outputs, reference and custom ops.

    Args:
        name: the op's name (its public function, custom op and registry key).
        inputs: the validated-inputs dataclass (fields = the op's arguments, tensors first).
        outputs: the outputs' names.
        outputs_like: ``inp -> tuple`` of empty tensors shaped as the outputs (fake tensors under
            tracing; shapes may be symbolic).
        reference: ``(inp, dropout_keep) -> tuple`` of outputs, the official math
            (:mod:`semask_fast.reference`); ``dropout_keep`` is a boolean keep-mask or None.
        dropout_shape: ``inp -> shape`` of the op's dropout mask, for ops with ``dropout_p``.
        autocast: the op's rule under ``torch.autocast``; None for pure data movement, which
            autocast leaves in its input dtype.
    """

    def __init__(self, name: str, inputs: Type[OpInputs], outputs: Tuple[str, ...],
                 outputs_like: Callable[[Any], Tuple[torch.Tensor, ...]],
                 reference: Callable[[Any, Optional[torch.Tensor]], Tuple[torch.Tensor, ...]],
                 dropout_shape: Optional[Callable[[Any], Tuple[int, ...]]] = None,
                 autocast: Optional[Autocast] = None):
        if name in SPECS:
            raise ValueError(f"op {name!r} is described twice")
        self.name = name
        self.inputs = inputs
        self.outputs = outputs
        self.outputs_like = outputs_like
        self.reference = reference
        self.dropout_shape = dropout_shape
        self.autocast = autocast
        self.arg_names = tuple(n.split()[-1] for n in inputs.schema_arguments())
        self._tensor_positions = tuple(self.arg_names.index(n) for n in inputs.tensor_fields())
        self._grad_positions = tuple(self.arg_names.index(n) for n in inputs.grad_fields)
        self.forward_op, self.backward_op = self._define()
        SPECS[name] = self

    @property
    def family(self) -> str:
        """The module that defines the op: backends implement it in a module of the same name."""
        return self.inputs.__module__.rsplit(".", 1)[-1]

    @property
    def has_dropout(self) -> bool:
        return self.dropout_shape is not None

    def __call__(self, backend: str, **fields: Any) -> Tuple[torch.Tensor, ...]:
        """Run the op on validated arguments (by field name); returns its outputs."""
        results = self.forward_op(*(fields[n] for n in self.arg_names), backend)
        return tuple(results[:len(self.outputs)])

    def __repr__(self) -> str:
        return f"<op {NAMESPACE}::{self.name}>"

    # ------------------------------------------------------------------ definition
    def _define(self):
        args = ", ".join(self.inputs.schema_arguments())
        forward = torch.library.custom_op(f"{NAMESPACE}::{self.name}", self.run_forward, mutates_args=(),
                                          schema=f"({args}, str backend) -> Tensor[]")
        forward.register_fake(self._forward_fake)
        backward = torch.library.custom_op(
            f"{NAMESPACE}::{self.name}_backward", self.run_backward, mutates_args=(),
            schema=f"(Tensor?[] grads, {args}, Tensor[] outputs, Tensor[] residuals, str backend, bool[] needs) "
                   "-> Tensor[]")
        backward.register_fake(self._backward_fake)
        forward.register_autograd(self._autograd_backward, setup_context=self._setup_context)
        backward.register_autograd(self._double_backward, setup_context=_no_context)
        if self.autocast is not None:
            for device_type in AUTOCAST_DEVICE_TYPES:
                self._register_autocast(device_type)
        return forward, backward

    def decompose(self, *args: Any) -> List[torch.Tensor]:
        """The forward op as its reference math in aten ops (what :func:`decompositions` maps it to).

        The residuals (which only the op's own backward reads) are zeros of the selected
        implementation's residual shapes, as the traced graph has them; an inference graph drops them.
        """
        inp, backend = self.inputs.from_args(args[:-1]), args[-1]
        keep = None
        if self.has_dropout and inp.dropout_p > 0:
            keep = torch.rand(self.dropout_shape(inp), device=inp.device) >= inp.dropout_p
        outputs = [o.contiguous() for o in self.reference(inp, keep)]
        residuals = [torch.zeros_like(r) for r in self._select(inp, backend).residuals_like(inp)]
        seed = [torch.zeros((), dtype=torch.int64, device=inp.device)] if self.has_dropout else []
        return [*outputs, *residuals, *seed]

    def _register_autocast(self, device_type: str) -> None:
        rule = self.autocast
        unknown = set(rule.lowered + rule.fp32) - set(self.inputs.tensor_fields())
        if unknown:
            raise ValueError(f"op {self.name!r}: autocast names {sorted(unknown)}, which are not tensor fields")
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
        targets = {**{n: None for n in rule.lowered}, **{n: torch.float32 for n in rule.fp32}}
        positions = [(self.arg_names.index(n), dtype) for n, dtype in targets.items()]

        def run_under_autocast(keyset, *args):
            dtype = torch.get_autocast_dtype(device_type)
            args = list(args)
            for i, target in positions:
                t = args[i]
                if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                        and t.device.type == device_type):
                    args[i] = t.to(target or dtype)
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                results = self.forward_op._opoverload(*args)
            wide = rule.fp32_outputs(self.inputs.from_args(args[:-1]), device_type)
            return [r.float() if i < len(self.outputs) and self.outputs[i] in wide and r.dtype != torch.float64
                    else r for i, r in enumerate(results)]

        _LIBRARY.impl(self.name, run_under_autocast, key, with_keyset=True)

    def _select(self, inp: OpInputs, backend: str) -> OpImpl:
        if inp.is_empty:
            # Nothing to compute: the reference returns correctly shaped empty outputs (and
            # gradients) whatever the backend.
            return registry.implementation(self.name, "reference")
        return registry.select(self.name, inp, backend)

    def run_forward(self, *args: Any) -> List[torch.Tensor]:
        """The forward op's kernel (a dispatch mode that wants to see the aten ops inside the op
        can call it directly)."""
        inp, backend = self.inputs.from_args(args[:-1]), args[-1]
        impl = self._select(inp, backend)
        seed = None
        if self.has_dropout:
            seed = (draw_seed(inp.device, impl.seed_bound) if inp.dropout_p > 0
                    else torch.zeros((), dtype=torch.int64, device=inp.device))
        note_ran(self.name, impl.backend, "forward")
        with on_device(inp.device):
            outputs, residuals = impl.forward(inp, _seed_for(impl, seed))
        results = _owned([o.contiguous() for o in outputs] + list(residuals),
                         [t for t in inp.args() if isinstance(t, torch.Tensor)])
        if self.has_dropout:
            results.append(seed)
        return results

    def _forward_fake(self, *args: Any) -> List[torch.Tensor]:
        inp, backend = self.inputs.from_args(args[:-1]), args[-1]
        impl = self._select(inp, backend)
        seed = [torch.empty((), dtype=torch.int64, device=inp.device)] if self.has_dropout else []
        return [*self.outputs_like(inp), *impl.residuals_like(inp), *seed]

    def _split_backward_args(self, rest: Sequence[Any]):
        n = len(self.arg_names)
        inp = self.inputs.from_args(rest[:n])
        outputs, residuals, backend, needs = rest[n:]
        return inp, list(outputs), list(residuals), backend, list(needs)

    def run_backward(self, grads: Sequence[Optional[torch.Tensor]], *rest: Any) -> List[torch.Tensor]:
        """The backward op's kernel."""
        inp, outputs, residuals, backend, needs = self._split_backward_args(rest)
        impl = self._select(inp, backend)
        note_ran(self.name, impl.backend, "backward")
        grads = [torch.zeros_like(o) if g is None else g for g, o in zip(grads, outputs)]
        seed = _seed_for(impl, residuals.pop() if self.has_dropout else None)
        with on_device(inp.device):
            result = impl.backward(inp, outputs, residuals, grads, needs, seed)
        if len(result) != len(needs):
            raise RuntimeError(f"{impl!r}.backward returned {len(result)} gradients, expected {len(needs)}")
        wanted = []
        for name, g, need in zip(self.inputs.grad_fields, result, needs):
            if need:
                if g is None:
                    raise RuntimeError(f"{impl!r}.backward returned no gradient for {name}, which needs one")
                wanted.append(g.contiguous())
        return _owned(wanted, [t for t in (*grads, *inp.args(), *outputs, *residuals) if isinstance(t, torch.Tensor)])

    def _backward_fake(self, grads: Sequence[Optional[torch.Tensor]], *rest: Any) -> List[torch.Tensor]:
        inp, _, _, _, needs = self._split_backward_args(rest)
        return [t.new_empty(t.shape) for t, need in zip(inp.differentiable(), needs) if need]

    # ------------------------------------------------------------------ autograd
    def _setup_context(self, ctx, inputs: Tuple[Any, ...], output: List[torch.Tensor]) -> None:
        n_out = len(self.outputs)
        ctx.arguments = [None if i in self._tensor_positions else a for i, a in enumerate(inputs)]
        ctx.mark_non_differentiable(*output[n_out:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*(inputs[i] for i in self._tensor_positions), *output)

    def _autograd_backward(self, ctx, grads: Sequence[Optional[torch.Tensor]]):
        args = list(ctx.arguments)
        saved = ctx.saved_tensors
        k, n_out = len(self._tensor_positions), len(self.outputs)
        for i, t in zip(self._tensor_positions, saved[:k]):
            args[i] = t
        needs = [bool(ctx.needs_input_grad[i]) and args[i] is not None for i in self._grad_positions]
        result: List[Optional[torch.Tensor]] = [None] * len(args)
        if any(needs):
            grad_list = self.backward_op(list(grads[:n_out]), *args[:-1], list(saved[k:k + n_out]),
                                         list(saved[k + n_out:]), args[-1], needs)
            wanted = iter(grad_list)
            for i, need in zip(self._grad_positions, needs):
                if need:
                    result[i] = next(wanted)
        return tuple(result)

    def _double_backward(self, ctx, *grads):
        raise RuntimeError(f"semask_fast.{self.name}: double backward (differentiating its gradients, e.g. "
                           "with create_graph=True) is not supported")


def decompositions() -> Dict[Any, Callable[..., List[torch.Tensor]]]:
    """``{forward op: its reference math}`` for every op: ``exported_program.run_decompositions(
    decompositions())`` lowers an exported model to plain aten ops."""
    return {spec.forward_op._opoverload: spec.decompose for spec in SPECS.values()}


@contextlib.contextmanager
def lowered_to_reference():
    """Within it, every op decomposes to its reference math wherever torch applies ``torch._decomp``'s
    decomposition table, as ``torch.onnx.export(..., dynamo=True)`` does::

        with lowered_to_reference():
            torch.onnx.export(model, args, dynamo=True)

    Not registered for good: fake tensors with symbolic sizes prefer a table entry to the op's fake
    implementation, so ``torch.compile(dynamic=True)`` would trace the reference math (and guard
    on sizes) instead of keeping the op.
    """
    table = torch._decomp.decomposition_table
    added = {op: fn for op, fn in decompositions().items() if op not in table}
    table.update(added)
    try:
        yield
    finally:
        for op in added:
            table.pop(op, None)


def _no_context(ctx, inputs, output) -> None:
    pass


def _seed_for(impl: OpImpl, seed: Optional[torch.Tensor]):
    """The dropout seed as ``impl`` takes it: the tensor (its kernels read device memory), or an int."""
    if seed is None:
        return 0
    return seed if impl.seed_on_device else int(seed)


def _owned(results: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``results``, each copied if it shares memory with an input or an earlier result (a custom
    op's returns may alias neither: e.g. a reference reshape that is a view, or two gradients
    cut from one buffer)."""
    # _is_alias_of compares storages in C++: untyped_storage() would give each result's storage a
    # Python object that outlives the tensor and keeps the storage referenced (the cpu kernels'
    # buffer pool reuses a storage only once nothing else refers to it).
    taken = [t for t in inputs if t.numel()]
    owned = []
    for t in results:
        if t.numel():
            if any(torch._C._is_alias_of(t, u) for u in taken):
                t = t.clone()
            taken.append(t)
        owned.append(t)
    return owned


__all__ = ["AUTOCAST_DEVICE_TYPES", "Autocast", "NAMESPACE", "OpSpec", "SPECS", "decompositions", "lowered_to_reference"]
