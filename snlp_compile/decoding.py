"""Generation with a KV cache: prefill the prompt, then decode one token per step, sequentially or
through the layer-parallel solve.

    tokens = snlp_compile.generate(model, prompt, 64)                          # sequential
    tokens = snlp_compile.generate(model, prompt, 64, SNLPConfig(iterations=2))  # SNLP decode
    dec = snlp_compile.Decoder(model, SNLPConfig(iterations=2, init="warm"), batch=1, max_len=512)
    tokens = snlp_compile.generate(dec, prompt, 64)                            # transform once, reuse
    tokens = snlp_compile.generate(model, prompt, 64, speculative=SNLPConfig(iterations=1, init="warm"),
                                   block_size=4)                               # lossless: see speculative

The model must offer ``forward_cached(idx, pos, k_cache, v_cache) -> (logits, new_k, new_v)`` (the
reference models do; see models.kv), or be a `transformers` causal LM of a family that
models.hf_decode reproduces (Llama, Mistral, Qwen2, Gemma, Phi3, GPT-2, GPT-NeoX), which the
Decoder wraps in that adapter (its own modules, no weight copies; anything it cannot reproduce
exactly is refused when the Decoder is built). With a config, transform() rewrites that step: the per-layer
cache picks become one slice of the stacked cache, the new K/V of every layer come out of the solve
evaluated at the corrected layer inputs, and the caller (this module) writes them into the cache.
In exact mode (K >= layers) the tokens and caches equal the sequential model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal, overload

import torch
import torch.nn as nn

from .api import transform
from .config import SNLPConfig, resolve_config
from .distributed import layer_parallel_steps
from .errors import SNLPConfigError
from .models.hf_decode import as_cached_lm
from .models.kv import CachedStep, max_positions, new_cache, write_cache
from .solve.handle import SolveHandle
from .speculative import Sampling, SpeculativeStats, speculative_generate

PrefillKind = Literal["sequential", "solve"]
VerifierKind = Literal["sequential", "exact-seq"]
Step = Any  # callable (idx, pos, k_cache, v_cache) -> (logits, new_k, new_v)


class Decoder:
    """The prefill and decode steps of one model for a fixed batch size and cache length.

    ``model``: with ``forward_cached`` (models.kv), or a `transformers` causal LM, which is wrapped
    in ``models.hf_decode.HFCachedLM`` (refused there, by config field, when the adapter cannot
    reproduce it at ``max_len``); ``self.model`` is then the adapter.

    config None (and no overrides): both steps are the model's own sequential cached step.
    Otherwise the decode step (T = 1) is transformed once here; prefill is the sequential step
    ("sequential") or a second transform of the step for prompts longer than one token ("solve",
    built at the first prefill). ``decode_step`` instead takes a step the caller built, e.g.
    ``torch.compile(transform(CachedStep(model), ...))``, with the step's call signature
    (idx, pos, k_cache, v_cache) -> (logits, new_k, new_v). ``k_cache``/``v_cache`` hold the
    caches of the last generate().

    ``speculative``: lossless self-speculative decoding (``snlp_compile.speculative``): an
    SNLPConfig the decode step is transformed with to draft ``block_size`` tokens (default 4) per
    round, or a draft step the caller built (same call signature); the decode and prefill steps
    are then the sequential ones, which verify. ``last_stats`` holds the last speculative
    generate()'s ``SpeculativeStats``. ``cuda_graphs=True`` (CUDA, speculative only) replays the
    draft and verify steps from CUDA graphs (``snlp_compile.speculative_graphs``);
    ``adaptive_block_size=True`` changes the block size between rounds, up to ``block_size``
    (``speculative.adapt_block_size``). ``verifier``: what verifies a block of t = γ + 1 tokens,
    both exact: "sequential" the model's cached step as written; "exact-seq" the compiler's exact
    sequential lowering of the t-token step (K = 1, one layer per stage), faster on a GPU (the
    verification dominates a round), transformed lazily once per t (``verify_step``).

    ``process_group``: decode across the processes of a ``torch.distributed`` group, one contiguous
    block of the layers (weights and K/V caches) per rank (``snlp_compile.distributed``); every
    rank runs the same calls and gets the same logits. ``k_cache``/``v_cache`` are then the block's.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SNLPConfig | None = None,
        *,
        batch: int,
        max_len: int,
        prefill: PrefillKind = "sequential",
        decode_step: Step | None = None,
        speculative: SNLPConfig | Step | None = None,
        block_size: int | None = None,
        cuda_graphs: bool = False,
        adaptive_block_size: bool = False,
        verifier: VerifierKind = "sequential",
        process_group: Any = None,
        **overrides: Any,
    ):
        # a `transformers` causal LM gets the cached step of models.hf_decode (or a refusal)
        model = as_cached_lm(model, max_len if isinstance(max_len, int) else None)
        if prefill not in ("sequential", "solve"):
            raise SNLPConfigError(f"prefill must be 'sequential' or 'solve', got {prefill!r}")
        if not isinstance(batch, int) or batch < 1:
            raise SNLPConfigError(f"batch must be an int >= 1, got {batch!r}")
        if not isinstance(max_len, int) or not 2 <= max_len <= max_positions(model):
            raise SNLPConfigError(
                f"max_len must be an int in [2, {max_positions(model)}] (the model's positions), got {max_len!r}"
            )
        if speculative is not None and (config is not None or overrides or decode_step is not None):
            raise SNLPConfigError(
                "speculative decoding drafts with the transformed step and verifies with the "
                "sequential one: pass speculative= alone, not with a config, overrides or decode_step"
            )
        self.model = model  # left in its mode: the steps run in eval mode (evaluating()), issue 22
        self.batch, self.max_len = batch, max_len
        self.prefill_kind: PrefillKind = prefill
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.sequential: Step = CachedStep(model)
        self.config: SNLPConfig | None = None
        self.decode_step: Step = self.sequential
        self.prefill_step: Step | None = self.sequential
        self.draft_step: Step | None = None
        self.block_size: int | None = None
        self.last_stats: SpeculativeStats | None = None
        self.adaptive_block_size, self.cuda_graphs = bool(adaptive_block_size), bool(cuda_graphs)
        self.graphed: Any = None  # speculative_graphs.GraphedSteps, captured at the first generate()
        if verifier not in ("sequential", "exact-seq"):
            raise SNLPConfigError(f"verifier must be 'sequential' or 'exact-seq', got {verifier!r}")
        if verifier != "sequential" and speculative is None:
            raise SNLPConfigError("verifier= is what verifies speculative drafts: pass speculative= with it")
        self.verifier: VerifierKind = verifier
        self.verify_steps: dict[int, Step] = {}  # t -> the exact-seq step on t tokens (verify_step)
        if process_group is not None:  # one block of layers per rank (snlp_compile.distributed)
            self._distribute(config, overrides, prefill, process_group, decode_step, speculative, block_size)
            return
        if decode_step is not None:  # a step transformed (and compiled, captured...) by the caller
            if config is not None or overrides:
                raise SNLPConfigError(
                    "pass either decode_step or a config to transform the step with, not both"
                )
            self.decode_step = decode_step
        elif config is not None or overrides:
            self.config = resolve_config(config, overrides)
            with evaluating(model):  # (generation runs in eval mode: no training-mode warning)
                self.decode_step = transform(CachedStep(model).eval(), self.example_inputs(1), self.config)
            self.prefill_step = self.sequential if prefill == "sequential" else None
        if speculative is not None:
            self._set_draft(speculative, block_size, prefill)
        elif block_size is not None:
            raise SNLPConfigError("block_size is the speculative draft length: pass speculative= with it")
        if cuda_graphs and (speculative is None or self.device.type != "cuda"):
            raise SNLPConfigError("cuda_graphs=True is for speculative decoding on a CUDA device")
        if adaptive_block_size and speculative is None:
            raise SNLPConfigError("adaptive_block_size=True is for speculative decoding")
        self.k_cache, self.v_cache = new_cache(model, batch, max_len)

    def _distribute(
        self,
        config: SNLPConfig | None,
        overrides: dict[str, Any],
        prefill: PrefillKind,
        group: Any,
        decode_step: Step | None,
        speculative: SNLPConfig | Step | None,
        block_size: int | None,
    ) -> None:
        """The steps and caches of this rank's block of layers (``snlp_compile.distributed``)."""
        if decode_step is not None or speculative is not None or block_size is not None:
            raise SNLPConfigError(
                "process_group does not combine with decode_step, speculative or block_size"
            )
        if self.cuda_graphs or self.adaptive_block_size:
            raise SNLPConfigError("cuda_graphs and adaptive_block_size are for speculative decoding")
        cfg = resolve_config(config, overrides) if config is not None or overrides else None
        steps = layer_parallel_steps(
            self.model, cfg, batch=self.batch, max_len=self.max_len, prefill=prefill, group=group
        )
        self.config, self.decode_step, self.prefill_step = cfg, steps.decode_step, steps.prefill_step
        self.k_cache, self.v_cache = steps.k_cache, steps.v_cache

    def _set_draft(
        self, speculative: SNLPConfig | Step, block_size: int | None, prefill: PrefillKind
    ) -> None:
        """The draft step of speculative decoding (the decode step transformed with ``speculative``,
        or the caller's) and its block size."""
        if prefill != "sequential":
            raise SNLPConfigError(
                "speculative decoding needs prefill='sequential': the verifier reads the "
                "prompt's K/V, which must be the sequential model's"
            )
        block_size = 4 if block_size is None else block_size
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise SNLPConfigError(f"block_size must be an int >= 1, got {block_size!r}")
        if isinstance(speculative, SNLPConfig):
            with evaluating(self.model):
                self.draft_step = transform(
                    CachedStep(self.model).eval(), self.example_inputs(1), speculative
                )
        elif callable(speculative):
            self.draft_step = speculative
        else:
            raise SNLPConfigError(
                f"speculative must be an SNLPConfig or a draft step, got {type(speculative).__name__}"
            )
        self.block_size = block_size

    def example_inputs(self, t: int) -> tuple[torch.Tensor, ...]:
        """Inputs of this decoder's cached step for ``t`` new tokens, (idx, pos, k_cache, v_cache)
        with fresh caches: what its steps are transformed with, and what a caller transforms (or
        compiles) a step of its own with for ``decode_step=``."""
        idx = torch.zeros(self.batch, t, dtype=torch.long, device=self.device)
        pos = torch.zeros((), dtype=torch.long, device=self.device)
        return (idx, pos, *new_cache(self.model, self.batch, self.max_len))

    def verify_step(self, t: int) -> Step:
        """The exact step that verifies ``t`` tokens (the last token and its t - 1 drafts): the
        sequential step, or (verifier "exact-seq") the exact sequential lowering of the t-token
        step (K = 1, one layer per stage: exact), transformed at the first call for each t. A
        caller may put its own steps into ``verify_steps`` first, e.g. compiled ones."""
        if self.verifier == "sequential":
            return self.sequential
        if t not in self.verify_steps:
            exact = SNLPConfig(iterations=1, stages=int(self.k_cache.shape[0]))  # (a cache row per layer)
            with evaluating(self.model):
                self.verify_steps[t] = transform(CachedStep(self.model).eval(), self.example_inputs(t), exact)
        return self.verify_steps[t]

    def reset(self) -> None:
        """Clear the caches and the warm-start trace: a new sequence begins."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        for step in (self.decode_step, self.prefill_step, self.draft_step):
            handle = SolveHandle.of(step)
            if handle is not None:
                handle.reset()

    def flush(self) -> None:
        """Complete the caches after the last decode step. With ``deferred_kv`` each step writes
        the previous token's corrected K/V, so the last token's are still provisional: one more
        call of the step at that token's position writes them (its own outputs are dropped).
        A no-op otherwise."""
        handle = SolveHandle.of(self.decode_step)
        position = None if handle is None else handle.pending_position
        if handle is None or position is None:
            return
        token = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.decode_step(token, position, self.k_cache, self.v_cache)
        handle.forget_pending()

    def prefill(self, prompt: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Run the prompt at ``pos``, write its K/V, return the logits of its last position."""
        t = prompt.shape[1]
        if t == 1:
            step = self.decode_step
        else:
            if self.prefill_kind == "sequential" and self.config is not None and self.config.fused_layers > 1:
                raise SNLPConfigError(
                    f"fused_layers={self.config.fused_layers} changes the model's function: a sequential "
                    "prefill would fill the cache with the unfused layers' K/V; build the Decoder with "
                    "prefill='solve' (or feed the prompt token by token)"
                )
            self.flush()  # (a pending deferred token's K/V first: the prompt's attention reads them)
            if self.prefill_step is None:  # "solve": one transform for prompts of any length >= 2
                # (deferral is for one-token steps: the prompt's K/V are written by this call)
                cfg = None if self.config is None else self.config.replace(deferred_kv=False)
                with evaluating(self.model):
                    self.prefill_step = transform(CachedStep(self.model).eval(), self.example_inputs(t), cfg)
            step = self.prefill_step
        with evaluating(self.model) if self.model.training else nullcontext():
            logits, new_k, new_v = step(prompt, pos, self.k_cache, self.v_cache)
        if step is self.decode_step:
            self._write_decoded(new_k, new_v, pos)
        else:
            write_cache(self.k_cache, self.v_cache, new_k, new_v, pos)
        return logits[:, -1]

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step for tokens (B,) at ``pos``: writes their K/V, returns logits (B, vocab)."""
        with evaluating(self.model) if self.model.training else nullcontext():
            logits, new_k, new_v = self.decode_step(token[:, None], pos, self.k_cache, self.v_cache)
        self._write_decoded(new_k, new_v, pos)
        return logits[:, -1]

    def _write_decoded(self, new_k: torch.Tensor, new_v: torch.Tensor, pos: torch.Tensor) -> None:
        """Write a one-token step's K/V, unless they are deferred: a deferred step returns
        provisional K/V, and the next step (or ``flush``) writes the corrected ones into that slot
        before anything reads it, so writing these would be two copies per step for nothing."""
        handle = SolveHandle.of(self.decode_step)  # (also through torch.compile's wrapper)
        if handle is None or not handle.deferred:
            write_cache(self.k_cache, self.v_cache, new_k, new_v, pos)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block, every module's own mode restored afterwards: generation
    does not change the caller's model (a model passed in ``.train()`` comes back in it)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@overload
def generate(
    model: nn.Module | Decoder,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    config: SNLPConfig | None = None,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    prefill: PrefillKind = "sequential",
    max_len: int | None = None,
    speculative: SNLPConfig | Step | None = None,
    block_size: int | None = None,
    verifier: VerifierKind = "sequential",
    return_stats: Literal[False] = False,
    **overrides: Any,
) -> torch.Tensor: ...


@overload
def generate(
    model: nn.Module | Decoder,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    config: SNLPConfig | None = None,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    prefill: PrefillKind = "sequential",
    max_len: int | None = None,
    speculative: SNLPConfig | Step | None = None,
    block_size: int | None = None,
    verifier: VerifierKind = "sequential",
    return_stats: Literal[True],
    **overrides: Any,
) -> tuple[torch.Tensor, SpeculativeStats | None]: ...


@torch.no_grad()
def generate(
    model: nn.Module | Decoder,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    config: SNLPConfig | None = None,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    prefill: PrefillKind = "sequential",
    max_len: int | None = None,
    speculative: SNLPConfig | Step | None = None,
    block_size: int | None = None,
    verifier: VerifierKind = "sequential",
    return_stats: bool = False,
    **overrides: Any,
) -> torch.Tensor | tuple[torch.Tensor, SpeculativeStats | None]:
    """Prompt (B, P) -> tokens (B, P + max_new_tokens): prefill, then one decode step per token.

    ``model``: a model with forward_cached or a supported `transformers` causal LM (wrapped in
    models.hf_decode's adapter; sequential when config is None, else its decode step is
    transformed with ``config``), or a Decoder built beforehand (config, prefill, max_len,
    speculative and block_size are then the Decoder's). greedy=False samples from
    softmax(logits / temperature), restricted to the top_k tokens when given, then to the
    smallest most likely set of probability >= top_p (nucleus) when given, with a private
    generator seeded by ``seed``.

    ``speculative``: lossless self-speculative decoding (``snlp_compile.speculative``): the step
    transformed with this SNLPConfig drafts ``block_size`` tokens (default 4), the sequential step
    verifies them in one forward; greedy tokens equal the sequential model's, sampled ones follow
    its distribution; ``verifier="exact-seq"`` verifies through the compiler's exact sequential
    lowering instead (``Decoder``). ``return_stats=True`` returns (tokens, stats): the ``SpeculativeStats``
    (acceptance rate, tokens per verification, draft and verify time), None without speculative.
    """
    if prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long or prompt_ids.shape[1] < 1:
        raise SNLPConfigError(
            f"prompt_ids must be a LongTensor (batch, length >= 1), got {prompt_ids.dtype} {tuple(prompt_ids.shape)}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SNLPConfigError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not greedy and not temperature > 0:
        raise SNLPConfigError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise SNLPConfigError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, float | int) or not 0 < top_p <= 1
    ):
        raise SNLPConfigError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    b, p = prompt_ids.shape
    total = p + max_new_tokens
    if isinstance(model, Decoder):
        if (
            config is not None
            or overrides
            or speculative is not None
            or block_size is not None
            or verifier != "sequential"
        ):
            raise SNLPConfigError("a Decoder carries its own config: pass config when building it")
        decoder = model
    else:
        decoder = Decoder(
            model,
            config,
            batch=b,
            max_len=max_len or total,
            prefill=prefill,
            speculative=speculative,
            block_size=block_size,
            verifier=verifier,
            **overrides,
        )
    if decoder.batch != b:
        raise SNLPConfigError(f"the Decoder was built for batch {decoder.batch}, the prompt has batch {b}")
    if total > decoder.max_len:
        raise SNLPConfigError(
            f"prompt ({p}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the cache length {decoder.max_len}"
        )
    prompt_ids = prompt_ids.to(decoder.device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=decoder.device)
        gen.manual_seed(seed)
    sampling = Sampling(greedy, temperature, top_k, top_p, gen)
    decoder.reset()
    decoder.last_stats = None if decoder.draft_step is None else SpeculativeStats(decoder.block_size or 1)
    if max_new_tokens == 0:
        tokens = prompt_ids.clone()
    else:
        with evaluating(decoder.model):
            if decoder.draft_step is not None:
                tokens = speculative_generate(decoder, prompt_ids, max_new_tokens, sampling)
            else:
                tokens = _generate(decoder, prompt_ids, max_new_tokens, sampling)
    return (tokens, decoder.last_stats) if return_stats else tokens


def _generate(
    decoder: Decoder,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
) -> torch.Tensor:
    p = prompt_ids.shape[1]
    pos = torch.zeros((), dtype=torch.long, device=decoder.device)
    token = sampling.pick(decoder.prefill(prompt_ids, pos))[0]
    pos += p
    out = [token]
    for _ in range(max_new_tokens - 1):
        token = sampling.pick(decoder.step(token, pos))[0]
        pos += 1
        out.append(token)
    decoder.flush()  # (deferred K/V: the last token's, so the caches are complete)
    return torch.cat([prompt_ids, torch.stack(out, dim=1)], dim=1)
