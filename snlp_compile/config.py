"""The knobs of the layer-parallel solve (docs/DESIGN.md section 1), validated once, in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .errors import SNLPConfigError
from .options import ENVIRONMENT, LoweringOptions

InitKind = Literal["h0", "batch_fwd", "warm"]


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
    chunks: C, chunkwise decomposition: the N parallel layers are split into C consecutive chunks
        (sizes from chunk_sizes(): as even as possible, the larger ones first, as
        torch.tensor_split does), solved one after another, each layer-parallel with K iterations
        from the previous chunk's last output (the first from the chain's input); the correction
        restarts at each chunk boundary. K >= the largest chunk is exact; C = N, K = 1 is the
        sequential model; C = 1 is the plain solve. At most the number of parallel layers. A tuple
        gives the sizes in order (adding up to the parallel layers, at most two distinct sizes),
        e.g. (1,) * 8 + (8,): the first 8 layers one after another, through the same batched
        kernels as the solve, then the last 8 layer-parallel; the function of
        ``parallel_layers=8`` with a faster sequential part. A chunk runs min(K, its size)
        iterations: more change nothing (the chunk is exact after that many).
    fused_layers: M, wide-layer fusion (the paper's ChunkB_CxFM; Fused_1xFM when M is all the
        parallel layers): the N parallel layers form N/M consecutive groups, and each group is one
        wide layer reading the group's input x: every layer's first residual half (attention)
        reads x, y = x + the sum of their increments; every layer's second half (MLP) reads y, the
        wide layer's output = y + the sum of theirs (``passes.wide_layers``). This changes the
        function (it is the function of a model trained fused); the N/M wide layers are then solved
        in parallel with K iterations and the IDN correction between them, exact (to the fused
        function) at K >= N/M. 1: no fusion. Unlike ``chunks`` (stages solved one after another,
        the same function), it needs chunks=1 and no deferred_kv; verify does not apply (it
        compares with the unfused model).
    deferred_kv: decode steps only (models.kv.CachedStep, one new token): token t's corrected K/V
        are computed in token t+1's first evaluation, as a second row of its q/k/v GEMVs (one
        weight read instead of two), and written by that step into the caches at t's position;
        the K/V a step returns are provisional (at its uncorrected inputs) and need not be written:
        the next step writes that slot before reading it (``Decoder`` skips them). Exact mode
        stays exact. Not for ONNX export; needs chunks=1. ``Decoder`` completes the last token's
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
    chunks: int | tuple[int, ...] = 1
    fused_layers: int = 1
    deferred_kv: bool = False
    lowering: LoweringOptions | None = None
    verify: bool = True

    def __post_init__(self) -> None:
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
        if isinstance(self.chunks, list):
            object.__setattr__(self, "chunks", tuple(self.chunks))
        sizes = self.chunks if isinstance(self.chunks, tuple) else (self.chunks,)
        if not sizes or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in sizes):
            raise SNLPConfigError(
                f"SNLPConfig.chunks must be an int >= 1 or a tuple of chunk sizes >= 1, got {self.chunks!r}"
            )
        if (
            not isinstance(self.fused_layers, int)
            or isinstance(self.fused_layers, bool)
            or self.fused_layers < 1
        ):
            raise SNLPConfigError(f"SNLPConfig.fused_layers must be an int >= 1, got {self.fused_layers!r}")
        if self.fused_layers > 1 and (self.chunks != 1 or self.deferred_kv):
            raise SNLPConfigError(
                f"SNLPConfig.fused_layers={self.fused_layers} needs chunks=1 and deferred_kv=False "
                f"(got chunks={self.chunks}, deferred_kv={self.deferred_kv})"
            )
        if not isinstance(self.deferred_kv, bool):
            raise SNLPConfigError(f"SNLPConfig.deferred_kv must be a bool, got {self.deferred_kv!r}")
        if not isinstance(self.verify, bool):
            raise SNLPConfigError(f"SNLPConfig.verify must be a bool, got {self.verify!r}")
        if self.lowering is not None and not isinstance(self.lowering, LoweringOptions):
            raise SNLPConfigError(
                f"SNLPConfig.lowering must be None or a LoweringOptions, got {type(self.lowering).__name__}"
            )
        num_chunks = len(self.chunks) if isinstance(self.chunks, tuple) else self.chunks
        if self.deferred_kv and num_chunks != 1:
            raise SNLPConfigError(
                f"SNLPConfig.deferred_kv needs chunks=1 (one merged evaluation of all layers), got chunks={self.chunks}"
            )

    def replace(self, **overrides: Any) -> SNLPConfig:
        """A copy with some fields changed; unknown field names are an error that lists the valid ones."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise SNLPConfigError(f"unknown SNLPConfig field(s) {unknown}; valid fields: {sorted(valid)}")
        return dataclasses.replace(self, **overrides)


def chunk_sizes(num_layers: int, chunks: int | tuple[int, ...]) -> list[int]:
    """Sizes of ``chunks`` consecutive chunks of ``num_layers`` layers: as even as possible, the
    larger ones first (torch.tensor_split's rule), e.g. 8 layers in 3 chunks -> [3, 3, 2]; a
    tuple is the sizes themselves, checked."""
    if isinstance(chunks, tuple):
        if sum(chunks) != num_layers or len(set(chunks)) > 2:
            raise SNLPConfigError(
                f"SNLPConfig.chunks={chunks} must add up to the {num_layers} parallel layers "
                "and hold at most two distinct sizes (one batched evaluation each)"
            )
        return list(chunks)
    if not 1 <= chunks <= num_layers:
        raise SNLPConfigError(
            f"SNLPConfig.chunks={chunks} must be between 1 and the {num_layers} parallel layers"
        )
    base, extra = divmod(num_layers, chunks)
    return [base + 1] * extra + [base] * (chunks - extra)


def lowering_options(config: SNLPConfig) -> LoweringOptions:
    """The lowering options ``config`` asks for: its own, or the environment's."""
    return config.lowering or ENVIRONMENT


def resolve_config(config: SNLPConfig | None, overrides: dict[str, Any]) -> SNLPConfig:
    """Merge a config object and keyword overrides, the way transform() and friends accept them."""
    if config is not None and not isinstance(config, SNLPConfig):
        raise SNLPConfigError(f"config must be an SNLPConfig or None, got {type(config).__name__}")
    return (config or SNLPConfig()).replace(**overrides)
