"""ONNX export of a KV-cached decode step with the caches as graph inputs and outputs, named as
ONNX Runtime GenAI names them, so a generator can drive the step in a loop from ONNX Runtime.

Graph boundary (L layers, one new token per step):

- inputs ``input_ids`` (batch, 1) int64, ``position`` () int64 (the new token's position, also the
  number of cached tokens; every row shares it), ``past_key_values.N.key`` / ``.value``
  (batch, H_kv, max_sequence_length, D) for N = 0 .. L-1;
- outputs ``logits`` (batch, 1, vocab), ``present.N.key`` / ``.value``: the past with the new
  token's K/V written at ``position``, the same shape as the past (a fixed-size buffer, GenAI's
  ``past_present_share_buffer`` layout), so each step's present is the next step's past.

Inside, the per-layer caches are stacked into the (L, batch, H_kv, T_max, D) caches the step
(``models.kv.CachedStep``, or its transform) reads: one copy of the cache per step, the price of
per-layer names at the boundary. The write is a select against ``position``; a position at or
past ``max_sequence_length`` writes nothing (``ort_decode`` refuses such a run).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..api import transform
from ..config import SNLPConfig, resolve_config
from ..errors import SNLPConfigError, SNLPUsageError
from ..models.hf_decode import as_cached_lm
from ..models.kv import CachedStep, cache_shape, new_cache, write_cache
from ..report import ExplainReport
from .onnx_export import DEFAULT_OPSET, ONNXExport, export_onnx

INPUT_IDS, POSITION, LOGITS = "input_ids", "position", "logits"


def past_names(n_layer: int) -> list[str]:
    """``past_key_values.N.key``, ``past_key_values.N.value`` for every layer, in that order."""
    return [f"past_key_values.{n}.{kv}" for n in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    """``present.N.key``, ``present.N.value`` for every layer, in that order."""
    return [f"present.{n}.{kv}" for n in range(n_layer) for kv in ("key", "value")]


class PerLayerCacheStep(nn.Module):
    """A cached step (``forward(idx, pos, k_cache, v_cache) -> (logits, new_k, new_v)``) with
    per-layer caches in and per-layer updated caches out: forward(input_ids, position,
    k_0, v_0, ..., k_{L-1}, v_{L-1}) -> (logits, present k_0, present v_0, ...)."""

    def __init__(self, step: nn.Module, n_layer: int):
        super().__init__()
        self.step = step
        self.n_layer = n_layer

    def forward(
        self, input_ids: torch.Tensor, position: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        if len(past) != 2 * self.n_layer:
            raise SNLPUsageError(
                f"the step takes {2 * self.n_layer} past caches (key, value per layer), got {len(past)}"
            )
        logits, new_k, new_v = self.step(
            input_ids, position, torch.stack(past[0::2]), torch.stack(past[1::2])
        )
        t_max = past[0].shape[2]
        slot = (torch.arange(t_max, device=position.device) == position).unsqueeze(-1)  # (T_max, 1)
        out = [logits]
        for n in range(self.n_layer):
            k, v = past[2 * n], past[2 * n + 1]
            out.append(torch.where(slot, new_k[n].to(k.dtype), k))
            out.append(torch.where(slot, new_v[n].to(v.dtype), v))
        return tuple(out)


def decode_example(model: nn.Module, batch: int, max_len: int) -> tuple[torch.Tensor, ...]:
    """Example inputs of the per-layer step: one token per row at position 0, zeroed caches."""
    if batch < 1 or max_len < 2:
        raise SNLPConfigError(f"batch must be >= 1 and max_len >= 2, got batch={batch}, max_len={max_len}")
    k_cache, v_cache = new_cache(model, batch, max_len)
    idx = torch.zeros(batch, 1, dtype=torch.long, device=k_cache.device)
    past = [c for n in range(k_cache.shape[0]) for c in (k_cache[n], v_cache[n])]
    return (idx, torch.tensor(0, device=k_cache.device), *past)


def export_onnx_decode(
    model: nn.Module,
    path: str | Path,
    config: SNLPConfig | None = None,
    *,
    batch: int = 2,
    max_len: int = 64,
    rewrite: bool = True,
    dynamic: bool = True,
    opset: int = DEFAULT_OPSET,
    **overrides: Any,
) -> ONNXExport:
    """Export ``model``'s decode step (a reference model with ``forward_cached``, or a
    `transformers` causal LM through ``models.hf_decode``) to ONNX with
    per-layer caches at the graph boundary (module docstring). rewrite: the step transformed with
    ``config``/``overrides`` (the layer-parallel step); False: the sequential step. dynamic: batch
    and max_sequence_length symbolic (trace with batch >= 2 to keep batch so)."""
    # a `transformers` causal LM: the decode adapter's step (models.hf_decode); anything else
    # without a cached step (TypeError there) gets the one-line error below
    with contextlib.suppress(TypeError):
        model = as_cached_lm(model, max_len)
    if not hasattr(model, "forward_cached") or not hasattr(model, "config"):
        raise SNLPUsageError(
            f"{type(model).__name__} has no KV-cached step (forward_cached and config, as the reference models)"
        )
    step: nn.Module = CachedStep(model)
    example = decode_example(model, batch, max_len)
    n_layer = cache_shape(model, batch, max_len)[0]
    report: ExplainReport | None = None
    if rewrite:
        cfg = resolve_config(config, overrides).replace(dynamic_shapes=dynamic)
        k_cache, v_cache = torch.stack(example[2::2]), torch.stack(example[3::2])
        step = transform(step, (example[0], example[1], k_cache, v_cache), cfg)
        report = ExplainReport.of(step)
    elif config is not None or overrides:
        raise SNLPConfigError("rewrite=False exports the sequential step: config/overrides do not apply")
    dims: dict[str, tuple[str, ...]] = {
        name: ("batch", "num_kv_heads", "max_sequence_length", "head_dim") for name in past_names(n_layer)
    }
    dims[INPUT_IDS] = ("batch", "sequence")
    with warnings.catch_warnings():  # one new token per step: input_ids' fixed length is by design
        warnings.filterwarnings("ignore", message="input 'input_ids' dimension 1")
        result = export_onnx(
            PerLayerCacheStep(step, n_layer),
            example,
            path,
            rewrite=False,
            dynamic=dynamic,
            opset=opset,
            input_names=[INPUT_IDS, POSITION, *past_names(n_layer)],
            output_names=[LOGITS, *present_names(n_layer)],
            dim_names=dims,
        )
    result.snlp_report = report
    result.notes = [n for n in result.notes if "input 'input_ids' dimension 1" not in n]
    result.notes.append(
        "decode step: present.N.* = past_key_values.N.* with the new token written at `position`"
    )
    return result


def _cache_inputs(session: Any) -> tuple[int, int, int, Any]:
    """(layers, H_kv, D, numpy dtype) from the session's past inputs; they must be static."""
    import numpy as np

    inputs = {i.name: i for i in session.get_inputs()}
    n_layer = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    if n_layer == 0 or INPUT_IDS not in inputs or POSITION not in inputs:
        raise SNLPUsageError(
            f"not a decode step of export_onnx_decode: inputs {list(inputs)}; expected "
            f"{INPUT_IDS}, {POSITION}, past_key_values.N.key/value"
        )
    first = inputs["past_key_values.0.key"]
    heads, dim = first.shape[1], first.shape[3]
    if not (isinstance(heads, int) and isinstance(dim, int)):
        raise SNLPUsageError(f"past_key_values.0.key has symbolic heads or head size: {first.shape}")
    dtypes = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
    if first.type not in dtypes:
        raise SNLPUsageError(f"caches of type {first.type} are not supported by ort_decode")
    return n_layer, heads, dim, dtypes[first.type]


