"""Fused decode attention: one query token against a KV cache plus its own key/value, in one kernel.

Why a kernel of our own: ``models.kv.cached_attention`` at T = 1 is two products over the cache
(scores, values), a softmax between them and the new token's own score and value: four kernels in
a compiled step, each with its ramp and tail, and the cache read by two of them. Here each
program streams its group's keys and values once with an online softmax (flash-decoding), folds
in the new token, and writes the normalised output: one launch. Blocks of keys whose bias is -inf
everywhere (cache slots not yet written, ``models.kv.attention_bias``) are skipped, so a step at
position p reads p slots of a cache preallocated for many more, not all of them.

Layout: ``G`` groups (layers x batch x kv heads, flattened by the caller), each with ``R`` query
rows (the query heads of one kv head) of head dim ``D``; the cache is read through its strides.
With few groups (a sequential step: one layer) the keys are split over ``S`` programs per group
that write partial results, and a second kernel combines them; with many (a layer-batched step)
``S = 1`` and the first kernel writes the output.

Scores, the softmax and the accumulation are float32, whatever the inputs' dtype. The op,
``torch.ops.snlp.decode_attention``, is registered in ``kernels.ops``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .tracing import exporting

try:  # triton is an optional dependency (the CPU wheel of torch does not bring it)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

MAX_ROWS = 16  # query heads per kv head the kernel takes (grouped-query attention up to 16:1)
MAX_HEAD_DIM = 256


def available() -> bool:
    """Whether the Triton kernel can be used in this process."""
    return triton is not None


if triton is not None:
    NEG = tl.constexpr(-1.0e30)  # a finite "minus infinity" for the running maximum: no NaN from exp

    @triton.jit
    def _key_block(bias_ptr, k_base, v_base, t, t_stop, offs_d, D, sbt, skt, skd, svt, svd):
        """The bias (BLOCK_T,) float32 and the key and value tiles (BLOCK_T, BLOCK_D) of the keys
        ``t``, as float32; -inf and zeros past ``t_stop``."""
        in_range = t < t_stop
        mask_td = in_range[:, None] & (offs_d[None, :] < D)
        b = tl.load(bias_ptr + t * sbt, mask=in_range, other=float("-inf"))
        k = tl.load(k_base + t[:, None] * skt + offs_d[None, :] * skd, mask=mask_td, other=0.0)
        v = tl.load(v_base + t[:, None] * svt + offs_d[None, :] * svd, mask=mask_td, other=0.0)
        return b, k.to(tl.float32), v.to(tl.float32)

    @triton.jit
    def _decode_attention_split(
        q_ptr, k_ptr, v_ptr, kn_ptr, vn_ptr, bias_ptr, o_ptr, part_ptr,
        G,  # the groups (the grid's first axis): unused here, an argument so that the autotuner keys on it
        R, T, D, scale, keys_per_split,
        sqg, sqr, sqd,
        skg, skt, skd,
        svg, svt, svd,
        skng, sknd,
        svng, svnd,
        sbt,
        sog, sor, sod,
        BLOCK_R: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_B: tl.constexpr,
        SPLIT: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        g = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1)
        n_splits = tl.num_programs(1)
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        offs_t = tl.arange(0, BLOCK_T)
        mask_rd = (offs_r[:, None] < R) & (offs_d[None, :] < D)
        if PDL:  # launched with programmatic dependent launch: wait for the kernel before (it may
            tl.extra.cuda.gdc_wait()  # write q or the cache) before reading anything
        q = tl.load(q_ptr + g * sqg + offs_r[:, None] * sqr + offs_d[None, :] * sqd, mask=mask_rd, other=0.0)
        q = q.to(tl.float32) * scale
        # An online softmax per key slot of the block, not per row: each slot t keeps its own
        # running maximum, denominator and weighted sum of values, so the loop is elementwise
        # (no reduction across the block's keys, which would cross warps every step); the slots
        # are merged once after the loop. One query row per group (multi-head attention) keeps
        # every tile 2-D in the layout of the key tile: no layout conversions in the loop.
        # The keys after the last one the bias lets through are never read: a prepass over the
        # bias row (T float32, from L2) bounds the loop, which then has no branch to keep its
        # loads from being pipelined; -inf entries before that bound weigh 0 as in the softmax.
        last = -1
        for b0 in range(0, T, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            b = tl.load(bias_ptr + offs_b * sbt, mask=offs_b < T, other=float("-inf"))
            last = tl.maximum(last, tl.max(tl.where(b > NEG, offs_b, -1), axis=0))
        t_start = s * keys_per_split
        t_stop = tl.minimum(t_start + keys_per_split, last + 1)
        k_base = k_ptr + g * skg
        v_base = v_ptr + g * svg
        if BLOCK_R == 1:
            q1 = tl.sum(q, axis=0)
            m_t = tl.full((BLOCK_T,), NEG, tl.float32)
            l_t = tl.zeros((BLOCK_T,), tl.float32)
            acc_t = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
            for t0 in tl.range(t_start, t_stop, BLOCK_T):
                b, k, v = _key_block(
                    bias_ptr, k_base, v_base, t0 + offs_t, t_stop, offs_d, D, sbt, skt, skd, svt, svd
                )
                scores = tl.sum(k * q1[None, :], axis=1) + b
                m_new = tl.maximum(m_t, scores)
                alpha = tl.exp(m_t - m_new)
                p = tl.exp(scores - m_new)
                l_t = l_t * alpha + p
                acc_t = acc_t * alpha[:, None] + p[:, None] * v
                m_t = m_new
            m1 = tl.max(m_t, axis=0)
            w = tl.exp(m_t - m1)
            m = tl.zeros((BLOCK_R,), tl.float32) + m1
            lsum = tl.zeros((BLOCK_R,), tl.float32) + tl.sum(l_t * w, axis=0)
            acc = tl.sum(acc_t * w[:, None], axis=0)[None, :]
        else:
            m_r = tl.full((BLOCK_R, BLOCK_T), NEG, tl.float32)
            l_r = tl.zeros((BLOCK_R, BLOCK_T), tl.float32)
            acc_r = tl.zeros((BLOCK_R, BLOCK_T, BLOCK_D), tl.float32)
            for t0 in tl.range(t_start, t_stop, BLOCK_T):
                b, k, v = _key_block(
                    bias_ptr, k_base, v_base, t0 + offs_t, t_stop, offs_d, D, sbt, skt, skd, svt, svd
                )
                scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) + b[None, :]
                m_new = tl.maximum(m_r, scores)
                alpha = tl.exp(m_r - m_new)
                p = tl.exp(scores - m_new)
                l_r = l_r * alpha + p
                acc_r = acc_r * alpha[:, :, None] + p[:, :, None] * v[None, :, :]
                m_r = m_new
            m = tl.max(m_r, axis=1)
            w = tl.exp(m_r - m[:, None])
            lsum = tl.sum(l_r * w, axis=1)
            acc = tl.sum(acc_r * w[:, :, None], axis=1)
        if s == n_splits - 1:  # the new token's own key and value, once per group
            kn = tl.load(kn_ptr + g * skng + offs_d * sknd, mask=offs_d < D, other=0.0).to(tl.float32)
            vn = tl.load(vn_ptr + g * svng + offs_d * svnd, mask=offs_d < D, other=0.0).to(tl.float32)
            s_new = tl.sum(q * kn[None, :], axis=1) + tl.load(bias_ptr + T * sbt)
            m_new = tl.maximum(m, s_new)
            alpha = tl.exp(m - m_new)
            p_new = tl.exp(s_new - m_new)
            lsum = lsum * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * vn[None, :]
            m = m_new
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if SPLIT:  # partial (acc, m, l) of this split: (G, S, R, D + 2) float32
            base = part_ptr + ((g * n_splits + s) * R + offs_r) * (D + 2)
            tl.store(base[:, None] + offs_d[None, :], acc, mask=mask_rd)
            tl.store(base + D, m, mask=offs_r < R)
            tl.store(base + D + 1, lsum, mask=offs_r < R)
        else:
            out = acc / lsum[:, None]
            o_ptrs = o_ptr + g * sog + offs_r[:, None] * sor + offs_d[None, :] * sod
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_rd)

    @triton.jit
    def _decode_attention_combine(
        part_ptr, o_ptr,
        R, D, S,
        sog, sor, sod,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        g = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        base = part_ptr + ((g * S + offs_s) * R + r) * (D + 2)
        m = tl.load(base + D, mask=offs_s < S, other=NEG)
        lsum = tl.load(base + D + 1, mask=offs_s < S, other=0.0)
        acc = tl.load(
            base[:, None] + offs_d[None, :], mask=(offs_s[:, None] < S) & (offs_d[None, :] < D), other=0.0
        )
        w = tl.exp(m - tl.max(m, axis=0))
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
        tl.store(o_ptr + g * sog + r * sor + offs_d * sod, out.to(o_ptr.dtype.element_ty), mask=offs_d < D)

    def _configs() -> list[triton.Config]:
        """Keys per loop step, warps, pipeline stages; configs whose (R, T, D) float32
        accumulator needs more than 64 registers a thread are pruned for the shape (:func:`_prune`)."""
        return [
            triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=st)
            for bt in (16, 32, 64, 128)
            for w in (4, 8)
            for st in (2, 3, 4)
        ]

    def _prune(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
        tile = kwargs["BLOCK_R"] * kwargs["BLOCK_D"]
        kept = [c for c in configs if c.kwargs["BLOCK_T"] * tile <= 64 * 32 * c.num_warps]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_T"])]

    # keyed on the groups too (the grid's first axis): one layer's 10 heads and 32 layers' 320
    # want other tiles, and Triton keys only on what is named here (and the arguments' dtypes)
    AUTOTUNE_KEY = ["G", "R", "T", "D", "BLOCK_R", "SPLIT", "keys_per_split"]
    _decode_attention_tuned = triton.autotune(
        configs=_configs(),
        key=AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _prune},
    )(_decode_attention_split)

    KEY_UNIT = 128  # automatic key splits are at least this many keys
    PROGRAMS_PER_SM = 2  # automatic key splits aim at this many programs per SM (run 13 sweep)

    @functools.cache
    def _sm_count(device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count

    def splits_for(groups: int, keys: int, device: torch.device) -> int:
        """Programs per group: enough key splits for PROGRAMS_PER_SM programs on every SM, each
        split at least KEY_UNIT keys. One program per group streams its keys too slowly: it is
        bound by its own latency, not by bandwidth."""
        target = PROGRAMS_PER_SM * _sm_count(device)
        return max(1, min(triton.cdiv(target, groups), triton.cdiv(keys, KEY_UNIT)))

    def launch(
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        bias: torch.Tensor,
        scale: float,
        pdl: bool = False,
        splits: int | None = None,
        config: dict[str, int] | None = None,
    ) -> torch.Tensor:
        """q (G, R, D), k_new/v_new (G, D), caches (G, T, D), bias (T + 1,) float32 -> (G, R, D).
        ``splits``: key splits per group (default :func:`splits_for`); ``config``: BLOCK_T (and
        num_warps, num_stages) instead of autotuning, as the interpreter tests run it."""
        groups, rows, dim = q.shape
        keys = k_cache.shape[1]
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        block_r = max(1, triton.next_power_of_2(rows))
        block_d = triton.next_power_of_2(dim)
        n_splits = splits if splits is not None else splits_for(groups, keys, q.device)
        per_split = max(1, triton.cdiv(keys, n_splits))
        n_splits = max(1, triton.cdiv(keys, per_split))
        split = n_splits > 1
        part = q.new_empty((groups, n_splits, rows, dim + 2), dtype=torch.float32) if split else out
        kernel = _decode_attention_tuned if config is None else _decode_attention_split
        kernel[(groups, n_splits)](
            q, k_cache, v_cache, k_new, v_new, bias, out, part,
            groups,
            rows, keys, dim, scale, per_split,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            k_new.stride(0), k_new.stride(1),
            v_new.stride(0), v_new.stride(1),
            bias.stride(0),
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_B=1024, SPLIT=split, PDL=pdl and not split,
            **({"launch_pdl": True} if pdl and not split else {}),
            **(config or {}),
        )  # fmt: skip
        if split:
            _decode_attention_combine[(groups, rows)](
                part, out, rows, dim, n_splits,
                out.stride(0), out.stride(1), out.stride(2),
                BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_D=block_d,
            )  # fmt: skip
        return out


def _batch_dims_view(t: torch.Tensor) -> bool:
    """Whether t's first two dims (batch, kv heads) flatten into one without a copy."""
    b, h = t.shape[0], t.shape[1]
    return b == 1 or h == 1 or t.stride(0) == h * t.stride(1)


