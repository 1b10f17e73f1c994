"""The knobs of the layer-parallel solve (docs/DESIGN.md section 1), validated once, in one place."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import SNLPConfigError
from .options import ENVIRONMENT, LoweringOptions

InitKind = Literal["h0", "batch_fwd", "warm"]

CHUNKS_RENAMED = (
    "SNLPConfig.chunks is now SNLPConfig.stages (stages solved one after another; "
    "the paper's chunkwise fusion is fused_layers)"
)
_PACKAGE = str(Path(__file__).resolve().parent)


def warn_chunks_renamed() -> None:
    """The DeprecationWarning for ``chunks``, attributed to the first caller outside this package
    (and the dataclass's generated __init__): Python shows DeprecationWarnings by default only
    in a script's own code, and ``transform(..., chunks=...)`` reaches the config calls deep."""
    level, frame = 2, sys._getframe(1)  # (the caller's frame is stacklevel 2)
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE)
        or (frame.f_code.co_filename == "<string>" and frame.f_code.co_name == "__init__")
    ):
        level, frame = level + 1, frame.f_back
    warnings.warn(CHUNKS_RENAMED, DeprecationWarning, stacklevel=level)


class FormerStagesName:
    """``SNLPConfig.chunks``: an InitVar (so ``SNLPConfig(chunks=...)`` still works) that reads
    as ``stages`` with a DeprecationWarning. A plain InitVar default would read as None — a wrong
    answer for code written before the rename. ``dataclasses.replace`` reads every InitVar to
    carry it over; it gets None, so a copy is never told a second, conflicting stage count."""

    def __get__(self, config: SNLPConfig | None, owner: type | None = None) -> Any:
        caller = sys._getframe(1).f_code
        if config is None or (caller.co_filename == dataclasses.__file__ and "replace" in caller.co_name):
            return None  # the dataclass default, or dataclasses.replace carrying InitVars over
        warn_chunks_renamed()
        return config.stages


