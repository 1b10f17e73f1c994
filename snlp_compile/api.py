"""Public entry points: transform(), explain(), solve_trace()."""

from __future__ import annotations

import itertools
import types
from collections import Counter
from typing import Any

import torch
import torch.fx as fx

from .config import SNLPConfig, chunk_sizes, resolve_config
from .errors import SNLPRefusal, SNLPUsageError
from .ir import LayerChain
from .ir.plan import SOLVE_NAME, SolveOptions
from .options import ENVIRONMENT
from .passes.capture import capture, example_args
from .passes.cleanup import common_subexpressions, inline_marker_ops
from .passes.defer_kv import defer_kv
from .passes.emit import emit_solve
from .passes.find_chain import check_chain, find_layers
from .passes.graph_utils import op_name, retarget_devices
from .passes.infra import run_passes
from .passes.plan import PlanOptions, plan_solve
from .passes.skip_split import analyse_skip
from .report import ExplainReport


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"{tuple(val.shape)} {str(val.dtype).replace('torch.', '')}"
    return type(val).__name__ if val is not None else "?"


def analyse(
    model: torch.nn.Module,
    example_inputs: Any,
    config: SNLPConfig,
    example_kwargs: dict[str, Any] | None = None,
) -> tuple[fx.GraphModule, LayerChain | None, ExplainReport]:
    """Capture and analyse; the chain is None (and report.refusal set) when the model is refused."""
    report = ExplainReport(model=type(model).__name__, config=_config_text(config))
    captured = capture(model, example_args(example_inputs), example_kwargs, dynamic=config.dynamic_shapes)
    report.capture = captured.note
    gm, _ = run_passes(captured.graph_module, [common_subexpressions])
    try:
        container, layers, notes = find_layers(gm, config.layers)
        report.container = container
        report.notes.extend(notes)
        total = _container_size(gm, container)
        report.layers = [f"{container}.{i}" for i in range(total)]
        n_par = len(layers) if config.parallel_layers is None else config.parallel_layers
        if n_par > len(layers):
            raise SNLPRefusal(
                f"SNLPConfig.parallel_layers={config.parallel_layers} but only the last {len(layers)} of "
                f"{total} layers of '{container}' can be solved in parallel",
                module_path=container,
            )
        if n_par < 2:
            why = f" ({'; '.join(notes)})" if notes else ""
            raise SNLPRefusal(
                f"fewer than two layers of '{container}' can be solved in parallel: nothing to rewrite{why}",
                module_path=container,
            )
        if config.chunks > n_par:
            raise SNLPRefusal(
                f"SNLPConfig.chunks={config.chunks} but only {n_par} layers of '{container}' are solved in "
                f"parallel: at most {n_par} chunks (one layer each)",
                module_path=container,
            )
        report.chunks = chunk_sizes(n_par, config.chunks)
        parallel = layers[len(layers) - n_par :]
        readers = check_chain(gm, parallel)
        template = layers[-1]
        skip = analyse_skip(template)
        chain = LayerChain(container, layers, len(layers) - n_par, template, skip, readers, notes)
        report.parallel_layers = [layer.module_path for layer in parallel]
        report.skip = skip.description
        report.body_ops = dict(Counter(op_name(n) for n in template.nodes))
        report.readers = [
            f"{r.node.name} ({r.module_path or '<root>'}) reads "
            + (
                "the chain input"
                if r.layer_index < parallel[0].index
                else f"the output of layer {r.layer_index}"
            )
            for r in readers
        ]
        return gm, chain, report
    except SNLPRefusal as refusal:
        report.refusal = str(refusal)
        report.error = refusal
        return gm, None, report


def _container_size(gm: fx.GraphModule, container: str) -> int:
    sub = gm.get_submodule(container) if container else gm
    return len(list(sub.children())) if sub is not None else 0


