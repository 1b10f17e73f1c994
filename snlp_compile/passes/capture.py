"""Capture: nn.Module -> torch.fx GraphModule through torch.export (non-strict).

Non-strict export runs the user's Python as written (asserts, shape arithmetic, control flow on
sizes) and keeps ``nn_module_stack`` on every node, which is how layers are found later. The
model is deep-copied first, so nothing the compiler does can reach the user's parameters.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim
from torch.utils import _pytree as pytree

from .. import markers
from ..diagnose import capture_hint, capture_warnings, private_copy
from ..errors import SNLPCaptureError, SNLPRefusal
from ..quiet import quiet_specialisation
from .state_writes import local_writes, state_write


@dataclass
class Captured:
    graph_module: fx.GraphModule
    dynamic: bool
    note: str


def example_args(example_inputs: Any) -> tuple[Any, ...]:
    """The positional example inputs as a tuple: a tuple as is, a list as a tuple, anything else
    (one tensor) as the only argument."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def auto_dims(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every dimension of every tensor input marked AUTO (export keeps symbolic what it can),
    keyed by the forward's parameter names so positional and keyword inputs mix freely."""

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(x.dim())}
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def _static_dims(gm: fx.GraphModule) -> list[str]:
    """Input dimensions export specialised to a constant, e.g. a batch of 1 in the example."""
    static = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            static += [
                f"{node.name}[{i}]={s}" for i, s in enumerate(val.shape) if isinstance(s, int) and s <= 1
            ]
    return static


def unaliased(examples: Any) -> Any:
    """The example tensors, each with memory of its own: torch.export captures inputs that share
    memory as one input, so a step traced with the same tensor as its K and V caches would read the
    K cache for both on every later call (issue 22)."""
    seen: set[int] = set()

    def own(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or v.device.type == "meta":
            return v
        key = v.untyped_storage().data_ptr()
        if key in seen:
            return v.clone()
        seen.add(key)
        return v

    return pytree.tree_map(own, examples)


def capture(
    model: torch.nn.Module,
    example_args: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic: bool = True,
) -> Captured:
    """Export a private copy of ``model``; symbolic sizes first, static sizes as the fallback."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"transform() expects an nn.Module, got {type(model).__name__}")
    # contiguous examples: export guards the example's strides, so a model captured from a slice
    # (e.g. ``tokens[:, :-1]``) would reject every contiguous input later with an opaque error
    example_args, example_kwargs = pytree.tree_map(
        lambda v: v.contiguous() if isinstance(v, torch.Tensor) else v,
        (tuple(example_args), dict(example_kwargs or {})),
    )
    example_args, example_kwargs = unaliased((example_args, example_kwargs))
    capture_warnings(model)  # issue 22: training mode and hooks are not captured
    private = private_copy(model).eval()  # (issue 22: an uncopyable attribute is named)
    errors = []
    static: list[str] = []
    note_static = ""
    attempts = [True, False] if dynamic else [False]
    for use_dynamic in attempts:
        try:
            kwargs: dict[str, Any] = {"strict": False}
            if use_dynamic:
                kwargs["dynamic_shapes"] = auto_dims(private, tuple(example_args), example_kwargs)
            with torch.no_grad(), markers.keep_whole(), quiet_specialisation():
                ep = torch.export.export(private, tuple(example_args), example_kwargs, **kwargs)
            written = state_write(ep)  # issue 22: state written in forward is refused
            if written is not None:
                raise written
            if local_writes(ep):
                ep = ep.run_decompositions({})
            gm = ep.module()
            if use_dynamic:
                static = _static_dims(gm)
                if static:
                    note_static = (
                        "; static: "
                        + ", ".join(static)
                        + " (example size 0 or 1 is specialised by torch.export)"
                    )
            if use_dynamic:
                note = "captured with symbolic sizes" + (note_static if static else "")
            else:
                note = "captured with static shapes (inputs must keep the example's shapes)"
            return Captured(gm, use_dynamic, note)
        except SNLPRefusal:
            raise
        except Exception as exc:  # torch.export raises many types; report them all
            errors.append(f"{'dynamic' if use_dynamic else 'static'}: {type(exc).__name__}: {exc}")
    text = "\n  ".join(e[:2000] for e in errors)
    hint = capture_hint(model, example_kwargs, text)  # issue 22: say what to do
    raise SNLPCaptureError(f"torch.export could not capture {type(model).__name__}:{hint}\n  " + text)
