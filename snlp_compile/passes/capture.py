"""Capture: nn.Module -> torch.fx GraphModule through torch.export (non-strict).

Non-strict export runs the user's Python as written (asserts, shape arithmetic, control flow on
sizes) and keeps ``nn_module_stack`` on every node, which is how layers are found later. The
model is deep-copied first, so nothing the compiler does can reach the user's parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim

from ..errors import SNLPCaptureError


@dataclass
class Captured:
    graph_module: fx.GraphModule
    dynamic: bool
    note: str


def _auto_dims(example_args: tuple[Any, ...], example_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """Mark every dimension of every tensor input as AUTO: export keeps symbolic what it can."""

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(x.dim())}
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    return spec(example_args), {k: spec(v) for k, v in example_kwargs.items()}


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
    example_kwargs = dict(example_kwargs or {})
    private = copy.deepcopy(model).eval()
    errors = []
    attempts = [True, False] if dynamic else [False]
    for use_dynamic in attempts:
        try:
            kwargs: dict[str, Any] = {"strict": False}
            if use_dynamic:
                dyn_args, dyn_kwargs = _auto_dims(example_args, example_kwargs)
                kwargs["dynamic_shapes"] = (*dyn_args, *([dyn_kwargs] if dyn_kwargs else []))
                if example_kwargs:
                    # dynamic_shapes for mixed args/kwargs are given as a dict keyed by parameter name
                    kwargs["dynamic_shapes"] = None
            with torch.no_grad():
                ep = torch.export.export(private, tuple(example_args), example_kwargs, **kwargs)
            gm = ep.module()
            note = "captured with symbolic batch/sequence sizes" if use_dynamic and kwargs.get(
                "dynamic_shapes"
            ) is not None else "captured with static shapes (inputs must keep the example's shapes)"
            return Captured(gm, bool(use_dynamic and kwargs.get("dynamic_shapes") is not None), note)
        except Exception as exc:  # torch.export raises many types; report them all
            errors.append(f"{'dynamic' if use_dynamic else 'static'}: {type(exc).__name__}: {exc}")
    raise SNLPCaptureError(
        f"torch.export could not capture {type(model).__name__}:\n  " + "\n  ".join(e[:2000] for e in errors)
    )
