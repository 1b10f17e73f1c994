"""Plain reference implementations of the fused (wide-layer) functions of the reference models
(``SNLPConfig.fused_layers``, ``passes.wide_layers``), written from the models' modules by hand:
groups of ``m`` consecutive layers, each group reading one input x; the attention branches of its
layers are summed into y = x + sum(...), the MLPs read y and are summed into the output. Layers
before ``first`` run sequentially, as written. Differentiable (the fine-tuning test's gradients)."""

from __future__ import annotations

import torch

from snlp_compile.models.gpt import GPT
from snlp_compile.models.nanochat import NanochatGPT, norm


def _groups(n: int, m: int, first: int) -> list[list[int]]:
    return [list(range(s, s + m)) for s in range(first, n, m)]


def nanochat_fused(model: NanochatGPT, idx: torch.Tensor, m: int, first: int = 0) -> torch.Tensor:
    """NanochatGPT.forward with layers ``first ..`` fused in groups of ``m``. A layer's first half
    includes the residual re-mix p = lambda x + mu x0 before its attention: its increment is
    p + attn(norm(p)) - x."""
    t = idx.shape[1]
    cos, sin = model.cos[:, :t], model.sin[:, :t]
    blocks = model.transformer.h
    x = norm(model.transformer.wte(idx))
    x0 = x
    outputs = {}  # layer index -> hidden state after it (where it exists: a group's last layer)
    for i in range(first):
        x = blocks[i](model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0, cos, sin)
        outputs[i] = x
    for group in _groups(len(blocks), m, first):
        y = x
        for i in group:
            p = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
            y = y + (p + blocks[i].attn(norm(p), cos, sin) - x)
        x = y + sum(blocks[i].mlp(norm(y)) for i in group)
        outputs[group[-1]] = x
    if model.config.backout:  # (the layer it reads must end a group)
        x = x - model.backout_lambda * outputs[model.config.n_layer // 2 - 1]
    x = norm(x)
    softcap = model.config.softcap
    return softcap * torch.tanh(model.lm_head(x) / softcap)


def gpt_wide_layer(blocks: torch.nn.ModuleList, x: torch.Tensor, group: list[int]) -> torch.Tensor:
    """One wide layer of GPT blocks: y = x + sum attn_i(ln_1i(x)), out = y + sum mlp_i(ln_2i(y))."""
    y = x + sum(blocks[i].attn(blocks[i].ln_1(x)) for i in group)
    return y + sum(blocks[i].mlp(blocks[i].ln_2(y)) for i in group)


def gpt_fused(model: GPT, idx: torch.Tensor, m: int, first: int = 0) -> torch.Tensor:
    """GPT.forward with layers ``first ..`` fused in groups of ``m`` (``gpt_wide_layer``)."""
    t = idx.shape[1]
    blocks = model.transformer.h
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(t))
    for i in range(first):
        x = blocks[i](x)
    for group in _groups(len(blocks), m, first):
        x = gpt_wide_layer(blocks, x, group)
    return model.lm_head(model.transformer.ln_f(x))


def fused_reference(model: torch.nn.Module, idx: torch.Tensor, m: int, first: int = 0) -> torch.Tensor:
    if isinstance(model, NanochatGPT):
        return nanochat_fused(model, idx, m, first)
    if isinstance(model, GPT):
        return gpt_fused(model, idx, m, first)
    raise TypeError(type(model).__name__)


@torch.no_grad()
def llama_fused(model: torch.nn.Module, idx: torch.Tensor, m: int) -> torch.Tensor:
    """A Hugging Face LlamaForCausalLM's logits with its layers fused in groups of ``m``; the
    rotary tables and mask are the ones the model hands its first layer (a pre-hook records them)."""
    inner = model.model
    seen: dict[str, object] = {}

    def record(_module: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
        seen.update(kwargs)

    handle = inner.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        model(idx, use_cache=False)
    finally:
        handle.remove()
    extra = {"position_embeddings": seen["position_embeddings"], "attention_mask": seen["attention_mask"]}
    x = inner.embed_tokens(idx)
    layers = inner.layers
    for group in _groups(len(layers), m, 0):
        y = x + sum(layers[i].self_attn(layers[i].input_layernorm(x), **extra)[0] for i in group)
        x = y + sum(layers[i].mlp(layers[i].post_attention_layernorm(y)) for i in group)
    return model.lm_head(inner.norm(x))
