"""The compiler's pipeline, as data: the passes ``transform()`` runs, in order.

    capture -> common_subexpressions -> find_chain -> analyse_skip        (ANALYSIS)
    -> plan -> emit [-> defer_kv] -> inline_markers                        (lowering)

Each pass is a ``(Compilation) -> PassResult`` function (``passes.infra``) over the state one
transform builds up: the captured graph, the LayerChain, the SolvePlan and the report. The
functions doing the work live in ``passes/``, take explicit arguments and are tested on their
own; the passes here only connect them to the compilation and count what they did.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .config import SNLPConfig, lowering_options, stage_sizes
from .diagnose import check_example_kwargs
from .errors import SNLPRefusal
from .ir.chain import Layer, LayerChain
from .ir.plan import SOLVE_NAME, SolveOptions, SolvePlan
from .passes.capture import capture, example_args
from .passes.cleanup import common_subexpressions, drop_unused_outputs, inline_marker_ops
from .passes.defer_kv import defer_kv
from .passes.emit import emit_solve
from .passes.find_chain import check_chain, find_layers
from .passes.graph_utils import op_name, source_line
from .passes.infra import PassManager, PassResult, PassRun
from .passes.lowering import lower
from .passes.plan import PlanOptions, plan_solve
from .passes.skip_analysis import analyse_skip
from .report import ExplainReport
from .verify import verify_pass


@dataclass
class Compilation:
    """One transform's worth of state, as the passes fill it in, in pipeline order."""

    model: Any  # the user's nn.Module (read only)
    example_args: tuple[Any, ...]
    example_kwargs: dict[str, Any] | None
    config: SNLPConfig
    report: ExplainReport
    gm: fx.GraphModule | None = None  # the captured graph (capture), rewritten in place (emit)
    container: str = ""  # find_chain: the ModuleList holding the layers
    layers: list[Layer] = field(default_factory=list)  # find_chain: every layer of the chain
    first_parallel: int = 0  # find_chain: the index of the first parallel layer
    chain: LayerChain | None = None  # analyse_skip: the LayerChain
    plan: SolvePlan | None = None  # plan: the SolvePlan

    def graph_module(self) -> fx.GraphModule:
        if self.gm is None:
            raise RuntimeError("no captured graph yet: run the capture pass first")
        return self.gm

    def layer_chain(self) -> LayerChain:
        if self.chain is None:
            raise RuntimeError("no LayerChain yet: run find_chain and analyse_skip first")
        return self.chain

    def solve_plan(self) -> SolvePlan:
        if self.plan is None:
            raise RuntimeError("no SolvePlan yet: run the plan pass first")
        return self.plan


Pass = Callable[[Compilation], PassResult]


def capture_pass(c: Compilation) -> PassResult:
    """The model as a torch.fx graph (torch.export, a private copy of the model)."""
    captured = capture(c.model, c.example_args, c.example_kwargs, dynamic=c.config.dynamic_shapes)
    c.gm = captured.graph_module
    c.report.capture = captured.note
    return PassResult(True, {"nodes": len(c.gm.graph.nodes)})


def cse_pass(c: Compilation) -> PassResult:
    """Merge identical pure computations, so that equal values look equal to the matcher, and
    erase unread picks of multi-output ops (which would read a layer's intermediate value)."""
    dropped = drop_unused_outputs(c.graph_module())
    merged = common_subexpressions(c.graph_module())
    return PassResult(merged + dropped > 0, {"nodes merged": merged, "unused outputs dropped": dropped})


def find_chain_pass(c: Compilation) -> PassResult:
    """The layer container, the layers matching the last one, how many of them run in parallel
    (``SNLPConfig.parallel_layers``, ``stages``), and proof that they form a chain."""
    gm, config = c.graph_module(), c.config
    report = c.report
    container, layers, notes = find_layers(gm, config.layers)
    report.container = container
    report.notes.extend(notes)
    total = _container_size(gm, container)
    report.layers = [f"{container}.{i}" if container else str(i) for i in range(total)]
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
    if isinstance(config.stages, int) and config.stages > n_par:
        raise SNLPRefusal(
            f"SNLPConfig.stages={config.stages} but only {n_par} layers of '{container}' are solved in "
            f"parallel: at most {n_par} stages (one layer each)",
            module_path=container,
        )
    report.stages = stage_sizes(n_par, config.stages)
    c.container, c.layers, c.first_parallel = container, layers, len(layers) - n_par
    return PassResult(False, {"layers": total, "matching": len(layers), "parallel": n_par}, tuple(notes))


def analyse_skip_pass(c: Compilation) -> PassResult:
    """The template's skip path (the surrogate Jacobian) and the readers of hidden states: the
    LayerChain."""
    parallel = c.layers[c.first_parallel :]
    readers = check_chain(c.graph_module(), parallel)
    template = c.layers[-1]
    skip = analyse_skip(template)
    notes = [n for n in c.report.notes]  # find_chain's notes travel with the chain
    c.chain = LayerChain(c.container, c.layers, c.first_parallel, template, skip, readers, notes)
    report = c.report
    report.parallel_layers = [layer.module_path for layer in parallel]
    report.skip = skip.description
    report.body_ops = dict(Counter(op_name(n) for n in template.nodes))
    report.readers = [
        f"{r.node.name} ({', '.join(x for x in (r.module_path or '<root>', source_line(r.node)) if x)}) reads "
        + ("the chain input" if r.layer_index < parallel[0].index else f"the output of layer {r.layer_index}")
        for r in readers
    ]
    return PassResult(False, {"hidden-state readers": len(readers)})


