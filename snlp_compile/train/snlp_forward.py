"""The model's output computed through the K-iteration SNLP solve, differentiable in the model's
own parameters: what "direct SNLP-forward fine-tuning" (the paper's v2) trains through.

    snlp = SNLPForward(model, (idx,), SNLPConfig(parallel_layers=8, iterations=2))
    logits = snlp(idx)                          # == transform(model, (idx,), same config)(idx)
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()   # grads on model's parameters

The graph is the one ``transform()`` emits (the sequential prefix as written, one call to the
layer-parallel solve, the solved trace read where the model read hidden states: final norm, head,
backout readers), with one difference: the parallel layers' weights are not stacked once into
buffers of the solve but stacked from the model's live parameters at every call (``torch.stack``
inside the graph, run with ``torch.func.functional_call``, see ``live.py``), so gradients reach
the model's own parameters and an optimiser step is seen by the next call. Works for any model
``transform()`` accepts (same capture, same analysis, same refusals). Inits: "h0" and "batch_fwd";
"warm" (the previous call's trace, a decoding init) has no meaning across training batches and is
refused: train with "h0". With ``fused_layers`` (wide layers) it trains the fused function, at
K >= the number of wide layers exactly (the paper's fused models, trained through the solve).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from ..api import analyse
from ..config import SNLPConfig, resolve_config
from ..errors import SNLPConfigError, SNLPRefusal
from ..ir import LayerChain
from ..ir.plan import SolveOptions
from ..passes.emit import solve_call_graph
from ..passes.plan import TRAINING, build_solve
from ..solve.solver import LayerParallelSolve
from .live import LiveGraph, training_capture

SOLVE = "snlp_live_solve"


class SNLPForward:
    """``model``'s output computed through the SNLP solve of ``config`` (an ``SNLPConfig``, or
    keyword overrides as for ``transform()``), with the model's live parameters.

    ``example_inputs`` / ``example_kwargs`` are as for ``transform()``; the model is captured once
    (dynamic shapes by default, so other batch and sequence sizes work). ``solve.iterations`` can
    be changed after construction (K). Raises SNLPRefusal where ``transform()`` would refuse,
    SNLPConfigError for ``init="warm"`` and ``deferred_kv``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        example_inputs: Any,
        config: SNLPConfig | None = None,
        *,
        example_kwargs: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> None:
        cfg = resolve_config(config, overrides)
        if cfg.init == "warm":
            raise SNLPConfigError(
                "SNLPForward: init='warm' starts from the previous call's trace (a decoding init); "
                "across training batches it means nothing: train with init='h0'"
            )
        if cfg.deferred_kv:
            raise SNLPConfigError("SNLPForward: deferred_kv is a decode-step option, not for training")
        self.model = model
        self.config = cfg
        with training_capture():  # (a model being trained is in training mode: expected here)
            gm, chain, report = analyse(model, example_inputs, cfg, example_kwargs)
        if chain is None:
            assert report.error is not None
            raise report.error
        if chain.template.side_outputs:
            raise SNLPRefusal(
                "SNLPForward takes a full forward; this capture hands out per-layer side outputs "
                "(a KV-cached step)"
            )
        self.chain: LayerChain = chain
        self.report = report
        module, self.solve = _live_solve_graph(gm, chain, cfg)
        self._live = LiveGraph(model, gm, module)

    @property
    def parallel_layers(self) -> int:
        return self.chain.num_parallel

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """What ``model(*args, **kwargs)`` returns, computed through the solve."""
        return self._live(args, kwargs)


def _live_solve_graph(
    gm: fx.GraphModule, chain: LayerChain, config: SNLPConfig
) -> tuple[fx.GraphModule, LayerParallelSolve]:
    """``passes.emit``'s graph surgery with every per-layer external passed at run time (stacked in
    the graph from the live tensors) instead of stacked into buffers at transform time."""
    options = SolveOptions(iterations=config.iterations, init=config.init, damping=config.damping)
    # a forward reads only the trace's last row where nothing else reads a hidden state
    planning = dataclasses.replace(TRAINING, last_row=True)
    plan, solve = build_solve(
        gm, chain, options, stages=config.stages, planning=planning, fused_layers=config.fused_layers
    )
    for ext in plan.passed:
        column = ext.column
        if ext.mode != "shared" and any(
            c.meta.get("val") is not None and not isinstance(c.meta["val"], torch.Tensor) for c in column
        ):
            raise SNLPRefusal(
                f"the layers read different non-tensor values for '{ext.name}' "
                f"({', '.join(c.name for c in column)})",
                node=column[0].name,
            )

    gm.add_submodule(SOLVE, solve)
    graph = solve_call_graph(gm, chain, plan, SOLVE)
    return fx.GraphModule(gm, graph, class_name="SNLPForwardGraph"), solve
