"""A nanochat-style GPT (after karpathy/nanochat's gpt.py), for inference.

What makes it interesting to the compiler: the residual stream is re-mixed *outside*
the blocks, ``x = resid_lambdas[i] * x + x0_lambdas[i] * x0`` before every block, so the
skip path of a layer is a per-layer scalar affine map (scaled IDN in docs/DESIGN.md) with the
embedding output x0 as a side input. With ``backout`` on, the model also reads the hidden
state after layer n_layer//2 - 1 and subtracts a scaled copy of it at the end: a consumer
of an intermediate hidden state that the rewritten graph must still feed.

Other nanochat traits kept here: parameter-free RMSNorm, rotary embeddings, QK-norm,
grouped-query attention, relu^2 MLP, no biases, untied head, logit softcap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kv import attention_bias, cached_attention

KVInput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (k_cache, v_cache, bias) of one layer

if TYPE_CHECKING:

    class _Trunk(nn.ModuleDict):
        """NanochatGPT.transformer's entries as mypy sees them (torch types a ModuleDict's
        attributes as Tensor | Module); for type checking only, the model holds a plain ModuleDict."""

        wte: nn.Embedding
        h: nn.ModuleList


@dataclass
class NanochatConfig:
    vocab_size: int = 65536
    sequence_len: int = 2048
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280
    softcap: float = 15.0
    backout: bool = False
    rope_base: float = 10000.0
    # nanochat's training init: the output projections (c_proj of attention and MLP) start at zero,
    # so every layer starts as the identity and the K=1 SNLP trace is exact at step 0. False: the
    # non-zero init (std 0.4/sqrt(in)) the compiler's reference models use (models.registry sets it
    # for every named preset: a reference model for a compiler needs every layer to do something).
    zero_init_out: bool = True


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + d/2]) of a [B, T, H, D] tensor by the position angle."""
    assert x.ndim == 4
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3)


class CausalSelfAttention(nn.Module):
    """Causal attention with rotary q/k, QK-norm and grouped-query heads (n_kv_head <= n_head)."""

    def __init__(self, config: NanochatConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        assert config.n_head % config.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVInput | None = None
    ) -> Any:
        """Without ``kv``: causal attention over x, returns [B, T, C]. With ``kv`` = (k_cache,
        v_cache, bias) of this layer: attention over the cache plus x, returns (out, k, v) where
        k, v [B, H_kv, T, D] are the new tokens' keys/values (see models.kv)."""
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if kv is not None:
            k_cache, v_cache, bias = kv
            y = cached_attention(q, k, v, k_cache, v_cache, bias)
            y = y.transpose(1, 2).contiguous().view(B, T, -1)
            return self.c_proj(y), k, v
        # Grouped-query attention: each k/v head serves n_head // n_kv_head query heads.
        # Explicit repeat (rather than enable_gqa) so every backend and exporter sees plain ops.
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: NanochatConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    """Pre-norm block with identity skips; the lambda mixing lives outside, in GPT.forward."""

    def __init__(self, config: NanochatConfig) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVInput | None = None
    ) -> Any:
        if kv is not None:  # cached step: also hand the new keys/values to the caller
            a, k, v = self.attn(norm(x), cos, sin, kv)
            x = x + a
            x = x + self.mlp(norm(x))
            return x, k, v
        x = x + self.attn(norm(x), cos, sin)
        x = x + self.mlp(norm(x))
        return x


def _branches(block: nn.Module) -> tuple[CausalSelfAttention, MLP]:
    """The attention and MLP of a block of this family (Block, MHCBlock), typed for the init."""
    attn, mlp = block.attn, block.mlp
    assert isinstance(attn, CausalSelfAttention) and isinstance(mlp, MLP)
    return attn, mlp


