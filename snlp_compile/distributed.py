"""Layer-parallel decoding across processes: the cached steps ``Decoder(..., process_group=group)``
runs, one contiguous block of the parallel layers per rank (``solve.distributed`` has the math).

Built on the SolvePlan: the model's cached step is transformed once per step kind with
``stages = G`` (so the plan's batched bodies are already the blocks' sizes and its static products
restart at each block), then each rank keeps its block's rows of the stacked weights (a local
plan), and the graph's solve becomes a ``DistributedSolve``. The rest of the graph (embedding,
final norm, head) is replicated: every rank computes the logits from the last layer's output,
which every rank knows after the last all_gather. Each rank's K/V caches hold its block's layers
only: the graph slices the parallel layers' rows from the cache it is given, and here that is the
block's cache, of the block's size.

Prefill: ``prefill="sequential"`` runs the exact model distributed as a pipeline (rank r runs its
layers after rank r-1); ``"solve"`` runs the distributed solve with the config's K. A Decoder
without a config decodes with the pipeline too.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from .config import SNLPConfig, lowering_options, stage_sizes
from .errors import SNLPConfigError, SNLPRefusal
from .inference_graph import as_inference_graph
from .ir.plan import SOLVE_NAME, SolvePlan
from .models.kv import CachedStep, cache_shape, new_cache
from .passes.batch_layers import batch_body
from .passes.cleanup import inline_marker_ops
from .passes.lowering import lower
from .pipeline import compilation, pipeline, plan_pass, run
from .solve.distributed import DistributedSolve, Mode


@dataclass
class LayerParallelSteps:
    """What a Decoder across processes runs on one rank: its steps and its block's caches."""

    decode_step: fx.GraphModule
    prefill_step: LazyStep
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    layers: range  # this rank's layers


class LazyStep:
    """A step transformed at its first call: the prefill (any prompt length >= 2), which a Decoder
    that only ever sees one-token prompts never needs."""

    def __init__(self, build: Callable[[], fx.GraphModule]):
        self.build = build
        self.step: fx.GraphModule | None = None

    def __call__(self, *args: torch.Tensor) -> Any:
        if self.step is None:
            self.step = self.build()
        return self.step(*args)


def rank_layers(num_layers: int, group: dist.ProcessGroup) -> range:
    """The contiguous block of ``num_layers`` layers rank ``group``'s rank holds (the larger
    blocks first, as ``SNLPConfig.stages`` splits)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = stage_sizes(num_layers, world)
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])


def check_config(config: SNLPConfig | None) -> None:
    """Refuse, in one line, what the solve across processes does not do."""
    if config is None:
        return
    if config.stages != 1:
        raise SNLPConfigError("across processes the blocks are the ranks': leave SNLPConfig.stages at 1")
    if config.deferred_kv:
        raise SNLPConfigError("SNLPConfig.deferred_kv is not supported across processes")
    if config.init == "batch_fwd":
        raise SNLPConfigError(
            "init='batch_fwd' is not supported across processes (a block's first input is the "
            "previous rank's evaluation): use 'h0' or 'warm'"
        )
    if config.parallel_layers is not None:
        raise SNLPConfigError(
            "across processes every layer is parallel: leave SNLPConfig.parallel_layers at None"
        )


def layer_parallel_steps(
    model: nn.Module,
    config: SNLPConfig | None,
    *,
    batch: int,
    max_len: int,
    prefill: str,
    group: dist.ProcessGroup,
) -> LayerParallelSteps:
    """This rank's decode and prefill steps (the cached step's call signature) and block caches."""
    if not dist.is_initialized():
        raise SNLPConfigError("process_group given but torch.distributed is not initialised")
    check_config(config)
    num_layers = cache_shape(model, 1, 1)[0]
    world = dist.get_world_size(group)
    if world > num_layers:
        raise SNLPConfigError(
            f"{world} processes but the model has {num_layers} layers: at most one rank per layer"
        )
    decode_cfg = config or SNLPConfig(iterations=1)
    decode = _step(model, decode_cfg, 1, batch, max_len, group, "solve" if config else "pipeline")
    mode: Mode = "solve" if config is not None and prefill == "solve" else "pipeline"
    # (a prompt's solve starts from h0: a warm trace is one token's)
    prefill_cfg = decode_cfg.replace(init="h0") if decode_cfg.init == "warm" else decode_cfg
    pre = LazyStep(lambda: _step(model, prefill_cfg, 2, batch, max_len, group, mode))
    layers = rank_layers(num_layers, group)
    param = next(model.parameters())
    shape = (len(layers), *cache_shape(model, batch, max_len)[1:])
    k_cache = torch.zeros(shape, dtype=param.dtype, device=param.device)
    return LayerParallelSteps(decode, pre, k_cache, torch.zeros_like(k_cache), layers)


def _step(
    model: nn.Module, cfg: SNLPConfig, t: int, batch: int, max_len: int, group: dist.ProcessGroup, mode: Mode
) -> fx.GraphModule:
    """The cached step for ``t`` new tokens (t >= 2: any prompt length) transformed with
    ``stages = G``, its solve replaced by this rank's block."""
    world = dist.get_world_size(group)
    cfg = cfg.replace(stages=world)
    idx = torch.zeros(batch, t, dtype=torch.long, device=next(model.parameters()).device)
    pos = torch.zeros((), dtype=torch.long, device=idx.device)
    was_training = model.training
    model.eval()
    try:
        c = compilation(CachedStep(model).eval(), (idx, pos, *new_cache(model, batch, max_len)), cfg, None)
        passes = pipeline(cfg)
        planned = passes.index(plan_pass) + 1
        run(c, passes[:planned])
        # (the side body batched over the block before the later passes inline its marker ops)
        side = _block_side_layers(c.solve_plan(), group) if c.report.error is None else None
        if c.report.error is None:
            run(c, passes[planned:])
    finally:
        model.train(was_training)
    if c.report.error is not None:
        raise c.report.error
    gm, plan = c.graph_module(), c.solve_plan()
    total = cache_shape(model, 1, 1)[0]
    if plan.num_layers != total:
        raise SNLPRefusal(
            f"only {plan.num_layers} of the {total} layers can be solved in parallel: across processes "
            "every layer must be (the caches of a rank hold its block's layers only)"
        )
    _check_graph(gm, plan.num_layers)
    _drop_guards(gm)
    setattr(gm, SOLVE_NAME, _block_solve(plan, group, mode, side))
    inline_marker_ops(gm)
    lower(gm, lowering_options(cfg))  # this rank's solve is new: its calls get the config's kernels
    return as_inference_graph(gm, c.report, cfg)


