"""A plain pre-norm GPT in the style of nanoGPT's model.py.

This is the simplest residual chain the compiler must handle: every block is
``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``, so the skip path is the identity
(IDN in docs/DESIGN.md). Kept in one readable file on purpose: the compiler works on the
model exactly as users write it, so the reference should look like user code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn
from torch.nn import functional as F

from .kv import attention_bias, cached_attention

KVInput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (k_cache, v_cache, bias) of one layer

if TYPE_CHECKING:

    class _Trunk(nn.ModuleDict):
        """GPT.transformer's entries as mypy sees them (torch types a ModuleDict's attributes as
        Tensor | Module); for type checking only, the model holds a plain ModuleDict."""

        wte: nn.Embedding
        wpe: nn.Embedding
        drop: nn.Dropout
        h: nn.ModuleList
        ln_f: nn.LayerNorm


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, kv: KVInput | None = None) -> Any:
        """Without ``kv``: causal attention over x. With ``kv`` = (k_cache, v_cache, bias) of this
        layer: attention over the cache plus x, returning (out, k, v) (see models.kv)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv is not None:
            k_cache, v_cache, bias = kv
            y = cached_attention(q, k, v, k_cache, v_cache, bias)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.resid_dropout(self.c_proj(y)), k, v
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm block: identity skip path plus attention and MLP branches."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv: KVInput | None = None) -> Any:
        if kv is not None:  # cached step: also hand the new keys/values to the caller
            a, k, v = self.attn(self.ln_1(x), kv)
            x = x + a
            x = x + self.mlp(self.ln_2(x))
            return x, k, v
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """Token + learned position embeddings, n_layer blocks, final LayerNorm, tied head."""

    transformer: _Trunk

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = cast(
            "_Trunk",
            nn.ModuleDict(
                dict(
                    wte=nn.Embedding(config.vocab_size, config.n_embd),
                    wpe=nn.Embedding(config.block_size, config.n_embd),
                    drop=nn.Dropout(config.dropout),
                    h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                    ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
                )
            ),
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying, as in GPT-2: the head reuses the token embedding matrix.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # Scaled init of the residual projections (GPT-2 paper): keeps the residual
        # stream's variance from growing with depth.
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the tied head is counted once (as wte). Position embeddings are
        subtracted when non_embedding is set, as in nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: LongTensor [B, T] -> logits [B, T, vocab_size] at every position."""
        _, t = idx.size()
        assert t <= self.config.block_size, (
            f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        )
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        return self.lm_head(x)

    def forward_cached(
        self, idx: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One KV-cached step (prefill when T > 1, decode when T = 1), functional.

        idx [B, T] at positions pos .. pos+T-1 (pos: 0-dim LongTensor on the model's device);
        k_cache, v_cache [L, B, H, T_max, D] hold positions < pos. Returns logits [B, T, vocab]
        and the new keys/values [L, B, H, T, D], which the caller writes into the caches at pos
        (models.kv.write_cache). pos + T must not exceed T_max or block_size.
        """
        _, t = idx.size()
        positions = pos + torch.arange(t, dtype=torch.long, device=idx.device)
        bias = attention_bias(pos, t, k_cache.size(3))
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        new_k, new_v = [], []
        for i, block in enumerate(self.transformer.h):
            x, k, v = block(x, (k_cache[i], v_cache[i], bias))
            new_k.append(k)
            new_v.append(v)
        x = self.transformer.ln_f(x)
        return self.lm_head(x), torch.stack(new_k), torch.stack(new_v)
