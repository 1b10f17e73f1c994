"""Lossless self-speculative decoding (issue 23): the transformed decode step drafts a block of
tokens, an exact step verifies the block in one forward (the model's own sequential cached step,
or with ``Decoder(verifier="exact-seq")`` the compiler's exact sequential lowering of the block's
step), and the tokens are the sequential model's (greedy: the same tokens; sampling: the same
distribution).

    tokens = snlp_compile.generate(model, prompt, 200, speculative=SNLPConfig(iterations=1, init="warm"),
                                   block_size=4)
    dec = snlp_compile.Decoder(model, speculative=SNLPConfig(iterations=2), block_size=4, batch=1, max_len=512)
    tokens, stats = snlp_compile.generate(dec, prompt, 200, return_stats=True)

One round at position ``pos``, the last emitted token ``t0`` not yet in the caches:

1. draft: γ calls of the draft step (one token each, KV cached) from ``t0`` give d_1 .. d_γ; their
   K/V go into the caches at pos .. pos+γ-1 (with ``deferred_kv`` the step writes the previous
   token's corrected K/V itself, as in plain decoding);
2. verify: one call of the exact step (``Decoder.verify_step``) on [t0, d_1 .. d_γ] at pos
   writes the exact K/V of positions pos .. pos+γ, overwriting every drafted entry, and gives the
   exact next-token distributions p_0 .. p_γ;
3. accept the longest prefix d_1 .. d_n the rule accepts and one token from the verifier (the
   correction at the first rejection, else the bonus token from p_γ). The caches then hold exact
   K/V at every position < the new pos; the slots past it are masked (``attention_bias``) and
   rewritten by the next round before anything reads them.

Deferred K/V (the trap): the last draft step of a round leaves its K/V pending, and the next draft
step would write them over the verifier's exact entry. The pending K/V are dropped after each
verification (``SolveHandle.forget_pending``): the first draft step of a round writes nothing, and
within a round the deferred writes land only on drafted slots the verifier overwrites.

Warm init: after a rejection the draft's warm start is rewound to its own trace at the last
accepted position (recorded after each draft step; the next draft step is the one after it). After
a fully accepted block the trace is the last draft step's, one position behind (the verifier does
not return per-layer traces). The warm start only changes the drafts, never the tokens.

Batches: a round keeps the shortest accepted prefix over the rows. Each row's token at that index
is still drawn by the rule (its accepted draft or its correction), so every row's tokens keep the
sequential model's distribution.

The sampling rule (Leviathan et al. 2023; Chen et al. 2023): q the draft's distribution, p the
verifier's, both after the same temperature, top-k and top-p. Draft d ~ q is accepted with probability
min(1, p(d)/q(d)); at the first rejection the token is drawn from max(0, p - q) normalised; after
all γ are accepted the bonus token is drawn from p_γ. Each emitted token is distributed as p given
the tokens before it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from .models.kv import write_cache
from .solve.handle import SolveHandle


class SpeculativeDecoder(Protocol):
    """What the speculative loop needs of a ``decoding.Decoder`` (a protocol, so that this module
    does not import the one that calls it)."""

    block_size: int | None  # (set whenever speculative decoding is on)
    draft_step: Any
    device: torch.device
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    last_stats: Any
    cuda_graphs: bool
    graphed: Any  # a speculative_graphs.GraphedSteps once captured, else None
    adaptive_block_size: bool

    def prefill(self, prompt: torch.Tensor, pos: torch.Tensor) -> torch.Tensor: ...

    def verify_step(self, t: int) -> Any: ...


@dataclass
class SpeculativeStats:
    """Counters of one speculative generate() (``Decoder.last_stats``).

    rounds: verifications (one cached forward of the exact step each); drafted: draft tokens
    proposed; accepted: of those, accepted (with a batch, the shortest accepted prefix over the
    rows per round); emitted: tokens produced by the rounds (accepted + one each; the prefill's
    token is not counted); draft_time_s / verify_time_s: wall time of the draft steps and of the
    verifications (with the acceptance rule), CUDA events on a GPU (read once at the end, so the
    rounds run without further synchronisation); decode_time_s: the rounds from the end of the
    prefill to the last token. With CUDA graphs, the tokens left once a full block no longer fits
    are decoded one by one by the verifier, each counted as a round without drafts."""

    block_size: int | None  # (set whenever speculative decoding is on)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    decode_time_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (nan before any draft)."""
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def tokens_per_verify(self) -> float:
        """Mean tokens produced per verification (nan before any)."""
        return self.emitted / self.rounds if self.rounds else math.nan

    @property
    def tokens_per_s(self) -> float:
        """Tokens produced by the rounds per second of decode time (nan before any)."""
        return self.emitted / self.decode_time_s if self.decode_time_s > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["acceptance_rate"] = self.acceptance_rate
        out["tokens_per_verify"] = self.tokens_per_verify
        out["tokens_per_s"] = self.tokens_per_s
        return out

    def summary(self) -> str:
        """One line: acceptance, tokens per verification, times."""
        return (
            f"block {self.block_size}: {self.rounds} rounds, acceptance {self.acceptance_rate:.3f}, "
            f"{self.tokens_per_verify:.2f} tokens/verification, draft {1e3 * self.draft_time_s:.1f} ms, "
            f"verify {1e3 * self.verify_time_s:.1f} ms, {self.tokens_per_s:.1f} tokens/s"
        )


