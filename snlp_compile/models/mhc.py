"""A manifold-constrained hyper-connection (mHC) variant of the nanochat-style GPT.

The residual stream is n parallel streams, a tensor (B, T, n, D): the embedding is repeated on
every stream, each sublayer (attention, MLP) reads a mix of the streams and writes back into all
of them, and the streams are summed before the final norm. Per sublayer (DeepSeek mHC, arXiv
2512.24880, eqs. 7-9; the SNLP paper's HCN model):

    h <- H_res h + H_post^T f(H_pre h)

H_res (n x n, doubly stochastic by Sinkhorn-Knopp) mixes the streams on the skip path: it is the
HC-Newton surrogate Jacobian (docs/DESIGN.md section 1). H_pre (1 x n) reads the branch input, H_post
(1 x n) spreads the branch output. Two flavours:

- static: H_res = Sinkhorn(learned logits), H_pre and H_post softmaxes of learned logits. The
  coefficients do not depend on the input, so the compiler folds them at transform time.
- dynamic (DeepSeek's mHC): per token, x~ = RMSNorm(vec(h)) (the n streams flattened to n*D),
  H_pre = sigmoid(a_pre x~ phi_pre + b_pre), H_post = 2 sigmoid(a_post x~ phi_post + b_post),
  H_res = Sinkhorn-Knopp(a_res mat(x~ phi_res) + b_res). The compiler evaluates them inside the
  batched layer at the current iterate (the frozen-coefficient structured Newton surrogate).

Attention and MLP are nanochat's own classes (imported, not copied). ``HCPackageGPT`` is the same
network assembled from the ``hyper-connections`` package's modules instead (HC and mHC). Both have
nanochat's KV-cached step, ``forward_cached`` (models.kv): the hyper-connection around the cached
attention writes its output back into the streams and hands the new keys/values on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .nanochat import MLP, CausalSelfAttention, KVInput, NanochatConfig, NanochatGPT, norm


@dataclass
class MHCConfig(NanochatConfig):
    n_streams: int = 4
    dynamic: bool = False  # False: static H (learned logits); True: per-token H (DeepSeek mHC)
    sinkhorn_iters: int = 20
    # Spread of the random logits at init: H_res far from the identity makes the stream mixing
    # matter (and HCN's surrogate differ from IDN's), as in a trained mHC model.
    mix_logit_std: float = 1.0


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp projection of exp(logits) onto the doubly stochastic matrices (last two dims):
    alternate row and column normalisation, a fixed number of times, as mHC does."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)
        m = m / m.sum(dim=-2, keepdim=True)
    return m


class StaticMix(nn.Module):
    """H_pre, H_post, H_res of one sublayer from learned logits (input independent)."""

    def __init__(self, config: MHCConfig) -> None:
        super().__init__()
        n = config.n_streams
        self.iters = config.sinkhorn_iters
        self.pre_logits = nn.Parameter(torch.zeros(n))
        self.post_logits = nn.Parameter(torch.zeros(n))
        self.res_logits = nn.Parameter(torch.zeros(n, n))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = torch.softmax(self.pre_logits, dim=-1)
        post = torch.softmax(self.post_logits, dim=-1)
        res = sinkhorn(self.res_logits, self.iters)
        return pre, post, res


class FrozenMix(nn.Module):
    """A StaticMix's H_pre, H_post, H_res computed once and kept as buffers: what an inference
    deployment of a static-H model runs (no Sinkhorn per step). See :func:`freeze_static_mixing`."""

    pre: torch.Tensor  # buffers
    post: torch.Tensor
    res: torch.Tensor

    def __init__(self, mix: StaticMix) -> None:
        super().__init__()
        with torch.no_grad():
            pre, post, res = mix(torch.empty(0))
        self.register_buffer("pre", pre.detach().clone())
        self.register_buffer("post", post.detach().clone())
        self.register_buffer("res", res.detach().clone())

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.pre, self.post, self.res


def freeze_static_mixing(model: nn.Module) -> nn.Module:
    """Replace every StaticMix of ``model`` (in place) by its FrozenMix and return the model.

    A static-H model recomputes the same Sinkhorn projection at every forward; at inference that
    is wasted work (most of a compiled batch-1 decode step of mhc-0.5b), and a fair sequential
    baseline does not pay it. The result is for inference: its H no longer follows the logits."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, StaticMix)]
    if not targets:
        raise ValueError("freeze_static_mixing: the model has no StaticMix (is it a static-H mHC model?)")
    for name, mix in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, FrozenMix(mix))
    return model


