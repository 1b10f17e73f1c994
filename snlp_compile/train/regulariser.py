"""The SNLP-aware regulariser (docs/DESIGN.md section 1): a loss term that teaches a model to converge
in one parallel iteration.

    R = sum over suffix sizes N of  sum_j  mean_tokens ||h_hat_j - h_j|| / ||h_j||   (j counted)

h_j is the sequential trace of the last N layers, h_hat_j the K=1 SNLP trace the transformed
model would compute with those N layers parallel; j runs over every S-th layer of the suffix
(``every``), and ``reduction="mean"`` averages over them instead of summing. Both come from the compiler's own analysis, so
the term works for any model ``transform()`` accepts:

- the model is captured and analysed once (``api.analyse``); a copy of the captured graph that also
  returns every hidden state and every per-layer input the solve needs (x0, rotary tables, masks,
  weights) is run with the model's *live* parameters (``torch.func.functional_call``), so the
  sequential forward that gives the training loss also gives the targets, and gradients reach the
  user's parameters through both;
- per suffix size, the per-layer inputs are stacked on a layer axis (``torch.stack``, every step,
  so gradients flow) and fed to the same batched layer body and correction the compiler emits
  (``passes.plan.build_solve`` with ``TRAINING`` planning: a ``LayerParallelSolve`` with K=1):
  one extra batched evaluation of the parallel layers.

Whatever the skip surrogate (identity, scaled, matrix for HCN), the correction is the solver's
own, so the K=1 trace here is the one ``solve_trace(transform(...), iterations=1)`` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from torch.fx.graph import _PyTreeCodeGen
from torch.utils import _pytree as pytree

from ..api import analyse
from ..config import InitKind, SNLPConfig
from ..errors import SNLPConfigError, SNLPRefusal
from ..ir import LayerChain
from ..ir.plan import ExtMode, SolveOptions
from ..passes.plan import TRAINING, build_solve
from ..solve.solver import LayerParallelSolve
from .live import LiveGraph, training_capture


@dataclass(frozen=True)
class RegulariserConfig:
    """What the regulariser measures and how strongly. The defaults are the paper's recipe.

    weight: lambda, the final weight of the term in the training loss (the paper: 0.0625-0.5 with
        ``reduction="sum"``).
    reduction: how the counted layers of one suffix combine: "sum" (the paper's: sum over the
        counted layers of the mean over tokens) or "mean" (this project's first choice: the mean over
        layers and tokens; lambda_mean = lambda_sum * number of counted layers).
    suffix_sizes: explicit parallel-suffix sizes N (the last N layers parallel), ints >= 2; when
        given, ``suffix_fractions`` is ignored. Each size costs one batched evaluation.
    suffix_fractions: the suffix sizes as fractions of the layers the compiler can parallelise,
        resolved when the regulariser is built (``suffix_sizes_for``: rounded half up, at least 2
        and more than ``iterations``, at most all of them, duplicates dropped). The default
        (0.25, 0.5, 0.75) is the paper's last 8/16/24 of 32 layers; ``(1.0,)`` is one suffix of
        every parallelisable layer (counted from the chain's first layer). None with
        ``suffix_sizes=None`` means the same as ``(1.0,)``.
    every: use the error of every S-th layer of a suffix (counted back from its last layer, which
        always counts); the batched evaluation still covers all N layers, the K=1 trace needs them.
        The paper: S=3.
    stop_gradient: detach the sequential target, so only the parallel trace is pulled towards it.
    ramp_steps: lambda rises linearly from 0 to ``weight`` over this many steps (0: no ramp).
        None: ``train()`` uses ``TrainConfig.reg_ramp_fraction`` of its steps (20%, the paper's);
        used directly, None means no ramp.
    init: the solve's initial iterate ("h0" costs one evaluation, "batch_fwd" two).
    iterations: the K of the trace compared with the sequential one. 1 (the paper's term) asks the
        model to converge in one iteration; 2 asks only what a K=2 deployment needs, at the cost
        of a second batched evaluation per suffix size (the first k layers of a K=k trace are
        exact: their error is zero, and the mean still runs over all counted layers).
    eps: added to ||h_j|| so a zero hidden state cannot divide by zero.
    """

    weight: float = 0.0625
    suffix_sizes: tuple[int, ...] | None = None
    suffix_fractions: tuple[float, ...] | None = (0.25, 0.5, 0.75)
    every: int = 3
    stop_gradient: bool = True
    ramp_steps: int | None = None
    init: str = "h0"
    iterations: int = 1
    reduction: Literal["sum", "mean"] = "sum"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not (isinstance(self.weight, (int, float)) and self.weight >= 0):
            raise SNLPConfigError(f"RegulariserConfig.weight must be a number >= 0, got {self.weight!r}")
        if self.suffix_sizes is not None:
            sizes = tuple(self.suffix_sizes)
            if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 2 for n in sizes):
                raise SNLPConfigError(
                    f"RegulariserConfig.suffix_sizes must be None or non-empty ints >= 2, got {self.suffix_sizes!r}"
                )
            if len(set(sizes)) != len(sizes):
                raise SNLPConfigError(f"RegulariserConfig.suffix_sizes has duplicates: {self.suffix_sizes!r}")
            object.__setattr__(self, "suffix_sizes", sizes)
        if self.suffix_fractions is not None:
            fractions = tuple(self.suffix_fractions)
            if not fractions or any(
                not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 < f <= 1.0
                for f in fractions
            ):
                raise SNLPConfigError(
                    "RegulariserConfig.suffix_fractions must be None or non-empty numbers in (0, 1], "
                    f"got {self.suffix_fractions!r}"
                )
            object.__setattr__(self, "suffix_fractions", tuple(float(f) for f in fractions))
        if not isinstance(self.every, int) or self.every < 1:
            raise SNLPConfigError(f"RegulariserConfig.every must be an int >= 1, got {self.every!r}")
        if self.ramp_steps is not None and (
            not isinstance(self.ramp_steps, int) or isinstance(self.ramp_steps, bool) or self.ramp_steps < 0
        ):
            raise SNLPConfigError(
                f"RegulariserConfig.ramp_steps must be None or an int >= 0, got {self.ramp_steps!r}"
            )
        if self.init not in ("h0", "batch_fwd"):
            raise SNLPConfigError(f"RegulariserConfig.init must be 'h0' or 'batch_fwd', got {self.init!r}")
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations < 1:
            raise SNLPConfigError(
                f"RegulariserConfig.iterations must be an int >= 1, got {self.iterations!r}"
            )
        if self.reduction not in ("sum", "mean"):
            raise SNLPConfigError(
                f"RegulariserConfig.reduction must be 'sum' or 'mean', got {self.reduction!r}"
            )
        if not self.eps > 0:
            raise SNLPConfigError(f"RegulariserConfig.eps must be > 0, got {self.eps!r}")

    def weight_at(self, step: int) -> float:
        """lambda at optimiser step ``step`` (0-based): the warm-up ramp."""
        if not self.ramp_steps:
            return float(self.weight)
        return float(self.weight) * min(1.0, (step + 1) / self.ramp_steps)

    def suffix_sizes_for(self, max_parallel: int) -> tuple[int, ...]:
        """The suffix sizes for a chain of ``max_parallel`` parallelisable layers."""
        if self.suffix_sizes is not None:
            return self.suffix_sizes
        if self.suffix_fractions is None:
            return (max_parallel,)
        low = max(2, self.iterations + 1)
        sizes = (
            min(max_parallel, max(low, math.floor(f * max_parallel + 0.5))) for f in self.suffix_fractions
        )
        return tuple(dict.fromkeys(sizes))


@dataclass
class RegulariserOutput:
    """One forward: the model's output, the regularisation term and its parts."""

    output: Any  # what model(*args, **kwargs) returns, computed by the same forward
    loss: torch.Tensor  # sum over suffix sizes of the reduced relative error (unweighted)
    errors: dict[int, torch.Tensor] = field(default_factory=dict)  # suffix size -> its reduced relative error


@dataclass
class _Suffix:
    size: int
    solve: LayerParallelSolve
    h_in: int  # index into the graph's extra outputs
    targets: list[int]
    passed: list[tuple[ExtMode, list[int]]]  # per non-stacked external: its mode and output indices
    counted: list[int]  # layer positions j whose error counts (every S-th)


class SNLPRegulariser:
    """The SNLP-aware regulariser for one model; call it instead of the model in the training step.

        reg = SNLPRegulariser(model, (idx,), RegulariserConfig(weight=1.0))
        out = reg(idx)                       # one sequential forward + one batched evaluation
        loss = cross_entropy(out.output, y) + reg.config.weight_at(step) * out.loss

    ``example_inputs`` / ``example_kwargs`` are as for ``transform()``; ``layers`` names the layer
    container when the automatic choice is not wanted. The model is captured once, in eval mode
    (dropout off: the trace the solve reproduces); later calls use its current parameters and
    buffers, wherever they live. Raises SNLPRefusal when transform() would refuse the model.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        example_inputs: Any,
        config: RegulariserConfig | None = None,
        *,
        example_kwargs: dict[str, Any] | None = None,
        layers: str | None = None,
    ) -> None:
        self.model = model
        self.config = config or RegulariserConfig()
        with training_capture():  # (a model being trained is in training mode: expected here)
            gm, chain, report = analyse(model, example_inputs, SNLPConfig(layers=layers), example_kwargs)
        if chain is None:
            raise SNLPRefusal(report.refusal or "refused")
        self.chain: LayerChain = chain
        self.max_parallel = chain.num_parallel
        sizes = self.config.suffix_sizes_for(self.max_parallel)
        too_big = [n for n in sizes if n > self.max_parallel]
        exact = [n for n in sizes if n <= self.config.iterations]
        if exact:
            raise SNLPConfigError(
                f"RegulariserConfig.suffix_sizes {exact}: with iterations={self.config.iterations} the trace of "
                "that many parallel layers is already exact, so the term would measure nothing"
            )
        if too_big:
            raise SNLPConfigError(
                f"RegulariserConfig.suffix_sizes {too_big} exceed the {self.max_parallel} layers of "
                f"'{chain.container}' that can be solved in parallel"
            )
        self.suffix_sizes = tuple(sizes)
        extras: list[fx.Node] = []
        position: dict[fx.Node, int] = {}

        def slot(node: fx.Node) -> int:
            if node not in position:
                position[node] = len(extras)
                extras.append(node)
            return position[node]

        init: InitKind = self.config.init  # type: ignore[assignment]  # (validated by RegulariserConfig)
        options = SolveOptions(iterations=self.config.iterations, init=init, damping=1.0)
        self._suffixes: list[_Suffix] = []
        for n in self.suffix_sizes:
            par = chain.layers[len(chain.layers) - n :]
            plan, solve = build_solve(gm, chain, options, parallel_layers=n, planning=TRAINING)
            passed: list[tuple[ExtMode, list[int]]] = []
            for ext in plan.passed:
                if ext.mode == "shared":
                    passed.append(("shared", [slot(ext.column[0])]))
                    continue
                if any(not isinstance(c.meta.get("val"), torch.Tensor) for c in ext.column):
                    raise SNLPRefusal(
                        f"the layers read different non-tensor values for '{ext.name}' "
                        f"({', '.join(c.name for c in ext.column)})",
                        node=ext.column[0].name,
                    )
                passed.append(("runtime", [slot(c) for c in ext.column]))
            counted = [j for j in range(n) if (n - 1 - j) % self.config.every == 0]
            self._suffixes.append(
                _Suffix(
                    n, solve, slot(par[0].hidden_in), [slot(layer.output) for layer in par], passed, counted
                )
            )
        graph, self._out_spec, self._num_outputs = _graph_with_extras(gm, extras)
        self._live = LiveGraph(model, gm, graph)

    def __call__(self, *args: Any, **kwargs: Any) -> RegulariserOutput:
        flat, extras = self._run(args, kwargs)
        errors: dict[int, torch.Tensor] = {}
        for s in self._suffixes:
            h_hat, h_seq = self._traces(s, extras)
            if self.config.stop_gradient:
                h_seq = h_seq.detach()
            errors[s.size] = _relative_error(
                h_hat[s.counted], h_seq[s.counted], self.config.eps, self.config.reduction
            )
        loss = torch.stack(list(errors.values())).sum()
        return RegulariserOutput(pytree.tree_unflatten(flat, self._out_spec), loss, errors)

    def traces(self, *args: Any, **kwargs: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per suffix size: (SNLP trace after ``config.iterations``, sequential trace), each (N, *hidden)."""
        _, extras = self._run(args, kwargs)
        return {s.size: self._traces(s, extras) for s in self._suffixes}

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        values = self._live(args, kwargs)
        return list(values[: self._num_outputs]), list(values[self._num_outputs :])

    @staticmethod
    def _traces(s: _Suffix, extras: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        passed = [
            extras[i[0]] if mode == "shared" else torch.stack([extras[j] for j in i]) for mode, i in s.passed
        ]
        h_hat = s.solve(extras[s.h_in], *passed)
        h_seq = torch.stack([extras[j] for j in s.targets])
        return h_hat, h_seq


def _relative_error(
    h_hat: torch.Tensor, h_seq: torch.Tensor, eps: float, reduction: str = "mean"
) -> torch.Tensor:
    """||h_hat - h|| / ||h|| per layer and position, norms over the last dimension, in at least fp32
    (bf16 norms of long vectors lose the digits the term is about); averaged over positions, then
    summed ("sum") or averaged ("mean") over the layers (the leading axis)."""
    dtype = torch.promote_types(h_seq.dtype, torch.float32)
    diff = torch.linalg.vector_norm((h_hat - h_seq).to(dtype), dim=-1)
    rel = (diff / (torch.linalg.vector_norm(h_seq.to(dtype), dim=-1) + eps)).flatten(1).mean(1)
    return rel.sum() if reduction == "sum" else rel.mean()


def _graph_with_extras(gm: fx.GraphModule, extras: list[fx.Node]) -> tuple[fx.GraphModule, Any, int]:
    """A copy of the captured graph returning (its flat outputs..., extras...) under the same call
    signature. Returns the module, the output spec that rebuilds the model's output, and its count."""
    old = gm.graph
    codegen = old._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        raise TypeError(
            f"expected a torch.export graph with a pytree signature, got {type(codegen).__name__}"
        )
    graph = fx.Graph()
    graph._codegen = _PyTreeCodeGen(codegen.pytree_info._replace(out_spec=None))
    env: dict[fx.Node, fx.Node] = {}
    out_node = None
    for n in old.nodes:
        if n.op == "output":
            out_node = n
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    assert out_node is not None
    flat_out = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
    lifted = [fx.node.map_arg(o, lambda a: env[a]) for o in flat_out]
    graph.output(tuple(lifted) + tuple(env[e] for e in extras))
    graph.lint()
    module = fx.GraphModule(gm, graph, class_name="TrainingGraph")
    return module, codegen.pytree_info.out_spec, len(flat_out)