def _body_inputs(plan: SolvePlan) -> int:
    """How many externals the (unbatched, unfused) body reads."""
    return sum(1 for n in plan.body.graph.nodes if n.op == "placeholder") - 1


def _block_side_layers(plan: SolvePlan, group: dist.ProcessGroup) -> fx.GraphModule | None:
    """The side-output body (new K/V) batched over this rank's block, reading the body's
    externals (the plan's is batched over all layers)."""
    if plan.side_body is None:
        return None
    modes = plan.ext_modes[: _body_inputs(plan)]
    batched = [True, *(m != "shared" for m in modes)]
    fixed = [False, *(m == "stacked" for m in modes)]
    side, _ = batch_body(plan.side_body, batched, plan.stage_sizes[dist.get_rank(group)], fixed)
    side.graph.eliminate_dead_code()
    side.recompile()
    return side


def _block_solve(
    plan: SolvePlan, group: dist.ProcessGroup, mode: Mode, side: fx.GraphModule | None
) -> DistributedSolve:
    """This rank's block of ``plan`` (transformed with stages = G): its rows of the stacked weights
    (copies, so the other ranks' rows are freed with the plan), its batched bodies."""
    rank = dist.get_rank(group)
    sizes, block = plan.stage_sizes, plan.stage_sizes[dist.get_rank(group)]
    start = sum(sizes[:rank])
    stacked = {
        name: value[start : start + block].clone()
        for name, value in plan.stacked.items()
        if name not in plan.row_blocks
    }
    for name, rows in plan.row_blocks.items():  # (q/k/v of a fused weight: views of it again)
        stacked[name] = stacked[rows.base][:, rows.start : rows.start + rows.rows]
    static = plan.static_skip
    local = dataclasses.replace(
        plan,
        num_layers=block,
        stacked=stacked,
        layers=plan.layers if block == sizes[0] or plan.layers_short is None else plan.layers_short,
        layers_short=None,
        stage_sizes=(block,),
        side_layers=None,
        static_skip=None if static is None else static[start : start + block],
        last_row_only=False,
        sources=plan.sources.layers(start, start + block),
    )
    return DistributedSolve(
        local,
        group=group,
        total_layers=plan.num_layers,
        side_layers=side,
        body_inputs=_body_inputs(plan),
        mode=mode,
    )


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove torch.export's input guards: they check the cache against all layers (``k_cache``
    holds L rows), and a rank's cache holds its block's. The Decoder calls its steps with the
    shapes it built them for."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def _check_graph(gm: fx.GraphModule, num_layers: int) -> None:
    """The graph must read only the last layer's output of the solved trace (every rank knows it)
    and hand the side outputs (new K/V) straight out (each rank returns its block's)."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == SOLVE_NAME]
    if len(calls) != 1:
        raise SNLPRefusal(f"expected one call of the solve in the graph, found {len(calls)}")
    for item in calls[0].users:
        index = item.args[1] if item.target is operator.getitem and len(item.args) == 2 else None
        if index == 0:
            for read in item.users:
                row = read.args[1] if read.target is operator.getitem and len(read.args) == 2 else None
                if row not in (num_layers - 1, -1):
                    raise SNLPRefusal(
                        "across processes the model may read only the last layer's hidden state; "
                        f"'{read.name}' reads another (e.g. nanochat's backout)",
                        node=read.name,
                    )
        elif not all(user.op == "output" for user in item.users):
            raise SNLPRefusal(
                "across processes the layers' side outputs (new K/V) must be returned as they are",
                node=item.name,
            )