class DynamicMix(nn.Module):
    """H_pre, H_post, H_res per token from RMSNorm(vec(h)) (DeepSeek mHC eqs. 7-9)."""

    def __init__(self, config: MHCConfig) -> None:
        super().__init__()
        n, d = config.n_streams, config.n_embd
        self.n = n
        self.iters = config.sinkhorn_iters
        self.phi = nn.Parameter(torch.zeros(n * d, 2 * n + n * n))
        self.alpha = nn.Parameter(torch.full((3,), 0.01))  # a_pre, a_post, a_res
        self.pre_bias = nn.Parameter(torch.zeros(n))
        self.post_bias = nn.Parameter(torch.zeros(n))
        self.res_bias = nn.Parameter(torch.zeros(n, n))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.n
        x = norm(h.flatten(-2))  # (B, T, n*D)
        proj = x @ self.phi  # (B, T, 2n + n^2)
        pre = torch.sigmoid(self.alpha[0] * proj[..., :n] + self.pre_bias)
        post = 2 * torch.sigmoid(self.alpha[1] * proj[..., n : 2 * n] + self.post_bias)
        res_logits = self.alpha[2] * proj[..., 2 * n :].unflatten(-1, (n, n)) + self.res_bias
        return pre, post, sinkhorn(res_logits, self.iters)


class HyperConnection(nn.Module):
    """One sublayer h <- H_res h + H_post^T f(H_pre h) around a branch f."""

    def __init__(self, config: MHCConfig) -> None:
        super().__init__()
        self.mix = DynamicMix(config) if config.dynamic else StaticMix(config)

    def forward(self, h: torch.Tensor, branch: nn.Module, *args: Any) -> Any:
        """h (B, T, n, D) -> the new streams. A branch that returns a tuple (the cached attention:
        (out, k, v)) has its first value written back and the rest handed on: (h, k, v)."""
        pre, post, res = self.mix(h)
        if pre.dim() == 1:  # static: one matrix for every token
            x = torch.einsum("j,btjd->btd", pre, h)
            skip = res @ h
        else:  # dynamic: per-token coefficients (B, T, ...)
            x = torch.einsum("btj,btjd->btd", pre, h)
            skip = torch.einsum("btij,btjd->btid", res, h)
        y = branch(norm(x), *args)  # (B, T, D), or (out, *extra) from a cached attention
        if isinstance(y, tuple):
            return (skip + post.unsqueeze(-1) * y[0].unsqueeze(-2), *y[1:])
        return skip + post.unsqueeze(-1) * y.unsqueeze(-2)


class MHCBlock(nn.Module):
    def __init__(self, config: MHCConfig) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)
        self.hc_attn = HyperConnection(config)
        self.hc_mlp = HyperConnection(config)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVInput | None = None
    ) -> Any:
        if kv is not None:  # cached step: also hand the new keys/values to the caller
            h, k, v = self.hc_attn(h, self.attn, cos, sin, kv)
            return self.hc_mlp(h, self.mlp), k, v
        h = self.hc_attn(h, self.attn, cos, sin)
        return self.hc_mlp(h, self.mlp)


