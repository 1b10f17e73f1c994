"""Public entry points: transform(), explain(), solve_trace(); analyse() for the training code.

The passes they run are ``pipeline``'s; ``inference_graph`` gives the result its behaviour (its
report and config kept across copies, .eval(), .train(), .to()).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from . import call_convention
from .config import SNLPConfig, resolve_config
from .diagnose import failed
from .inference_graph import as_inference_graph
from .ir.chain import LayerChain
from .ir.plan import SOLVE_NAME
from .pipeline import ANALYSIS, Compilation, compilation, pipeline, run
from .report import ExplainReport
from .solve.handle import solve_handle


def analyse(
    model: torch.nn.Module,
    example_inputs: Any,
    config: SNLPConfig,
    example_kwargs: dict[str, Any] | None = None,
) -> tuple[fx.GraphModule, LayerChain | None, ExplainReport]:
    """Capture and analyse (``pipeline.ANALYSIS``); the chain is None (and report.refusal set)
    when the model is refused."""
    c = compilation(model, example_inputs, config, example_kwargs)
    run(c, ANALYSIS)
    return c.graph_module(), c.chain, c.report


def _compile(
    model: torch.nn.Module, example_inputs: Any, cfg: SNLPConfig, example_kwargs: dict[str, Any] | None
) -> Compilation:
    """Run the whole pipeline; a refusal stops it and is set on the report."""
    c = compilation(model, example_inputs, cfg, example_kwargs)
    run(c, pipeline(cfg))
    return c


def transform(
    model: torch.nn.Module,
    example_inputs: Any,
    config: SNLPConfig | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
) -> fx.GraphModule:
    """Rewrite ``model``'s residual layer chain into the layer-parallel SNLP solve.

    Returns a new module (a torch.fx GraphModule) with the model's call signature and readable
    ``.code``; ``model`` itself is never modified. Raises SNLPRefusal, naming the node and module
    path, when the structure cannot be rewritten without changing the function it computes.
    """
    out, report = try_transform(model, example_inputs, config, example_kwargs=example_kwargs, **overrides)
    if out is None:
        assert report.error is not None
        raise report.error
    return out


def try_transform(
    model: torch.nn.Module,
    example_inputs: Any,
    config: SNLPConfig | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
) -> tuple[fx.GraphModule | None, ExplainReport]:
    """transform() and explain() in one capture: (the rewritten model, its report), or (None, the
    report saying why the model is refused)."""
    cfg = resolve_config(config, overrides)
    c = _compile(model, example_inputs, cfg, example_kwargs)
    if c.report.error is not None:
        return None, c.report
    out = as_inference_graph(c.graph_module(), c.report, cfg)
    dynamic = (c.report.capture or "").startswith("captured with symbolic")
    call_convention.record(out, model, c.example_args, c.example_kwargs or {}, dynamic)
    return out, c.report


def explain(
    model: torch.nn.Module,
    example_inputs: Any,
    config: SNLPConfig | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
) -> ExplainReport:
    """What transform() would do with ``model``, refusals included. This never raises: any failure
    (bad input, a capture error, an error in a pass) becomes the report's refusal (issue 22)."""
    try:
        cfg = resolve_config(config, overrides)
        c = compilation(model, example_inputs, cfg, example_kwargs)
    except Exception as exc:
        return failed(ExplainReport(model=type(model).__name__), exc)
    try:
        run(c, pipeline(cfg))
    except Exception as exc:
        failed(c.report, exc)
    return c.report


def solve_trace(
    transformed: fx.GraphModule, *flat_inputs: Any, iterations: int | None = None
) -> torch.Tensor:
    """The solved hidden-state trace (N, *hidden) of a transformed model, for tests and analysis.

    ``flat_inputs`` are the model's tensor inputs in order; ``iterations`` overrides K.
    """
    handle = solve_handle(transformed)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in transformed.graph.nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n.op == "call_module" and n.target == SOLVE_NAME:
            graph.output(env[n])
            break
    gm = fx.GraphModule(transformed, graph)
    with handle.whole_trace(iterations):  # the whole trace, though the model reads only its last row
        out = gm(*flat_inputs)
    return out[0] if isinstance(out, tuple) else out  # (trace, *side outputs) with side outputs