def plan_pass(c: Compilation) -> PassResult:
    """The SolvePlan: externals classified and folded, bodies batched, linears fused."""
    config = c.config
    options = SolveOptions(iterations=config.iterations, init=config.init, damping=config.damping)
    planning = PlanOptions(last_row=lowering_options(config).last_row)
    c.plan = plan = plan_solve(
        c.graph_module(),
        c.layer_chain(),
        options,
        stages=config.stages,
        planning=planning,
        fused_layers=config.fused_layers,
    )
    modes = Counter(e.mode for e in plan.externals)
    counts = {f"{mode} inputs": modes[mode] for mode in ("stacked", "runtime", "shared")}
    wide = (plan.wide.first, plan.wide.second) if plan.wide is not None else ()
    bodies = (plan.layers, plan.layers_short, plan.side_layers, *wide)
    counts["batched bodies"] = sum(g is not None for g in bodies)
    counts["fused weights"] = len(plan.fused)
    counts["vmap fallbacks"] = len(plan.fallbacks)
    return PassResult(True, counts, plan.notes)


def emit_pass(c: Compilation) -> PassResult:
    """The parallel layers replaced by one call to the solve."""
    chain, plan = c.layer_chain(), c.solve_plan()
    before = len(c.graph_module().graph.nodes)
    gm = emit_solve(c.graph_module(), chain, plan)
    solve = gm.get_submodule(SOLVE_NAME)
    c.report.externals = [
        (e.name, e.mode, _stack_shape(solve, e.name, e.mode, ext))
        for e, ext in zip(plan.externals, chain.template.externals)
    ]
    c.report.origins = {  # (weights are named by their parameter path already)
        e.name: source_line(ext)
        for e, ext in zip(plan.externals, chain.template.externals)
        if ext.op != "get_attr"
    }
    return PassResult(True, {"nodes removed": before - len(gm.graph.nodes)})


def defer_kv_pass(c: Compilation) -> PassResult:
    """Deferred K/V (``SNLPConfig.deferred_kv``): a decode step's K/V one step late."""
    notes = defer_kv(c.graph_module(), SOLVE_NAME)
    return PassResult(True, {}, tuple(notes))


def inline_markers_pass(c: Compilation) -> PassResult:
    """Marker ops left in the graphs replaced by the functions they stand for."""
    count = inline_marker_ops(c.graph_module())
    return PassResult(count > 0, {"marker ops inlined": count})


def lower_pass(c: Compilation) -> PassResult:
    """The config's kernel choices (``SNLPConfig.lowering``) written into the graphs' calls."""
    count = lower(c.graph_module(), lowering_options(c.config))
    return PassResult(count > 0, {"calls lowered": count})


ANALYSIS: tuple[Pass, ...] = (capture_pass, cse_pass, find_chain_pass, analyse_skip_pass)


def lowering(config: SNLPConfig) -> tuple[Pass, ...]:
    """The passes after analysis that ``config`` asks for."""
    return (
        plan_pass,
        emit_pass,
        *((defer_kv_pass,) if config.deferred_kv else ()),
        inline_markers_pass,
        lower_pass,
        # issue 22: the safety net (snlp_compile.verify); it compares with the unfused model, whose
        # function wide layers change on purpose (tests/test_fusion.py checks them against a reference)
        *((verify_pass,) if config.verify and config.fused_layers == 1 else ()),
    )


def pipeline(config: SNLPConfig) -> tuple[Pass, ...]:
    """Every pass ``transform()`` runs for ``config``, in order."""
    return ANALYSIS + lowering(config)


def compilation(
    model: torch.nn.Module, example_inputs: Any, config: SNLPConfig, example_kwargs: dict[str, Any] | None
) -> Compilation:
    check_example_kwargs(example_kwargs)  # issue 22: a one-line error, not a TypeError from inside
    report = ExplainReport(model=type(model).__name__, config=_config_text(config))
    return Compilation(model, example_args(example_inputs), example_kwargs, config, report)


def run(c: Compilation, passes: tuple[Pass, ...]) -> PassRun:
    """Run ``passes`` over ``c``, the graph linted after each; what they did goes to ``c.report``
    (a refusal stops them and is set on it, not raised)."""
    run = PassManager(passes, check=_lint).run(c)
    report = c.report
    for record in run.records:
        report.passes.append((record.name, record.result))
        report.pass_seconds[record.name] = report.pass_seconds.get(record.name, 0.0) + record.seconds
        report.notes.extend(n for n in record.result.notes if n not in report.notes)
    if run.refusal is not None:
        report.refusal, report.error, report.refused_in = str(run.refusal), run.refusal, run.refused_in
    return run


def _lint(c: Compilation) -> None:
    if c.gm is not None:
        c.gm.graph.lint()


def _container_size(gm: fx.GraphModule, container: str) -> int:
    sub = gm.get_submodule(container) if container else gm
    return len(list(sub.children())) if sub is not None else 0


def _config_text(config: SNLPConfig) -> str:
    return (
        f"K={config.iterations}, parallel_layers={config.parallel_layers or 'all'}, init={config.init}, "
        f"damping={config.damping}, stages={config.stages}"
        + (f", fused_layers={config.fused_layers}" if config.fused_layers > 1 else "")
    )


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"{tuple(val.shape)} {str(val.dtype).replace('torch.', '')}"
    return type(val).__name__ if val is not None else "?"


def _stack_shape(solve: torch.nn.Module, name: str, mode: str, node: fx.Node) -> str:
    if mode == "stacked":
        t = getattr(solve, f"stacked_{name}")
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
    return _shape(node)