def probabilities(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None = None
) -> torch.Tensor:
    """softmax(logits / temperature) over the top_k tokens, then over the smallest set of most
    likely tokens whose probability reaches top_p (nucleus), renormalised (float32): the
    distribution sampling draws from, the same on the draft's and the verifier's side."""
    scores = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """min(1, p(d) / q(d)) for drafts d (...,) of distributions p, q (..., V); d has q(d) > 0."""
    pd = p.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    qd = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    return torch.clamp(pd / qd, max=1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(0, p - q) normalised (..., V); where it vanishes (p <= q everywhere, so p = q and a
    rejection has probability 0, reached only through rounding) p itself."""
    r = torch.clamp(p - q, min=0.0)
    total = r.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


@dataclass(frozen=True)
class Sampling:
    """How generate() picks tokens, one object for the plain and the speculative loop: greedy
    (argmax) or a draw from :func:`probabilities` with ``generator``."""

    greedy: bool
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return probabilities(logits, self.temperature, self.top_k, self.top_p)

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The token of each row of ``logits`` (..., V), and the distribution drawn from (None
        when greedy)."""
        if self.greedy:
            return logits.argmax(dim=-1), None
        probs = self.probabilities(logits)
        return _sample(probs, self.generator), probs


def _sample(probs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One draw per row of probs (..., V) -> (...)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])