class NanochatGPT(nn.Module):
    transformer: _Trunk
    cos: torch.Tensor  # rotary tables (buffers)
    sin: torch.Tensor

    def __init__(self, config: NanochatConfig) -> None:
        super().__init__()
        self.config = config
        self._set_trunk(
            nn.Embedding(config.vocab_size, config.n_embd), [Block(config) for _ in range(config.n_layer)]
        )
        # Per-layer scalars of the residual re-mix x <- resid_lambda * x + x0_lambda * x0.
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((config.n_layer,), 0.1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.tensor(0.2))
        self.init_weights()

    def _set_trunk(self, wte: nn.Embedding, blocks: Sequence[nn.Module]) -> None:
        """Embedding, layers, head and rotary tables: the parts every model of this family shares
        (the mHC variants reuse it with their own blocks). The caller builds ``wte`` and ``blocks``
        in its own order, which fixes how they draw from the random generator."""
        config = self.config
        self.transformer = cast("_Trunk", nn.ModuleDict(dict(wte=wte, h=nn.ModuleList(blocks))))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables are derived, not learned: non-persistent so they stay out of state_dict.
        cos, sin = self._precompute_rotary(config.sequence_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _precompute_rotary(self, seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables of shape [1, seq_len, 1, head_dim // 2], broadcast over batch and heads."""
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32)
        inv_freq = 1.0 / (self.config.rope_base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def _rotary(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions 0 .. t-1 (a full forward); t beyond the tables is an error."""
        assert t <= self.cos.size(1), f"sequence length {t} exceeds rotary cache {self.cos.size(1)}"
        return self.cos[:, :t], self.sin[:, :t]

    def _step_inputs(
        self, idx: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cos, sin and the attention bias of a cached step of idx's t tokens at pos .. pos+t-1."""
        t = idx.size(1)
        positions = pos + torch.arange(t, device=idx.device)
        bias = attention_bias(pos, t, k_cache.size(3), torch.float32)
        return self.cos[:, positions], self.sin[:, positions], bias

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head of every model of this family: final norm, lm_head, tanh softcap."""
        logits = self.lm_head(norm(x))
        softcap = self.config.softcap
        return softcap * torch.tanh(logits / softcap)

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init. ``config.zero_init_out`` (the default) zeroes the output projections, as
        nanochat's training does; False keeps them random (branches of rms ~0.3-0.5), for reference
        models of a compiler. The other weights draw the same values either way."""
        d = self.config.n_embd
        s = 3**0.5 * d**-0.5  # uniform bound with std d**-0.5, as nanochat
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=d**-0.5)
        for block in self.transformer.h:
            attn, mlp = _branches(block)
            for lin in (attn.c_q, attn.c_k, attn.c_v, mlp.c_fc):
                torch.nn.init.uniform_(lin.weight, -s, s)
            # Output projections: branch outputs of rms ~0.3-0.5 against a stream of rms ~1,
            # visible but not dominant, at every width.
            for proj in (attn.c_proj, mlp.c_proj):
                torch.nn.init.normal_(proj.weight, mean=0.0, std=0.4 * proj.in_features**-0.5)
                if self.config.zero_init_out:
                    proj.weight.zero_()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: LongTensor [B, T] -> softcapped logits [B, T, vocab_size] at every position."""
        cos, sin = self._rotary(idx.size(1))
        x = norm(self.transformer.wte(idx))
        x0 = x
        x_mid = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = block(x, cos, sin)
            if self.config.backout and i == self.config.n_layer // 2 - 1:
                x_mid = x
        if self.config.backout:
            x = x - self.backout_lambda * x_mid
        return self._logits(x)

    def forward_cached(
        self, idx: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One KV-cached step (prefill when T > 1, decode when T = 1), functional.

        idx [B, T] at positions pos .. pos+T-1 (pos: 0-dim LongTensor on the model's device);
        k_cache, v_cache [L, B, H_kv, T_max, D] hold positions < pos. Returns softcapped logits
        [B, T, vocab] and the new keys/values [L, B, H_kv, T, D], which the caller writes into the
        caches at pos (models.kv.write_cache). pos + T must not exceed T_max or the rotary table.
        """
        cos, sin, bias = self._step_inputs(idx, pos, k_cache)
        x = norm(self.transformer.wte(idx))
        x0 = x
        x_mid = x
        new_k, new_v = [], []
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x, k, v = block(x, cos, sin, (k_cache[i], v_cache[i], bias))
            new_k.append(k)
            new_v.append(v)
            if self.config.backout and i == self.config.n_layer // 2 - 1:
                x_mid = x
        if self.config.backout:
            x = x - self.backout_lambda * x_mid
        return self._logits(x), torch.stack(new_k), torch.stack(new_v)