def ort_decode(
    session: Any, tokens: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``tokens`` (batch, T) through an exported decode step under ONNX Runtime, one token per
    step from zeroed caches of ``max_len`` positions, feeding each step's present back as the next
    past. Returns the logits (batch, T, vocab) and the final caches stacked (L, batch, H_kv, max_len, D)."""
    import numpy as np

    n_layer, heads, dim, dtype = _cache_inputs(session)
    batch, steps = tokens.shape
    if steps > max_len:
        raise SNLPUsageError(f"{steps} tokens do not fit caches of max_len={max_len}")
    past = [np.zeros((batch, heads, max_len, dim), dtype=dtype) for _ in range(2 * n_layer)]
    names = past_names(n_layer)
    logits = []
    ids = tokens.cpu().numpy().astype(np.int64)
    for t in range(steps):
        feed = {INPUT_IDS: ids[:, t : t + 1], POSITION: np.array(t, dtype=np.int64), **dict(zip(names, past))}
        out = session.run(None, feed)
        logits.append(torch.from_numpy(out[0]))
        past = out[1:]
    k = torch.stack([torch.from_numpy(a) for a in past[0::2]])
    v = torch.stack([torch.from_numpy(a) for a in past[1::2]])
    return torch.cat(logits, dim=1), k, v


def torch_decode(
    step: nn.Module, model: nn.Module, tokens: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`ort_decode` in PyTorch: ``step`` (``CachedStep(model)`` or its transform) one token
    at a time from zeroed caches, ``write_cache`` after each step; the reference for parity."""
    batch, steps = tokens.shape
    if steps > max_len:
        raise SNLPUsageError(f"{steps} tokens do not fit caches of max_len={max_len}")
    k_cache, v_cache = new_cache(model, batch, max_len)
    logits = []
    with torch.no_grad():
        for t in range(steps):
            pos = torch.tensor(t)
            out, new_k, new_v = step(tokens[:, t : t + 1], pos, k_cache, v_cache)
            write_cache(k_cache, v_cache, new_k, new_v, pos)
            logits.append(out)
    return torch.cat(logits, dim=1), k_cache, v_cache
