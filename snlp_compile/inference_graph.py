"""The rewritten model as an inference graph: what a GraphModule from transform() does beyond
running its graph.

It keeps its explain() report and config (``.snlp_report``, ``.snlp_config``) across copies,
``.eval()`` is a no-op and ``.train()`` a clear error (the graph was captured in eval mode),
dtype conversions are refused before anything converts, and a move to another device also moves
the device the graph's own factory ops (masks, positions) were captured on.
"""

from __future__ import annotations

import itertools
import types
from typing import Any

import torch
import torch.fx as fx

from . import call_convention
from .config import SNLPConfig
from .errors import SNLPUsageError
from .passes.graph_utils import retarget_devices
from .report import ExplainReport


def as_inference_graph(gm: fx.GraphModule, report: ExplainReport, config: SNLPConfig) -> fx.GraphModule:
    """``gm`` (transform()'s result), given its report, config and inference behaviour; in place."""
    setattr(gm, "snlp_report", report)  # noqa: B010 (a GraphModule's attributes are typed as its submodules)
    setattr(gm, "snlp_config", config)  # noqa: B010
    weight = _first_float_tensor(gm)
    gm.meta[_GRAPH_DEVICE] = None if weight is None else weight.device  # what factory ops were captured on
    _inference_mode_switches(gm)
    _survive_copies(gm)
    return gm


def _train_inference_graph(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    if mode:
        raise SNLPUsageError(
            "the rewritten model is an inference graph (captured in eval mode: dropout off, no training "
            "behaviour); train the original model (snlp_compile.train has the SNLP-aware regulariser) "
            "and transform it again"
        )
    return self


def _eval_inference_graph(self: torch.nn.Module) -> torch.nn.Module:
    return self


_GRAPH_DEVICE = "snlp_graph_device"


def _first_float_tensor(module: torch.nn.Module) -> torch.Tensor | None:
    return next(
        (t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()), None
    )


def _apply_keeping_dtypes(self: torch.nn.Module, fn: Any, recurse: bool = True) -> torch.nn.Module:
    """Module._apply (behind .to(), .cuda(), .half(), ...) for moves only: the captured graph
    records its dtypes (casts, masks), so converting the weights alone would fail deep inside
    torch or compute in a mix of precisions. Checked on an empty probe before anything moves.
    A move also moves the device the graph's factory ops (masks, positions) were captured on."""
    t = _first_float_tensor(self)
    converted = None if t is None else fn(torch.empty(0, dtype=t.dtype, device=t.device))
    if t is not None and isinstance(converted, torch.Tensor) and converted.dtype != t.dtype:
        raise SNLPUsageError(
            f"the rewritten model was captured in {t.dtype} and its graph keeps that dtype; converting it "
            f"to {converted.dtype} is not supported: convert the model first, then transform() it "
            "(moving it to another device is fine)"
        )
    moved = type(self)._apply(self, fn, recurse)
    # the graph's own factory ops follow; their device is recorded at transform time, not read off
    # a weight, which the original model may share with this one and may have moved already
    meta: dict[str, Any] = getattr(self, "meta", {})
    graph_device = meta.get(_GRAPH_DEVICE)
    if (
        isinstance(self, fx.GraphModule)
        and isinstance(converted, torch.Tensor)
        and graph_device is not None
        and converted.device != graph_device
    ):
        retarget_devices(self, graph_device, converted.device)
        meta[_GRAPH_DEVICE] = converted.device
    return moved


def _inference_mode_switches(gm: torch.nn.Module) -> None:
    """torch.export's module raises NotImplementedError on .eval()/.train() (bound on the instance,
    as here). The rewrite is captured in eval mode, so .eval() (what every inference script calls)
    is a no-op and .train() a clear error; dtype conversions (.half(), .to(dtype)) are refused
    before anything is converted."""
    # bound on the instance (setattr: mypy forbids assigning to a method)
    setattr(gm, "train", types.MethodType(_train_inference_graph, gm))  # noqa: B010
    setattr(gm, "eval", types.MethodType(_eval_inference_graph, gm))  # noqa: B010
    setattr(gm, "_apply", types.MethodType(_apply_keeping_dtypes, gm))  # noqa: B010
    call_convention.install(gm)  # issue 22: optional keywords, clear errors for other calls


def _survive_copies(gm: torch.nn.Module) -> None:
    """A GraphModule's copies are rebuilt from its graph and drop instance attributes: keep the
    report and config (fx's preserved-attributes key, re-set by deepcopy) and re-bind the mode
    switches on every deep copy (fx's deepcopy hook)."""
    if not isinstance(gm, fx.GraphModule):
        return
    gm.meta.setdefault("_user_preserved_attributes", {}).update(
        snlp_report=gm.snlp_report, snlp_config=gm.snlp_config
    )
    register = getattr(gm, "_register_deepcopy_hook", None)
    if register is not None:
        register(_inference_mode_switches)
