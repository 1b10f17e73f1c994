"""The KV-cached step protocol (models.kv) for `transformers` causal LMs, without user code.

    step_model = HFCachedLM(hf_model, max_len=512)   # shares the HF model's modules: no weight copies
    logits, new_k, new_v = step_model.forward_cached(idx, pos, k_cache, v_cache)

``generate()`` and ``Decoder`` wrap a supported `transformers` model themselves, so most callers
never build this. The step is written per family from the HF model's own submodules (embeddings,
norms, projections, rotary module, MLP, final norm, head), with the attention over the stacked
cache as the kernel library's ``cached_attention``: the op the batching pass folds over all layers
and that runs the fused decode kernels on a GPU. Each decoder layer sits in a small ``Block``
module, as in the reference models, so the layer chain is ``blocks.0 ..``.

What the adapter cannot reproduce exactly is refused when it is built, naming the config field:
an unknown family, a sliding window shorter than the cache, logit soft-capping, an attention
scale other than 1/sqrt(head_dim), RoPE types whose frequencies change with the sequence
(dynamic, longrope) or that are not listed, mixtures of experts, cross-attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn

from ..errors import SNLPRefusal, SNLPUsageError
from .kv import attention_bias, cached_attention

KVInput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (k_cache, v_cache, bias) of one layer
Rope = tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin), (1, T, rotary dims); None: no rotary

# RoPE types whose frequencies the rotary module computes once (the module is called as is)
STATIC_ROPE_TYPES = ("default", "linear", "llama3")
# config fields that change the function in ways the step does not reproduce (set = refused)
_REFUSED_FIELDS = (
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "query_pre_attn_scalar",
    "num_experts",
    "num_local_experts",
    "add_cross_attention",
    "scale_attn_by_inverse_layer_idx",
)


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its parts (attribute paths from the CausalLM) and how a layer runs."""

    trunk: str  # the base model: "model", "transformer", "gpt_neox"
    embed: str  # token embedding under the trunk
    layers: str  # the decoder layers under the trunk
    norm: str  # final norm under the trunk
    rotary: str | None  # rotary module under the trunk; None: learned positions (``positions``)
    layer: str  # "llama" (q/k/v/o), "phi3" (qkv_proj), "gpt2" (Conv1D c_attn), "neox"
    positions: str | None = None  # learned position embedding under the trunk (GPT-2)


LLAMA_LIKE = FamilySpec("model", "embed_tokens", "layers", "norm", "rotary_emb", "llama")
FAMILIES: dict[str, FamilySpec] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,  # q/k/v biases live in the projections
    "gemma": LLAMA_LIKE,  # sqrt(d) embedding scale and (1 + w) RMSNorm live in the modules
    "phi3": FamilySpec("model", "embed_tokens", "layers", "norm", "rotary_emb", "phi3"),
    "gpt2": FamilySpec("transformer", "wte", "h", "ln_f", None, "gpt2", positions="wpe"),
    "gpt_neox": FamilySpec("gpt_neox", "embed_in", "layers", "final_layer_norm", "rotary_emb", "neox"),
}


@dataclass(frozen=True)
class HFStepConfig:
    """The sizes models.kv reads (cache shape, positions), taken from the HF config."""

    family: str
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_embd: int
    block_size: int  # the longest sequence the step reproduces (max positions, sliding window)
    vocab_size: int


def is_hf_causal_lm(model: Any) -> bool:
    """A `transformers` model with a language-model head (checked without importing transformers)."""
    return (
        isinstance(model, nn.Module)
        and type(model).__module__.startswith("transformers.")
        and getattr(getattr(model, "config", None), "model_type", None) is not None
        and type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    )


def _refuse(model_type: str, what: str) -> SNLPRefusal:
    return SNLPRefusal(f"decode adapter for transformers '{model_type}': {what}")


def _rope_type(cfg: Any) -> str:
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        return "per-layer-type"  # one RoPE per layer type (Gemma3 and the like)
    return str(params.get("rope_type", "default")) if isinstance(params, dict) else "default"


def _sliding_window(cfg: Any) -> int | None:
    """The window of the config's sliding-window layers, None when no layer slides. Only Qwen2's
    attention reads ``layer_types`` (and ``use_sliding_window``); Mistral's and Phi3's slide in
    every layer whenever ``sliding_window`` is set, so any window counts for them (and for the rest)."""
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return None
    if cfg.model_type == "qwen2":
        types = getattr(cfg, "layer_types", None)
        if not getattr(cfg, "use_sliding_window", False) or (
            types is not None and "sliding_attention" not in types
        ):
            return None
    return int(window)


