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
refused: train with "h0".
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ..api import analyse
from ..config import SNLPConfig, resolve_config
from ..errors import SNLPConfigError, SNLPRefusal
from ..ir import LayerChain
from ..ir.plan import SolveOptions
from ..passes.graph_utils import descendants
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
    """``passes.emit.emit_solve`` with every per-layer external passed at run time (stacked in the
    graph from the live tensors) instead of stacked into buffers at transform time."""
    par = chain.parallel_layers
    options = SolveOptions(iterations=config.iterations, init=config.init, damping=config.damping)
    plan, solve = build_solve(gm, chain, options, chunks=config.chunks, planning=TRAINING)
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

    region = {n for layer in par for n in layer.nodes}
    after = descendants(region) - region
    outputs = {layer.output: j for j, layer in enumerate(par)}
    gm.add_submodule(SOLVE, solve)
    old = gm.graph
    graph = fx.Graph(owning_module=gm, tracer_cls=old._tracer_cls)
    graph._codegen = old._codegen
    env: dict[fx.Node, fx.Node] = {}
    for n in old.nodes:
        if n not in region and n not in after:
            env[n] = graph.node_copy(n, lambda a: env[a])
    args: list[fx.Node] = [env[par[0].hidden_in]]
    for ext in plan.passed:
        if ext.mode == "shared":
            args.append(env[ext.column[0]])
        else:
            args.append(graph.call_function(torch.stack, ([env[c] for c in ext.column],)))
    trace = graph.call_module(SOLVE, tuple(args))
    read = {j for out_node, j in outputs.items() if any(u not in region for u in out_node.users)}
    solve.last_row_only = read == {len(par) - 1}  # a forward: the last row is all it needs
    for out_node, j in outputs.items():
        if j in read:
            env[out_node] = graph.call_function(operator.getitem, (trace, -1 if solve.last_row_only else j))
    for n in old.nodes:
        if n in after:
            if (
                len(n.users) == 0
                and n.op == "call_function"
                and any(a in region and a not in outputs for a in n.all_input_nodes)
            ):
                continue  # a shape assert on a layer intermediate: the layer no longer exists
            env[n] = graph.node_copy(n, lambda a: env[a])
    for n in reversed(list(graph.nodes)):
        if not n.users and (n.op == "get_attr" or (n.op == "call_function" and not n.is_impure())):
            graph.erase_node(n)
    graph.lint()
    return fx.GraphModule(gm, graph, class_name="SNLPForwardGraph"), solve