def consistent_shapes(q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the operands describe one attention: 4-d, one batch size, the new k (B, Hkv, T, D)
    with the caches' heads and head size, and the two caches alike. The kernel indexes with q's
    batch and the caches' strides without checking them, so operands that disagree (e.g. a cache
    of another batch size, as ``verify`` passes an original with a fixed batch) must take the ops,
    which raise, instead of computing something else."""
    if q.dim() != 4 or k.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        return False
    b, _, t, d = q.shape
    return (
        tuple(k.shape) == (b, k_cache.shape[1], t, d)
        and tuple(k_cache.shape) == tuple(v_cache.shape)
        and k_cache.shape[0] == b
        and k_cache.shape[3] == d
    )


def applies(
    q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor
) -> bool:
    """Whether :func:`attention` computes ``models.kv.cached_attention`` for these operands: one new
    token on a GPU with Triton, matching floating dtypes, the bias one float32 row shared by the
    batch (``attention_bias``), caches whose batch and head dims flatten without a copy, and not
    while ``torch.export`` traces (ONNX, AOTInductor): ``snlp::decode_attention`` is an opaque op
    that an exported program could not run without this project."""
    if triton is None or not q.is_cuda or exporting() or torch.onnx.is_in_onnx_export():
        return False
    if not consistent_shapes(q, k, k_cache, v_cache):
        return False
    _, h, t, d = q.shape
    hkv, keys = k_cache.shape[1], k_cache.shape[2]
    if t != 1 or hkv == 0 or h % hkv or h // hkv > MAX_ROWS or d > MAX_HEAD_DIM:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if any(x.dtype != q.dtype for x in (k, k_cache, v_cache)):
        return False
    if bias.dtype != torch.float32 or tuple(bias.shape) != (1, keys + 1):
        return False
    return _batch_dims_view(k_cache) and _batch_dims_view(v_cache)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bias: torch.Tensor,
    pdl: bool,
) -> torch.Tensor:
    """``models.kv.cached_attention`` of q (B, H, 1, D) on the fused kernel (see :func:`applies`):
    the query heads of one kv head become the rows of its group."""
    b, h, _, d = q.shape
    hkv, keys = k_cache.shape[1], k_cache.shape[2]
    groups = b * hkv
    out = torch.ops.snlp.decode_attention(
        q.reshape(groups, h // hkv, d),
        k.reshape(groups, d),
        v.reshape(groups, d),
        k_cache.flatten(0, 1),
        v_cache.flatten(0, 1),
        bias.view(keys + 1),
        d**-0.5,
        pdl,
    )
    return out.view(b, h, 1, d)