@dataclass(frozen=True)
class SNLPConfig:
    """How the rewritten model solves its layer chain.

    iterations: K, the number of parallel evaluations of the layers. K >= parallel layers (after
        the init's own evaluation, if any) recovers the sequential model exactly.
    parallel_layers: how many of the last layers are solved in parallel; None means all of them.
        The layers before them run sequentially, as written.
    init: starting iterate. "h0": every parallel layer starts from the chain's input;
        "batch_fwd": one extra batched evaluation at h0 seeds layer j+1 with g_j(h0);
        "warm": layer j+1 starts from the previous call's solved h_j (in decoding, the previous
        token's trace); the first call starts from h0.
    damping: a in (0, 1]; the correction becomes h_j = g_j(u_j) + a * A_j (h_{j-1} - u_j).
    layers: module path of the layer container (e.g. "transformer.h"); None finds it.
    dynamic_shapes: capture with symbolic batch and sequence sizes (falls back to static shapes
        when torch.export cannot, which explain() reports).
    stages: S, consecutive stages solved one after another: the N parallel layers are split into
        S consecutive stages (sizes from stage_sizes(): as even as possible, the larger ones
        first, as torch.tensor_split does), each layer-parallel with K iterations from the
        previous stage's last output (the first from the chain's input); the correction restarts
        at each stage boundary. The model's own function: K >= the largest stage is exact; S = N,
        K = 1 is the sequential model; S = 1 is the plain solve. At most the number of parallel
        layers. A tuple gives the sizes in order (adding up to the parallel layers, at most two
        distinct sizes), e.g. (1,) * 8 + (8,): the first 8 layers one after another, through the
        same batched kernels as the solve, then the last 8 layer-parallel; the function of
        ``parallel_layers=8`` with a faster sequential part. A stage runs min(K, its size)
        iterations: more change nothing (the stage is exact after that many). Not the paper's
        chunkwise decomposition, which is ``fused_layers``. ``chunks`` is its former name,
        accepted (with a DeprecationWarning) by ``SNLPConfig(chunks=...)`` and ``replace``.
    fused_layers: M, wide-layer fusion (the paper's ChunkB_CxFM; Fused_1xFM when M is all the
        parallel layers): the N parallel layers form N/M consecutive groups, and each group is one
        wide layer reading the group's input x: every layer's first residual half (attention)
        reads x, y = x + the sum of their increments; every layer's second half (MLP) reads y, the
        wide layer's output = y + the sum of theirs (``passes.wide_layers``). This changes the
        function (it is the function of a model trained fused); the N/M wide layers are then solved
        in parallel with K iterations and the IDN correction between them, exact (to the fused
        function) at K >= N/M. 1: no fusion. Unlike ``stages`` (solved one after another, the
        same function), it needs stages=1 and no deferred_kv; verify does not apply (it
        compares with the unfused model).
    deferred_kv: decode steps only (models.kv.CachedStep, one new token): token t's corrected K/V
        are computed in token t+1's first evaluation, as a second row of its q/k/v GEMVs (one
        weight read instead of two), and written by that step into the caches at t's position;
        the K/V a step returns are provisional (at its uncorrected inputs) and need not be written:
        the next step writes that slot before reading it (``Decoder`` skips them). Exact mode
        stays exact. Not for ONNX export; needs stages=1. ``Decoder`` completes the last token's
        K/V (``Decoder.flush``); a hand-driven step completes them with one more call.
    lowering: how the rewritten graph is lowered (``options.LoweringOptions``); None takes the
        process's defaults, read from the ``SNLP_*`` environment variables once at import
        (``options.ENVIRONMENT``). All of it applies to this transform only: ``last_row`` to its
        solve, the kernel choices to its graph's calls (``passes.lowering`` writes them in as
        keyword arguments; two transforms in one process may differ).
    verify: after rewriting, check the rewritten model (in exact mode) against the original on
        the example inputs, two calls and, with a symbolic batch, a second batch size, and refuse
        (SNLPRefusal naming the layer with the largest error) when they disagree beyond the
        dtype's tolerance (``verify.TOLERANCE``). On by default: per call it costs one forward of
        the original and one evaluation of the rewritten model (K = 1, warm-started from the
        original's trace; the whole exact solve only when that disagrees), and it leaves no
        run-time state behind.
        ``transform(..., verify=False)`` switches it off (``snlp_compile.verify``).
    """

    iterations: int = 1
    parallel_layers: int | None = None
    init: InitKind = "h0"
    damping: float = 1.0
    layers: str | None = None
    dynamic_shapes: bool = True
    stages: int | tuple[int, ...] = 1
    fused_layers: int = 1
    deferred_kv: bool = False
    lowering: LoweringOptions | None = None
    verify: bool = True
    chunks: InitVar[int | tuple[int, ...] | None] = FormerStagesName()  # former name of stages (deprecated)

    def __post_init__(self, chunks: int | tuple[int, ...] | None) -> None:
        if chunks is not None:
            if self.stages != 1:
                raise SNLPConfigError(
                    f"SNLPConfig got both stages={self.stages!r} and chunks={chunks!r}: chunks is the former "
                    "name of stages, give stages only"
                )
            warn_chunks_renamed()
            object.__setattr__(self, "stages", chunks)
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations < 1:
            raise SNLPConfigError(f"SNLPConfig.iterations must be an int >= 1, got {self.iterations!r}")
        if self.parallel_layers is not None and (
            not isinstance(self.parallel_layers, int) or self.parallel_layers < 1
        ):
            raise SNLPConfigError(
                f"SNLPConfig.parallel_layers must be None (all layers) or an int >= 1, got {self.parallel_layers!r}"
            )
        if self.init not in ("h0", "batch_fwd", "warm"):
            raise SNLPConfigError(f"SNLPConfig.init must be 'h0', 'batch_fwd' or 'warm', got {self.init!r}")
        if not (isinstance(self.damping, (int, float)) and 0.0 < float(self.damping) <= 1.0):
            raise SNLPConfigError(f"SNLPConfig.damping must be in (0, 1], got {self.damping!r}")
        if isinstance(self.stages, list):
            object.__setattr__(self, "stages", tuple(self.stages))
        sizes = self.stages if isinstance(self.stages, tuple) else (self.stages,)
        if not sizes or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in sizes):
            raise SNLPConfigError(
                f"SNLPConfig.stages must be an int >= 1 or a tuple of stage sizes >= 1, got {self.stages!r}"
            )
        if (
            not isinstance(self.fused_layers, int)
            or isinstance(self.fused_layers, bool)
            or self.fused_layers < 1
        ):
            raise SNLPConfigError(f"SNLPConfig.fused_layers must be an int >= 1, got {self.fused_layers!r}")
        if self.fused_layers > 1 and (self.stages != 1 or self.deferred_kv):
            raise SNLPConfigError(
                f"SNLPConfig.fused_layers={self.fused_layers} needs stages=1 and deferred_kv=False "
                f"(got stages={self.stages}, deferred_kv={self.deferred_kv})"
            )
        if not isinstance(self.deferred_kv, bool):
            raise SNLPConfigError(f"SNLPConfig.deferred_kv must be a bool, got {self.deferred_kv!r}")
        if not isinstance(self.verify, bool):
            raise SNLPConfigError(f"SNLPConfig.verify must be a bool, got {self.verify!r}")
        if self.lowering is not None and not isinstance(self.lowering, LoweringOptions):
            raise SNLPConfigError(
                f"SNLPConfig.lowering must be None or a LoweringOptions, got {type(self.lowering).__name__}"
            )
        num_stages = len(self.stages) if isinstance(self.stages, tuple) else self.stages
        if self.deferred_kv and num_stages != 1:
            raise SNLPConfigError(
                f"SNLPConfig.deferred_kv needs stages=1 (one merged evaluation of all layers), got stages={self.stages}"
            )

    def replace(self, **overrides: Any) -> SNLPConfig:
        """A copy with some fields changed; unknown field names are an error that lists the valid ones.
        ``chunks`` (the former name of ``stages``) still maps to ``stages``, with a DeprecationWarning."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - valid - {"chunks"})
        if unknown:
            raise SNLPConfigError(f"unknown SNLPConfig field(s) {unknown}; valid fields: {sorted(valid)}")
        if "chunks" in overrides:
            chunks = overrides.pop("chunks")
            if "stages" in overrides:
                raise SNLPConfigError(
                    f"SNLPConfig.replace got both stages={overrides['stages']!r} and chunks={chunks!r}: chunks "
                    "is the former name of stages, give stages only"
                )
            warn_chunks_renamed()
            overrides["stages"] = chunks
        return dataclasses.replace(self, **overrides)


def stage_sizes(num_layers: int, stages: int | tuple[int, ...]) -> list[int]:
    """Sizes of ``stages`` consecutive stages of ``num_layers`` layers: as even as possible, the
    larger ones first (torch.tensor_split's rule), e.g. 8 layers in 3 stages -> [3, 3, 2]; a
    tuple is the sizes themselves, checked."""
    if isinstance(stages, tuple):
        if sum(stages) != num_layers or len(set(stages)) > 2:
            raise SNLPConfigError(
                f"SNLPConfig.stages={stages} must add up to the {num_layers} parallel layers "
                "and hold at most two distinct sizes (one batched evaluation each)"
            )
        return list(stages)
    if not 1 <= stages <= num_layers:
        raise SNLPConfigError(
            f"SNLPConfig.stages={stages} must be between 1 and the {num_layers} parallel layers"
        )
    base, extra = divmod(num_layers, stages)
    return [base + 1] * extra + [base] * (stages - extra)


def lowering_options(config: SNLPConfig) -> LoweringOptions:
    """The lowering options ``config`` asks for: its own, or the environment's."""
    return config.lowering or ENVIRONMENT


def resolve_config(config: SNLPConfig | None, overrides: dict[str, Any]) -> SNLPConfig:
    """Merge a config object and keyword overrides, the way transform() and friends accept them."""
    if config is not None and not isinstance(config, SNLPConfig):
        raise SNLPConfigError(f"config must be an SNLPConfig or None, got {type(config).__name__}")
    return (config or SNLPConfig()).replace(**overrides)
