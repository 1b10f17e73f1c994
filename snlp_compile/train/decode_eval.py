"""Perplexity of the KV-cached decode step itself: quality measured on the path that is timed.

The full-sequence forward and the decode step differ at small K. In the full forward every
position's K/V at iteration k come from the current iterate; in decoding, token t's solve reads
the K/V that earlier tokens' *corrected* traces wrote into the cache, and init "warm" (which only
exists in decoding) starts from the previous token's trace. So the number a user pays for is the
teacher-forced cross-entropy of the decode step: token t goes in at position t, the step (with the
deployed K, parallel layers and init) returns the logits for t + 1 and its K/V are written, exactly
as ``Decoder`` runs it.

Settings that differ only in K share one transform (K is the solve's iteration count). On CUDA the
step and its cache write are captured once per setting as a CUDA graph and replayed per position
(token 0 runs eagerly first, which also starts a warm trace from h0), so a 1024-position sweep costs
seconds, not minutes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SNLPConfig
from ..decoding import Decoder
from ..models.kv import write_cache
from ..solve.handle import SolveHandle


@dataclass(frozen=True)
class DecodeSetting:
    """One decode configuration: None for ``parallel_layers`` means every parallelisable layer;
    ``iterations=None`` is the model's own sequential cached step. ``fused_layers`` M > 1 decodes
    the wide-layer (fused) function (``SNLPConfig.fused_layers``): every token, the first included,
    goes through the fused solve, so the cache holds the fused function's K/V (no sequential prefill
    of the unfused model)."""

    iterations: int | None
    parallel_layers: int | None = None
    init: str = "h0"
    fused_layers: int = 1

    def __post_init__(self) -> None:
        if self.fused_layers > 1 and self.iterations is None:
            raise ValueError("DecodeSetting: fused_layers needs iterations (the sequential step is unfused)")

    @property
    def sequential(self) -> bool:
        return self.iterations is None

    def label(self) -> str:
        if self.sequential:
            return "sequential"
        par = "all" if self.parallel_layers is None else str(self.parallel_layers)
        fused = f" fused={self.fused_layers}" if self.fused_layers > 1 else ""
        return f"par={par} K={self.iterations} init={self.init}{fused}"


@dataclass
class DecodeResult:
    setting: DecodeSetting
    ce: float  # mean next-token cross entropy, nats
    ppl: float
    bpb: float  # bits per byte of the held-out text
    tokens: int
    graphs: bool  # replayed as a CUDA graph (False: eager, e.g. on the CPU)
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        s = self.setting
        return {
            "iterations": s.iterations,
            "parallel_layers": s.parallel_layers,
            "init": None if s.sequential else s.init,
            "fused_layers": s.fused_layers,
            "ce": self.ce,
            "ppl": self.ppl,
            "bpb": self.bpb,
            "tokens": self.tokens,
            "graphs": self.graphs,
            **self.extra,
        }


def step_logits(decoder: Decoder, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One cached step of ``decoder`` at ``pos``, its K/V written into the decoder's caches: the
    last position's next-token logits, float32 at least (bf16 -> float32)."""
    logits, new_k, new_v = decoder.decode_step(idx, pos, decoder.k_cache, decoder.v_cache)
    write_cache(decoder.k_cache, decoder.v_cache, new_k, new_v, pos)
    last = logits[:, -1]
    return last.to(torch.promote_types(last.dtype, torch.float32))


def _teacher_forced_ce(decoder: Decoder, windows: torch.Tensor, use_graph: bool) -> tuple[float, int, bool]:
    """Summed next-token cross entropy of ``windows`` (B, T + 1) fed token by token through the
    decoder's step, and whether a CUDA graph replayed it."""
    device = decoder.device
    win = windows.to(device)
    b, t1 = win.shape
    t_len = t1 - 1
    decoder.reset()
    idx = torch.empty(b, 1, dtype=torch.long, device=device)
    pos = torch.zeros((), dtype=torch.long, device=device)

    def one() -> torch.Tensor:
        return step_logits(decoder, idx, pos)

    total = torch.zeros((), dtype=torch.float64, device=device)

    def add(logits: torch.Tensor, t: int) -> None:
        nonlocal total
        total = total + F.cross_entropy(logits, win[:, t + 1], reduction="sum").double()

    idx.copy_(win[:, :1])
    add(one(), 0)  # eager: token 0 (starts a warm trace from h0; lazy handles are created here)
    graph: torch.cuda.CUDAGraph | None = None
    static_out = torch.empty(0)
    if use_graph and device.type == "cuda" and t_len > 1:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = one()
        except RuntimeError:  # a step that cannot be captured still gets measured, eagerly
            graph = None
            torch.cuda.synchronize(device)
    for t in range(1, t_len):
        idx.copy_(win[:, t : t + 1])
        pos.fill_(t)
        if graph is not None:
            graph.replay()
            add(static_out, t)
        else:
            add(one(), t)
    result = float(total.item())
    used_graph = graph is not None
    del graph
    return result, b * t_len, used_graph


@torch.no_grad()
def decode_perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    settings: Iterable[DecodeSetting],
    *,
    bytes_per_token: float,
    graphs: bool = True,
    progress: Callable[[DecodeResult], None] | None = None,
) -> list[DecodeResult]:
    """Teacher-forced perplexity of ``model``'s KV-cached decode step over held-out ``windows``
    (B, T + 1), once per setting. The model must offer ``forward_cached`` (the reference models do);
    it is evaluated in its own dtype and device. Settings sharing parallel layers and init share one
    transform (and fused layers)."""
    if windows.dim() != 2 or windows.size(1) < 2:
        raise ValueError(f"windows must be (batch, length >= 2) token ids, got {tuple(windows.shape)}")
    model = model.eval()
    b, t_len = windows.size(0), windows.size(1) - 1
    groups: dict[tuple[int | None, str, int] | None, list[DecodeSetting]] = {}
    for s in settings:
        key = None if s.sequential else (s.parallel_layers, s.init, s.fused_layers)
        groups.setdefault(key, []).append(s)
    results: list[DecodeResult] = []
    for key, members in groups.items():
        if key is None:
            decoder = Decoder(model, None, batch=b, max_len=t_len)
        else:
            par, init, fused = key
            cfg = SNLPConfig(iterations=1, parallel_layers=par, init=init, fused_layers=fused)  # type: ignore[arg-type]
            decoder = Decoder(model, cfg, batch=b, max_len=t_len)
        solve = SolveHandle.of(decoder.decode_step)
        for s in sorted(members, key=lambda m: m.iterations or 0):
            if solve is not None and s.iterations is not None:
                solve.iterations = s.iterations
            ce_sum, count, used_graph = _teacher_forced_ce(decoder, windows, graphs)
            ce = ce_sum / count
            res = DecodeResult(s, ce, math.exp(ce), ce / math.log(2) / bytes_per_token, count, used_graph)
            results.append(res)
            if progress is not None:
                progress(res)
        del decoder
    return results


def settings_grid(
    parallel: Sequence[int | None], iterations: Sequence[int], inits: Sequence[str]
) -> list[DecodeSetting]:
    """The sequential step plus every (parallel layers, K, init) combination."""
    grid = [DecodeSetting(None)]
    grid += [DecodeSetting(k, p, i) for p in parallel for i in inits for k in iterations]
    return grid