def _config_text(config: SNLPConfig) -> str:
    return (
        f"K={config.iterations}, parallel_layers={config.parallel_layers or 'all'}, init={config.init}, "
        f"damping={config.damping}, chunks={config.chunks}"
    )


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
    cfg = resolve_config(config, overrides)
    gm, chain, report = analyse(model, example_inputs, cfg, example_kwargs)
    if chain is None:
        assert report.error is not None
        raise report.error
    options = SolveOptions(iterations=cfg.iterations, init=cfg.init, damping=cfg.damping)
    plan = plan_solve(
        gm, chain, options, chunks=cfg.chunks, planning=PlanOptions(last_row=ENVIRONMENT.last_row)
    )
    out = emit_solve(gm, chain, plan)
    notes = list(plan.notes)
    if cfg.deferred_kv:
        notes.extend(defer_kv(out, SOLVE_NAME))
    inline_marker_ops(out)
    report.notes.extend(n for n in notes if n not in report.notes)  # what the rewrite decided
    solve = out.get_submodule(SOLVE_NAME)
    report.externals = [
        (name, mode, _stack_shape(solve, name, mode, ext))
        for name, mode, ext in zip(solve.ext_names, solve.ext_modes, chain.template.externals)
    ]
    out.snlp_report = report
    out.snlp_config = cfg
    weight = _first_float_tensor(out)
    out.meta[_GRAPH_DEVICE] = None if weight is None else weight.device  # what factory ops were captured on
    _inference_mode_switches(out)
    _survive_copies(out)
    return out


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
    if isinstance(converted, torch.Tensor) and converted.dtype != t.dtype:
        raise SNLPUsageError(
            f"the rewritten model was captured in {t.dtype} and its graph keeps that dtype; converting it "
            f"to {converted.dtype} is not supported: convert the model first, then transform() it "
            "(moving it to another device is fine)"
        )
    moved = type(self)._apply(self, fn, recurse)
    # the graph's own factory ops follow; their device is recorded at transform time, not read off
    # a weight, which the original model may share with this one and may have moved already
    graph_device = getattr(self, "meta", {}).get(_GRAPH_DEVICE)
    if isinstance(converted, torch.Tensor) and graph_device is not None and converted.device != graph_device:
        retarget_devices(self, graph_device, converted.device)
        self.meta[_GRAPH_DEVICE] = converted.device
    return moved


def _inference_mode_switches(gm: torch.nn.Module) -> None:
    """torch.export's module raises NotImplementedError on .eval()/.train() (bound on the instance,
    as here). The rewrite is captured in eval mode, so .eval() (what every inference script calls)
    is a no-op and .train() a clear error; dtype conversions (.half(), .to(dtype)) are refused
    before anything is converted."""
    gm.train = types.MethodType(_train_inference_graph, gm)
    gm.eval = types.MethodType(_eval_inference_graph, gm)
    gm._apply = types.MethodType(_apply_keeping_dtypes, gm)


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


def _stack_shape(solve: torch.nn.Module, name: str, mode: str, node: fx.Node) -> str:
    if mode == "stacked":
        t = getattr(solve, f"stacked_{name}")
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
    return _shape(node)


def explain(
    model: torch.nn.Module,
    example_inputs: Any,
    config: SNLPConfig | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
) -> ExplainReport:
    """What transform() would do with ``model``, refusals included (this never raises SNLPRefusal)."""
    cfg = resolve_config(config, overrides)
    try:
        return transform(model, example_inputs, cfg, example_kwargs=example_kwargs).snlp_report
    except SNLPRefusal:
        _, _, report = analyse(model, example_inputs, cfg, example_kwargs)
        return report


def solve_trace(
    transformed: fx.GraphModule, *flat_inputs: Any, iterations: int | None = None
) -> torch.Tensor:
    """The solved hidden-state trace (N, *hidden) of a transformed model, for tests and analysis.

    ``flat_inputs`` are the model's tensor inputs in order; ``iterations`` overrides K.
    """
    solve = transformed.get_submodule(SOLVE_NAME)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in transformed.graph.nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n.op == "call_module" and n.target == SOLVE_NAME:
            graph.output(env[n])
            break
    gm = fx.GraphModule(transformed, graph)
    saved = solve.iterations, solve.last_row_only
    try:
        if iterations is not None:
            solve.iterations = iterations
        solve.last_row_only = False  # the whole trace, though the model reads only its last row
        out = gm(*flat_inputs)
        return out[0] if isinstance(out, tuple) else out  # (trace, *side outputs) with side outputs
    finally:
        solve.iterations, solve.last_row_only = saved