class MHCGPT(NanochatGPT):
    """nanochat-style GPT whose residual stream is ``n_streams`` hyper-connected streams."""

    config: MHCConfig

    def __init__(self, config: MHCConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        self._set_trunk(
            nn.Embedding(config.vocab_size, config.n_embd), [MHCBlock(config) for _ in range(config.n_layer)]
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's random init for the branches, random mixing logits (see MHCConfig)."""
        super().init_weights()
        std = self.config.mix_logit_std
        n, d = self.config.n_streams, self.config.n_embd
        for block in self.transformer.h:
            assert isinstance(block, MHCBlock)  # (built so in __init__)
            for hc in (block.hc_attn, block.hc_mlp):
                mix = hc.mix
                if isinstance(mix, StaticMix):
                    for p in (mix.pre_logits, mix.post_logits, mix.res_logits):
                        torch.nn.init.normal_(p, std=std)
                elif isinstance(mix, DynamicMix):
                    torch.nn.init.normal_(mix.phi, std=(n * d) ** -0.5)
                    torch.nn.init.normal_(mix.pre_bias, std=std)
                    torch.nn.init.normal_(mix.post_bias, std=std)
                    torch.nn.init.normal_(mix.res_bias, std=std)
                    # a visible input dependence: |a x~ phi| ~ 0.5 next to logits of spread ~1
                    mix.alpha.fill_(0.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: LongTensor [B, T] -> softcapped logits [B, T, vocab_size] at every position."""
        cos, sin = self._rotary(idx.size(1))
        x = norm(self.transformer.wte(idx))
        h = x.unsqueeze(-2).expand(*x.shape[:-1], self.config.n_streams, x.shape[-1])  # (B, T, n, D)
        for block in self.transformer.h:
            h = block(h, cos, sin)
        return self._logits(h.sum(dim=-2))  # collapse the streams

    def forward_cached(
        self, idx: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One KV-cached step (prefill when T > 1, decode when T = 1), functional; the contract of
        NanochatGPT.forward_cached: idx [B, T] at positions pos .. pos+T-1, caches
        [L, B, H_kv, T_max, D] holding positions < pos; returns softcapped logits [B, T, vocab]
        and the new keys/values [L, B, H_kv, T, D], which the caller writes (models.kv)."""
        cos, sin, bias = self._step_inputs(idx, pos, k_cache)
        x = norm(self.transformer.wte(idx))
        h = x.unsqueeze(-2).expand(*x.shape[:-1], self.config.n_streams, x.shape[-1])  # (B, T, n, D)
        new_k, new_v = [], []
        for i, block in enumerate(self.transformer.h):
            h, k, v = block(h, cos, sin, (k_cache[i], v_cache[i], bias))
            new_k.append(k)
            new_v.append(v)
        return self._logits(h.sum(dim=-2)), torch.stack(new_k), torch.stack(new_v)  # collapse the streams


class _PreNorm(nn.Module):
    """A nanochat branch on the normalised branch input: f(norm(x), *args)."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        return self.branch(norm(x), *args)


class HCPackageGPT(NanochatGPT):
    """The nanochat-style GPT assembled from the ``hyper-connections`` package (lucidrains).

    Each block wraps attention and MLP in the package's ``HyperConnections`` (``manifold=False``)
    or ``ManifoldConstrainedHyperConnections`` (``manifold=True``) with a fixed ``layer_index``,
    so the model is deterministic. The package keeps the n streams folded into the batch axis,
    (B*n, T, D), and re-arranges them per sublayer: the compiler has to see through that layout.
    Its zero-initialised input-dependent parts are randomised here, so that H is really dynamic.
    """

    def __init__(
        self, config: NanochatConfig, n_streams: int = 4, manifold: bool = False, **hc_options: Any
    ) -> None:
        """``hc_options`` go to the package's ``get_init_and_expand_reduce_stream_functions``
        (e.g. ``num_fracs`` for frac-connections, ``sinkhorn_iters`` for the manifold variant)."""
        try:
            import hyper_connections as hc
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "HCPackageGPT needs the hyper-connections package: pip install hyper-connections"
            ) from exc
        nn.Module.__init__(self)
        self.config = config
        self.n_streams = n_streams
        self.manifold = manifold
        make = (
            hc.mc_get_init_and_expand_reduce_stream_functions
            if manifold
            else hc.get_init_and_expand_reduce_stream_functions
        )
        init_hc, self.expand_streams, self.reduce_streams = make(n_streams, dim=config.n_embd, **hc_options)
        blocks = [
            _HCBlock(
                init_hc(branch=_PreNorm(CausalSelfAttention(config)), layer_index=2 * i),
                init_hc(branch=_PreNorm(MLP(config)), layer_index=2 * i + 1),
            )
            for i in range(config.n_layer)
        ]
        self._set_trunk(nn.Embedding(config.vocab_size, config.n_embd), blocks)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        d = self.config.n_embd
        s = 3**0.5 * d**-0.5
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=d**-0.5)
        blocks: list[Any] = list(self.transformer.h)  # around the package's (untyped) modules
        for block in blocks:
            attn, mlp = block.attn.branch.branch, block.mlp.branch.branch
            for lin in (attn.c_q, attn.c_k, attn.c_v, mlp.c_fc):
                torch.nn.init.uniform_(lin.weight, -s, s)
            for proj in (attn.c_proj, mlp.c_proj):
                torch.nn.init.normal_(proj.weight, mean=0.0, std=0.4 * proj.in_features**-0.5)
            for hcm in (block.attn, block.mlp):
                for name, p in hcm.named_parameters(recurse=False):
                    if name.startswith("static"):
                        p.add_(0.3 * torch.randn_like(p))
                    elif name.endswith("_fn"):
                        torch.nn.init.normal_(p, std=d**-0.5)
                    elif name.endswith("scale"):
                        p.fill_(0.3)
                torch.nn.init.normal_(hcm.norm.gamma, std=0.1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        cos, sin = self._rotary(idx.size(1))
        h = self.expand_streams(norm(self.transformer.wte(idx)))  # (B*n, T, D)
        for block in self.transformer.h:
            h = block(h, cos, sin)
        return self._logits(self.reduce_streams(h))

    def forward_cached(
        self, idx: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One KV-cached step, the contract of NanochatGPT.forward_cached. The package's
        hyper-connection modules write back the first value of a branch that returns a tuple and
        hand the rest (the cached attention's new k, v) on."""
        cos, sin, bias = self._step_inputs(idx, pos, k_cache)
        h = self.expand_streams(norm(self.transformer.wte(idx)))  # (B*n, T, D)
        new_k, new_v = [], []
        for i, block in enumerate(self.transformer.h):
            h, k, v = block(h, cos, sin, (k_cache[i], v_cache[i], bias))
            new_k.append(k)
            new_v.append(v)
        return self._logits(self.reduce_streams(h)), torch.stack(new_k), torch.stack(new_v)


class _HCBlock(nn.Module):
    """Attention then MLP, each inside its hyper-connection module (which adds the residual)."""

    def __init__(self, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVInput | None = None
    ) -> Any:
        if kv is not None:  # cached step: the attention branch returns (out, k, v)
            h, k, v = self.attn(h, cos, sin, kv)
            return self.mlp(h), k, v
        return self.mlp(self.attn(h, cos, sin))