def _check(model: nn.Module, spec: FamilySpec, max_len: int | None) -> int:
    """Refuse what the step would not reproduce; return the longest sequence it reproduces."""
    cfg: Any = model.config  # (a transformers PretrainedConfig)
    mt = cfg.model_type
    rope = _rope_type(cfg)
    if spec.rotary is not None and rope not in STATIC_ROPE_TYPES:
        raise _refuse(
            mt,
            f"config.rope_parameters['rope_type']={rope!r} is not supported "
            f"(supported: {', '.join(STATIC_ROPE_TYPES)})",
        )
    if spec.layer == "gpt2" and not cfg.scale_attn_weights:
        raise _refuse(mt, "config.scale_attn_weights=False: the cached attention scales by 1/sqrt(head_dim)")
    longest = int(cfg.max_position_embeddings)
    window = _sliding_window(cfg)
    if window is not None:
        if max_len is not None and max_len > window:
            raise _refuse(
                mt,
                f"config.sliding_window={window} is shorter than max_len={max_len}: the window would "
                "be active and the cached step attends to the whole cache",
            )
        longest = min(longest, window)
    return longest


def _attention_module(spec: FamilySpec, layer: nn.Module) -> nn.Module:
    return layer.get_submodule({"gpt2": "attn", "neox": "attention"}.get(spec.layer, "self_attn"))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] dims of x (partial rotary keeps the rest)."""
    rot = cos.shape[-1]
    x_rot = x if rot == x.shape[-1] else x[..., :rot]  # (no dead slices: the layer's graph is a chain)
    half = rot // 2
    out = x_rot * cos + torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1) * sin
    return out if rot == x.shape[-1] else torch.cat((out, x[..., rot:]), dim=-1)


class Block(nn.Module):
    """One HF decoder layer as a cached step: x, rope, kv -> (x, k, v). Holds the HF layer itself."""

    def __init__(self, layer: nn.Module, kind: str, cfg: HFStepConfig, parallel_residual: bool):
        super().__init__()
        self.layer: Any = layer  # a transformers decoder layer: its parts' names depend on the family
        self.kind = kind
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.parallel_residual = parallel_residual

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, heads, self.head_dim).transpose(1, 2)

    def _qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]]:
        """q, k (before RoPE) and a thunk for v: v's last op comes after k's (see _attention)."""
        layer, hq, hkv, d = self.layer, self.n_head, self.n_kv_head, self.head_dim
        if self.kind == "llama":
            a = layer.self_attn
            return (
                self._heads(a.q_proj(h), hq),
                self._heads(a.k_proj(h), hkv),
                lambda: self._heads(a.v_proj(h), hkv),
            )
        if self.kind == "phi3":
            q, k, v = layer.self_attn.qkv_proj(h).split([hq * d, hkv * d, hkv * d], dim=-1)
            return self._heads(q, hq), self._heads(k, hkv), lambda: self._heads(v, hkv)
        if self.kind == "gpt2":
            q, k, v = layer.attn.c_attn(h).split(hq * d, dim=-1)
            return self._heads(q, hq), self._heads(k, hq), lambda: self._heads(v, hq)
        # GPT-NeoX: per head [q | k | v] interleaved in the fused projection's output
        b, n, _ = h.shape
        qkv = layer.attention.query_key_value(h).view(b, n, hq, 3 * d)
        return (
            qkv[..., :d].transpose(1, 2),
            qkv[..., d : 2 * d].transpose(1, 2),
            lambda: qkv[..., 2 * d :].transpose(1, 2),
        )

    def _attention(self, h: torch.Tensor, rope: Rope, kv: KVInput) -> tuple[torch.Tensor, ...]:
        # k is complete (RoPE applied) before v's last op: the layer hands out its K/V in that
        # order, which is what the deferred K/V pass (SNLPConfig.deferred_kv) expects
        q, k, make_v = self._qkv(h)
        if rope is not None:
            cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        v = make_v()
        y = cached_attention(q, k, v, *kv)
        b, _, n, _ = y.shape
        y = y.transpose(1, 2).reshape(b, n, self.n_head * self.head_dim)
        out = {"gpt2": "attn.c_proj", "neox": "attention.dense"}.get(self.kind, "self_attn.o_proj")
        return self.layer.get_submodule(out)(y), k, v

    def forward(
        self, x: torch.Tensor, rope: Rope, kv: KVInput
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = self.layer
        if self.kind == "gpt2":
            a, k, v = self._attention(layer.ln_1(x), rope, kv)
            x = x + a
            return x + layer.mlp(layer.ln_2(x)), k, v
        a, k, v = self._attention(layer.input_layernorm(x), rope, kv)
        if self.parallel_residual:  # GPT-NeoX use_parallel_residual: both branches read x
            return x + a + layer.mlp(layer.post_attention_layernorm(x)), k, v
        x = x + a
        return x + layer.mlp(layer.post_attention_layernorm(x)), k, v


class HFCachedLM(nn.Module):
    """A `transformers` causal LM with ``forward_cached`` (models.kv), sharing its modules.

    ``max_len``: the cache length it will be used with, checked against a sliding window (None:
    ``config.block_size`` is the longest sequence it reproduces). Refuses, naming the config
    field, anything it does not reproduce exactly (see the module docstring). Dropout is not
    applied: the step runs in eval mode only (``Decoder`` runs it so; training mode is refused). ``hf_model`` is the wrapped model (not a submodule: the
    step's parts are, so ``parameters()`` are the HF model's, each once).
    """

    def __init__(self, model: nn.Module, *, max_len: int | None = None):
        super().__init__()
        cfg = getattr(model, "config", None)
        model_type = getattr(cfg, "model_type", None)
        for field in _REFUSED_FIELDS:  # (first: they name the obstacle better than the family)
            value = getattr(cfg, field, None)
            if value not in (None, False, 0):
                raise _refuse(
                    str(model_type), f"config.{field}={value!r} is not reproduced by the cached step"
                )
        if not is_hf_causal_lm(model):
            raise SNLPRefusal(
                f"{type(model).__name__} is not a transformers causal LM (a *ForCausalLM / *LMHeadModel "
                "with a config.model_type): the decode adapter cannot wrap it"
            )
        assert cfg is not None and model_type is not None
        spec = FAMILIES.get(model_type)
        if spec is None:
            raise _refuse(
                model_type,
                f"config.model_type={model_type!r} is not a family the decode adapter reproduces "
                f"(supported: {', '.join(FAMILIES)})",
            )
        longest = _check(model, spec, max_len)
        trunk = model.get_submodule(spec.trunk)
        layers = cast(nn.ModuleList, trunk.get_submodule(spec.layers))
        attn = _attention_module(spec, layers[0])
        n_head = int(cfg.num_attention_heads)
        head_size: Any = getattr(attn, "head_dim", None) or getattr(attn, "head_size", 0)
        head_dim = int(head_size)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
        for i, layer in enumerate(layers):
            scaling = getattr(_attention_module(spec, layer), "scaling", None)
            if scaling is None or abs(float(scaling) - head_dim**-0.5) > 1e-12 * head_dim**-0.5:
                raise _refuse(
                    model_type,
                    f"layer {i}'s attention scale {scaling!r} is not 1/sqrt(head_dim={head_dim}) "
                    "(config.query_pre_attn_scalar / attention scaling variants are not reproduced)",
                )
        self.config = HFStepConfig(
            family=model_type,
            n_layer=len(layers),
            n_head=n_head,
            n_kv_head=n_kv,
            head_dim=head_dim,
            n_embd=int(cfg.hidden_size),
            block_size=longest,
            vocab_size=int(cfg.vocab_size),
        )
        self.__dict__["hf_model"] = model  # (not registered: its parts below are)
        self.spec = spec
        self.embed = trunk.get_submodule(spec.embed)
        self.wpe = trunk.get_submodule(spec.positions) if spec.positions else None
        self.rotary = trunk.get_submodule(spec.rotary) if spec.rotary else None
        parallel = bool(getattr(cfg, "use_parallel_residual", False)) and spec.layer == "neox"
        self.blocks = nn.ModuleList(Block(layer, spec.layer, self.config, parallel) for layer in layers)
        self.norm = trunk.get_submodule(spec.norm)
        self.lm_head = model.get_submodule("lm_head")
        self.training = model.training

    def forward_cached(
        self, idx: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One KV-cached step (models.kv): idx (B, T) at positions pos .. pos+T-1 over caches
        (L, B, H_kv, T_max, D) holding positions < pos -> logits (B, T, vocab), new K/V (L, B, H_kv, T, D)."""
        if self.training:  # (the step applies no dropout: refuse rather than differ in training mode)
            raise SNLPUsageError("HFCachedLM.forward_cached runs in eval mode only: call .eval() first")
        _, t = idx.shape
        positions = pos + torch.arange(t, device=idx.device)
        bias = attention_bias(pos, t, k_cache.size(3))
        x = self.embed(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        rope: Rope = None
        if self.rotary is not None:
            cos, sin = self.rotary(x, positions.unsqueeze(0))
            rope = (cos, sin)
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, rope, (k_cache[i], v_cache[i], bias))
            new_k.append(k)
            new_v.append(v)
        return self.lm_head(self.norm(x)), torch.stack(new_k), torch.stack(new_v)


def as_cached_lm(model: nn.Module, max_len: int | None = None) -> nn.Module:
    """``model`` itself when it has ``forward_cached``, else the adapter over a supported
    `transformers` causal LM (refusing what it cannot reproduce), else a TypeError as before."""
    if hasattr(model, "forward_cached"):
        return model
    if type(model).__module__.startswith("transformers."):
        return HFCachedLM(model, max_len=max_len)  # (or its refusal, naming what it cannot reproduce)
    raise TypeError(f"{type(model).__name__} has no forward_cached(idx, pos, k_cache, v_cache)")