def sampling_rule(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule for a block: p (B, γ+1, V) the verifier's distributions,
    q (B, γ, V) the draft's, drafts (B, γ) drawn from q. Returns (n, tokens): n (B,) the length
    of each row's accepted prefix, tokens (B, γ+1) the rule's token at each index (the draft where
    accepted, else a draw from the residual; at index γ a draw from p_γ). A row emits
    drafts[:, :n] and tokens[:, n]."""
    g = drafts.shape[1]
    bonus = _sample(p[:, g], gen).unsqueeze(1)
    if g == 0:
        return torch.zeros(p.shape[0], dtype=torch.long, device=p.device), bonus
    accept_p = acceptance_probability(p[:, :g], q, drafts)
    u = torch.rand(accept_p.shape, generator=gen, device=p.device, dtype=accept_p.dtype)
    accept = u < accept_p
    fallback = _sample(residual_distribution(p[:, :g], q), gen)
    tokens = torch.cat([torch.where(accept, drafts, fallback), bonus], dim=1)
    return accept.long().cumprod(dim=1).sum(dim=1), tokens


def greedy_rule(verifier_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: accept while the verifier's argmax equals the draft. Returns
    (n, tokens) as ``sampling_rule`` (tokens are the verifier's argmax at every index)."""
    tokens = verifier_logits.argmax(dim=-1)
    accept = tokens[:, : drafts.shape[1]] == drafts
    return accept.long().cumprod(dim=1).sum(dim=1), tokens


def adapt_block_size(gamma: int, drafted: int, accepted: int, most: int) -> int:
    """The next round's block size (``Decoder(adaptive_block_size=True)``): two more after a
    round whose drafts were all accepted, one fewer after a rejection, within 1 .. ``most`` (the
    rule of transformers' assisted generation: a block longer than the drafts' run of
    acceptances costs draft steps whose tokens are thrown away)."""
    return min(gamma + 2, most) if accepted == drafted else max(gamma - 1, 1)


Mark = float | torch.cuda.Event


def _mark(device: torch.device) -> Mark:
    """A point in time: a recorded CUDA event on a GPU (no synchronisation), else perf_counter."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _seconds(start: Mark, end: Mark) -> float:
    """Seconds between two marks (CUDA events: after a synchronisation)."""
    if isinstance(start, torch.cuda.Event) and isinstance(end, torch.cuda.Event):
        return start.elapsed_time(end) / 1e3
    assert isinstance(start, float) and isinstance(end, float)
    return end - start


def speculative_generate(
    decoder: SpeculativeDecoder,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
) -> torch.Tensor:
    """The rounds (module docstring) after a sequential prefill; sets ``decoder.last_stats``."""
    assert decoder.draft_step is not None and decoder.block_size is not None
    draft, single = decoder.draft_step, None
    if decoder.cuda_graphs:
        if decoder.graphed is None:  # (captured on the caches, which it clears: before the prefill)
            from .speculative_graphs import GraphedSteps

            most = decoder.block_size
            blocks = list(range(1, most + 1)) if decoder.adaptive_block_size else [most]
            decoder.graphed = GraphedSteps(
                draft, decoder.verify_step, blocks, decoder.k_cache, decoder.v_cache
            )
        draft, single = decoder.graphed.draft, decoder.graphed.single
    handle = SolveHandle.of(draft)
    deferred = handle is not None and handle.deferred
    warm = handle is not None and handle.init == "warm"
    k_cache, v_cache, device = decoder.k_cache, decoder.v_cache, decoder.device
    stats = SpeculativeStats(block_size=decoder.block_size)
    decoder.last_stats = stats

    pick, greedy = sampling.pick, sampling.greedy

    def write(step: Any, new_k: torch.Tensor, new_v: torch.Tensor, pos: torch.Tensor) -> None:
        if not getattr(step, "writes_cache", False):  # (a graph replay wrote them)
            write_cache(k_cache, v_cache, new_k, new_v, pos)

    b, p = prompt_ids.shape
    token = pick(decoder.prefill(prompt_ids, torch.zeros((), dtype=torch.long, device=device)))[0]
    out = [prompt_ids, token[:, None]]
    produced = 1
    marks: list[tuple[Mark, Mark, Mark]] = []
    gamma = decoder.block_size  # (adaptive: changes after every round)
    begin = _mark(device)
    while produced < max_new_tokens:
        g = min(gamma, max_new_tokens - produced - 1)  # (never writes past the end)
        start = p + produced - 1  # the position of ``token``, not yet in the caches
        t0 = _mark(device)
        if single is not None and g not in decoder.graphed.verify:  # (graphs: no such block)
            pos = torch.full((), start, dtype=torch.long, device=device)
            token = pick(single(token[:, None], pos, k_cache, v_cache)[0][:, -1])[0]
            out.append(token[:, None])
            produced += 1
            stats.rounds += 1
            stats.emitted += 1
            marks.append((t0, t0, _mark(device)))
            continue
        qs: list[torch.Tensor] = []
        traces: Any = []  # traces[i]: the draft's warm-start trace after its step i
        pos = torch.full((), start, dtype=torch.long, device=device)
        if single is not None and greedy:  # (graphs: the whole block in one replay)
            drafted, traces = decoder.graphed.blocks[g](token, pos)
            block = torch.cat([token[:, None], drafted], dim=1)  # (B, g + 1)
        else:
            drafts: list[torch.Tensor] = []
            current = token
            for i in range(g):
                at = pos + i
                logits, new_k, new_v = draft(current[:, None], at, k_cache, v_cache)
                if not deferred:  # (deferred: the next draft step writes the corrected ones)
                    write(draft, new_k, new_v, at)
                if warm:
                    assert handle is not None
                    traces.append(handle.trace)
                current, q = pick(logits[:, -1])
                drafts.append(current)
                if q is not None:
                    qs.append(q)
            block = torch.stack([token, *drafts], dim=1)  # (B, g + 1)
        t1 = _mark(device)
        step = decoder.verify_step(g + 1) if single is None else decoder.graphed.verify[g]
        logits, new_k, new_v = step(block, pos, k_cache, v_cache)
        write(step, new_k, new_v, pos)  # exact K/V at start .. start + g
        if deferred:
            assert handle is not None
            handle.forget_pending()  # the last draft's K/V must not overwrite the exact entry
        drafted = block[:, 1:]
        if greedy:
            accepted, tokens = greedy_rule(logits, drafted)
        else:
            q_block = torch.stack(qs, dim=1) if qs else logits.new_zeros(b, 0, logits.shape[-1]).float()
            accepted, tokens = sampling_rule(
                sampling.probabilities(logits), q_block, drafted, sampling.generator
            )
        n = int(accepted.min())  # the round's one host synchronisation
        if warm and n < g:
            assert handle is not None
            handle.restore_trace(traces[n])  # the draft's trace at the last accepted position
        token = tokens[:, n]
        out += [drafted[:, :n], token[:, None]]
        produced += n + 1
        stats.rounds += 1
        stats.drafted += g
        stats.accepted += n
        stats.emitted += n + 1
        marks.append((t0, t1, _mark(device)))
        if decoder.adaptive_block_size:
            gamma = adapt_block_size(gamma, g, n, decoder.block_size)
    end = _mark(device)
    if handle is not None:
        handle.forget_pending()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.draft_time_s = sum(_seconds(t0, t1) for t0, t1, _ in marks)
    stats.verify_time_s = sum(_seconds(t1, t2) for _, t1, t2 in marks)
    stats.decode_time_s = _seconds(begin, end)
    return torch.cat(out, dim=1)
