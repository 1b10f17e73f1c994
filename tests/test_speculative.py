"""Lossless self-speculative decoding (issue 23): the transformed step drafts, the sequential step
verifies. Greedy tokens and the caches equal the sequential model's; the sampling rule keeps the
sequential model's distribution (an exact check, and seeded chi-square tests, each with a
false-alarm rate of 1e-3 were the seeds redrawn). float64 reference models on the CPU."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from helpers import reference_model

from snlp_compile import SNLPConfig, SNLPConfigError
from snlp_compile.decoding import Decoder, generate
from snlp_compile.models.kv import CachedStep
from snlp_compile.speculative import (
    acceptance_probability,
    adapt_block_size,
    greedy_rule,
    probabilities,
    residual_distribution,
    sampling_rule,
)

N_NEW = 100
ALPHA = 1e-3  # false-alarm rate of each chi-square test


def _prompt(batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1)).repeat(batch, 1)


def _sequential(model: torch.nn.Module, n: int = N_NEW) -> tuple[torch.Tensor, Decoder]:
    dec = Decoder(model, batch=1, max_len=8 + n)
    return generate(dec, _prompt(), n), dec


CASES = [  # (model, scaled, draft config, block size): γ in {1, 4}, K in {1, 2}, both inits
    (name, name.startswith("nanochat"), SNLPConfig(iterations=k, init=init), gamma)
    for name in ("gpt-tiny", "nanochat-tiny", "mhc-tiny")
    for k, init, gamma in ((1, "h0", 4), (1, "warm", 1), (2, "warm", 4), (2, "h0", 1))
] + [  # deferred K/V: the last draft's pending K/V must not overwrite the verifier's entry
    ("nanochat-tiny", True, SNLPConfig(iterations=1, init="warm", deferred_kv=True), 4),
    ("nanochat-tiny", True, SNLPConfig(iterations=2, deferred_kv=True), 1),
    ("mhc-tiny", False, SNLPConfig(iterations=1, init="warm", deferred_kv=True), 4),
]


@pytest.mark.parametrize(("name", "scaled", "draft", "gamma"), CASES)
def test_greedy_tokens_and_caches_equal_sequential(
    name: str, scaled: bool, draft: SNLPConfig, gamma: int
) -> None:
    model = reference_model(name, scaled=scaled, sinkhorn_iters=5)
    ref_tokens, ref = _sequential(model)
    dec = Decoder(model, batch=1, max_len=8 + N_NEW, speculative=draft, block_size=gamma)
    tokens, stats = generate(dec, _prompt(), N_NEW, return_stats=True)
    assert torch.equal(tokens, ref_tokens)
    if name != "gpt-tiny":  # (random gpt-tiny settles on one token under greedy decoding)
        assert len(set(tokens[0, 8:].tolist())) > 5
    # every slot the sequential model wrote, and nothing past them (the last token is not run)
    assert float((dec.k_cache - ref.k_cache).abs().max()) < 1e-12
    assert float((dec.v_cache - ref.v_cache).abs().max()) < 1e-12
    assert stats is not None and stats is dec.last_stats
    assert stats.emitted == N_NEW - 1 and stats.rounds >= (N_NEW - 1) / (gamma + 1)
    assert 0 <= stats.accepted <= stats.drafted <= gamma * stats.rounds
    assert 0.0 <= stats.acceptance_rate <= 1.0 and stats.draft_time_s > 0 and stats.verify_time_s > 0


class _WrongDraft(torch.nn.Module):
    """The sequential step with its logits rolled by one token: every draft is the exact argmax
    plus one, so greedy verification rejects every draft."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.step = CachedStep(model)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, k, v = self.step(*args)
        return logits.roll(1, dims=-1), k, v


def test_draft_always_wrong_and_draft_exact() -> None:
    model = reference_model("nanochat-tiny", scaled=True)
    ref_tokens, ref = _sequential(model, 60)
    wrong = Decoder(model, batch=1, max_len=68, speculative=_WrongDraft(model), block_size=4)
    tokens, stats = generate(wrong, _prompt(), 60, return_stats=True)
    assert torch.equal(tokens, ref_tokens)
    assert stats is not None and stats.accepted == 0 and stats.acceptance_rate == 0.0
    assert stats.tokens_per_verify == 1.0
    assert float((wrong.k_cache - ref.k_cache).abs().max()) < 1e-12
    exact = SNLPConfig(iterations=model.config.n_layer)  # K >= layers: the drafts are the tokens
    tokens, stats = generate(model, _prompt(), 60, speculative=exact, block_size=4, return_stats=True)
    assert torch.equal(tokens, ref_tokens)
    assert stats is not None and stats.acceptance_rate == 1.0 and stats.tokens_per_verify > 4.5


def _distributions(v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random p, q over v tokens, each with some zero entries (as top-k leaves them)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(v, generator=g, dtype=torch.float64) ** 3
    q = torch.rand(v, generator=g, dtype=torch.float64) ** 3
    p[torch.randperm(v, generator=g)[: v // 3]] = 0
    q[torch.randperm(v, generator=g)[: v // 3]] = 0
    return p / p.sum(), q / q.sum()


@pytest.mark.parametrize("seed", range(6))
def test_acceptance_rule_gives_p_exactly(seed: int) -> None:
    """P(token = y) = sum_x q(x) [a(x) [x = y] + (1 - a(x)) r(y)] = p(y), from the rule's own
    acceptance probability a and residual r, on small vocabularies (including p = q, disjoint
    supports and a point mass)."""
    v = 3 + seed
    p, q = _distributions(v, seed)
    cases = [(p, q), (p, p), (q, q)]
    if seed == 0:
        point = torch.zeros(v, dtype=torch.float64)
        point[1] = 1
        disjoint = torch.zeros(v, dtype=torch.float64)
        disjoint[0] = 1
        cases += [(point, q), (point, disjoint), (disjoint, point)]
    for pp, qq in cases:
        out = _rule_distribution(pp, qq)
        assert torch.allclose(out, pp, rtol=0, atol=1e-12), (pp, qq, out)


def _rule_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The exact distribution of the rule's token for one draft x ~ q (V,)."""
    v = p.shape[0]
    support = torch.nonzero(q > 0).flatten()
    a = acceptance_probability(p.expand(len(support), v), q.expand(len(support), v), support)
    r = residual_distribution(p, q)
    return (q[support] * a) @ torch.eye(v, dtype=p.dtype)[support] + (q[support] * (1 - a)).sum() * r


def test_top_p_is_the_nucleus_and_the_rule_keeps_it() -> None:
    """top_p keeps the smallest most likely set of probability >= top_p; with top-p (and top-k,
    temperature) applied to both sides, the rule's token is distributed as the verifier's
    filtered p exactly, though the draft's nucleus differs; a tiny top_p samples greedily."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    for top_p, kept in ((0.7, 2), (0.8, 2), (0.81, 3), (1.0, 4)):
        got = probabilities(probs.log(), 1.0, None, top_p).double()
        want = torch.where(torch.arange(4) < kept, probs, 0) / probs[:kept].sum()
        assert torch.allclose(got, want, atol=1e-6), (top_p, got)
    g = torch.Generator().manual_seed(5)
    for v in (3, 5, 8):
        lp, lq = torch.randn(v, generator=g) * 2, torch.randn(v, generator=g) * 2
        for top_k, top_p in ((None, 0.6), (4, 0.9), (None, 0.3)):
            p, q = (probabilities(x, 0.8, top_k, top_p).double() for x in (lp, lq))
            p, q = p / p.sum(), q / q.sum()  # (float32 sums, renormalised in float64)
            assert torch.allclose(_rule_distribution(p, q), p, rtol=0, atol=1e-12)
    model = reference_model("nanochat-tiny", scaled=True)
    draft = SNLPConfig(iterations=1, init="warm")
    sampled = generate(
        model, _prompt(), 30, greedy=False, top_p=1e-6, seed=0, speculative=draft, block_size=4
    )
    assert torch.equal(sampled, generate(model, _prompt(), 30))
    with pytest.raises(SNLPConfigError, match="top_p"):
        generate(model, _prompt(), 3, greedy=False, top_p=0.0)


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of counts against probs (cells of probability 0 must
    be empty)."""
    assert int(counts[probs == 0].sum()) == 0
    keep = probs > 0
    n = counts.sum()
    expected = n * probs[keep]
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_sampling_rule_statistics() -> None:
    """200000 draws of a γ = 2 block (p fixed per position, so the tokens are independent):
    the first token, and the second where the first draft was accepted, follow p."""
    v, rows = 6, 200_000
    p0, q0 = _distributions(v, 10)
    p1, q1 = _distributions(v, 11)
    p2, _ = _distributions(v, 12)
    gen = torch.Generator().manual_seed(0)
    p = torch.stack([p0, p1, p2]).expand(rows, 3, v)
    q = torch.stack([q0, q1]).expand(rows, 2, v)
    drafts = torch.multinomial(q.reshape(-1, v), 1, generator=gen).view(rows, 2)
    n, tokens = sampling_rule(p, q, drafts, gen)
    assert ((tokens[:, :2] == drafts) | (n[:, None] <= torch.arange(2))).all()
    first = torch.bincount(tokens[:, 0], minlength=v).double()
    assert _chi_square_p_value(first, p0) > ALPHA
    second = torch.bincount(tokens[n >= 1, 1], minlength=v).double()
    assert _chi_square_p_value(second, p1) > ALPHA
    third = torch.bincount(tokens[n >= 2, 2], minlength=v).double()
    assert _chi_square_p_value(third, p2) > ALPHA
    # greedy: accept while the argmax matches
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    n, tokens = greedy_rule(logits, torch.tensor([[1, 1]]))
    assert n.tolist() == [1] and tokens.tolist() == [[1, 0, 1]]


def test_speculative_sampling_keeps_the_models_distribution() -> None:
    """4000 sequences sampled speculatively (top_k = 3, temperature 0.7, a K = 1 draft that is
    often rejected): the second and third new tokens' marginals equal the sequential model's,
    computed exactly from its top-3 distributions."""
    model = reference_model("nanochat-tiny", scaled=True)
    rows, kw = 4000, {"greedy": False, "temperature": 0.7, "top_k": 3}
    prompt = _prompt(rows)
    dec = Decoder(model, batch=rows, max_len=12, speculative=SNLPConfig(iterations=1), block_size=2)
    tokens, stats = generate(dec, prompt, 4, seed=0, return_stats=True, **kw)
    assert stats is not None and stats.drafted > 0

    def dist(prefixes: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return probabilities(model(prefixes)[:, -1], kw["temperature"], kw["top_k"]).double()  # type: ignore[arg-type]

    base = _prompt()
    p1 = dist(base)[0]
    y1 = torch.nonzero(p1).flatten()
    p2 = dist(torch.cat([base.repeat(len(y1), 1), y1[:, None]], dim=1))  # (3, V)
    marginal2 = p1[y1] @ p2
    pairs = [(a, b) for i, a in enumerate(y1.tolist()) for b in torch.nonzero(p2[i]).flatten().tolist()]
    prefixes = torch.cat([base.repeat(len(pairs), 1), torch.tensor(pairs)], dim=1)
    weights = torch.tensor(
        [float(p1[a] * p2[y1.tolist().index(a), b]) for a, b in pairs], dtype=torch.float64
    )
    marginal3 = weights @ dist(prefixes)
    assert torch.isclose(marginal3.sum(), torch.tensor(1.0, dtype=torch.float64))
    for column, marginal in ((9, marginal2), (10, marginal3)):
        counts = torch.bincount(tokens[:, column], minlength=marginal.shape[0]).double()
        assert _chi_square_p_value(counts, marginal) > ALPHA


def test_speculative_arguments_are_checked() -> None:
    model = reference_model("gpt-tiny")
    cfg = SNLPConfig(iterations=1)
    bad: list[dict[str, Any]] = [
        {"speculative": cfg, "block_size": 0},
        {"block_size": 4},
        {"speculative": cfg, "prefill": "solve"},
        {"speculative": "fast"},
    ]
    for kw in bad:
        with pytest.raises(SNLPConfigError):
            Decoder(model, batch=1, max_len=16, **kw)
    with pytest.raises(SNLPConfigError, match="speculative= alone"):
        Decoder(model, SNLPConfig(iterations=2), batch=1, max_len=16, speculative=cfg)
    dec = Decoder(model, batch=1, max_len=16)
    with pytest.raises(SNLPConfigError, match="carries its own config"):
        generate(dec, _prompt(), 2, speculative=cfg)
    tokens, stats = generate(dec, _prompt(), 2, return_stats=True)
    assert stats is None and tokens.shape == (1, 10)


def test_batch_of_two_and_a_one_token_prompt() -> None:
    """A batch keeps the shortest accepted prefix of its rows per round; a one-token prompt is
    prefilled by the sequential step; top_k = 1 sampling through the rule is greedy."""
    model = reference_model("nanochat-tiny", scaled=True)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    draft = SNLPConfig(iterations=1, init="warm")
    for p in (prompt, prompt[:, :1]):
        ref = generate(model, p, 40)
        assert torch.equal(generate(model, p, 40, speculative=draft, block_size=4), ref)
    # the sampling path with top_k = 1 (p and q point masses) is greedy decoding
    sampled = generate(model, prompt, 40, greedy=False, top_k=1, seed=0, speculative=draft, block_size=4)
    assert torch.equal(sampled, generate(model, prompt, 40))


def test_graph_capture_needs_cuda() -> None:
    from snlp_compile.cuda_graph import capture

    with pytest.raises(SNLPConfigError, match="CUDA graphs need a CUDA device"):
        capture(lambda: torch.zeros(1), torch.device("cpu"))


def test_cuda_graphs_are_refused_off_cuda_and_without_speculative() -> None:
    model = reference_model("gpt-tiny")
    with pytest.raises(SNLPConfigError, match="cuda_graphs=True"):
        Decoder(model, batch=1, max_len=16, speculative=SNLPConfig(iterations=1), cuda_graphs=True)
    with pytest.raises(SNLPConfigError, match="cuda_graphs=True"):
        Decoder(model, batch=1, max_len=16, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("draft", [SNLPConfig(iterations=1, init="warm"), SNLPConfig(iterations=2)])
def test_gpu_cuda_graphs_keep_the_sequential_tokens(draft: SNLPConfig) -> None:
    """GPU: the captured draft and verify steps give the sequential model's tokens and caches
    (float64), the tail of one-token steps included, and a second generate() the same rounds (the
    warm start begins from h0 again, through the h0 graph)."""
    model = reference_model("nanochat-tiny", scaled=True).cuda()
    prompt = _prompt().cuda()
    ref = Decoder(model, batch=1, max_len=8 + 41)
    ref_tokens = generate(ref, prompt, 41)
    dec = Decoder(model, batch=1, max_len=8 + 41, speculative=draft, block_size=4, cuda_graphs=True)
    first = generate(dec, prompt, 41, return_stats=True)
    assert torch.equal(first[0], ref_tokens) and dec.graphed is not None
    assert float((dec.k_cache - ref.k_cache).abs().max()) < 1e-12
    again = generate(dec, prompt, 41, return_stats=True)
    assert torch.equal(again[0], ref_tokens)
    assert first[1] is not None and again[1] is not None
    assert (first[1].rounds, first[1].accepted) == (again[1].rounds, again[1].accepted)
    assert first[1].emitted == 40 and first[1].decode_time_s > 0
    eager = Decoder(model, batch=1, max_len=8 + 41, speculative=draft, block_size=4)
    stats = generate(eager, prompt, 41, return_stats=True)[1]
    assert stats is not None and abs(stats.accepted - first[1].accepted) <= 4  # (only the tail differs)


def test_adaptive_block_size() -> None:
    """Two more drafts after a fully accepted round, one fewer after a rejection (within 1 ..
    block_size); the tokens stay the sequential model's."""
    assert [adapt_block_size(g, d, a, 8) for g, d, a in ((4, 4, 4), (7, 7, 7), (4, 4, 2), (1, 1, 0))] == [
        6,
        8,
        3,
        1,
    ]
    model = reference_model("nanochat-tiny", scaled=True)
    ref_tokens, _ = _sequential(model, 60)
    wrong = Decoder(
        model, batch=1, max_len=68, speculative=_WrongDraft(model), block_size=8, adaptive_block_size=True
    )
    tokens, stats = generate(wrong, _prompt(), 60, return_stats=True)
    assert torch.equal(tokens, ref_tokens) and stats is not None
    assert stats.drafted <= stats.rounds + 28  # (8, 7, ..., 2, then 1 per round: 28 more than one each)
    exact = SNLPConfig(iterations=model.config.n_layer)
    dec = Decoder(model, batch=1, max_len=68, speculative=exact, block_size=8, adaptive_block_size=True)
    tokens, stats = generate(dec, _prompt(), 60, return_stats=True)
    assert torch.equal(tokens, ref_tokens) and stats is not None and stats.acceptance_rate == 1.0
    assert stats.rounds <= 8  # (blocks of 8 from the first round)
    with pytest.raises(SNLPConfigError, match="adaptive_block_size"):
        Decoder(model, batch=1, max_len=16, adaptive_block_size=True)


def test_cli_generate_speculative_prints_the_statistics(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from snlp_compile.cli import main

    out = tmp_path / "gen.json"
    argv = ["generate", "--model", "nanochat-tiny", "--dtype", "float64", "--max-new-tokens", "20"]
    assert main([*argv, "--speculative", "--block-size", "4", "--check", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "speculative: block 4:" in err and "acceptance" in err and "the same tokens as sequential" in err
    assert "draft K=1 h0," in err  # (the default init: trained models converge better from h0)
    result = json.loads(out.read_text())
    assert result["same_as_sequential"] and len(result["tokens"]) == 20
    assert result["stats"]["emitted"] == 19 and 0 <= result["stats"]["acceptance_rate"] <= 1
    assert main([*argv, "--speculative", "-K", "2"]) == 2  # (one line: -K is the approximate decode)
    staged = ["--speculative", "--draft-parallel", "2", "--draft-iterations", "2", "--verifier", "exact-seq"]
    assert main([*argv, *staged, "--check"]) == 0
    err = capsys.readouterr().err
    assert "P=2, exact-seq verifier" in err and "the same tokens as sequential" in err
    assert main([*argv, "--verifier", "exact-seq"]) == 2
    # speculative-only flags without --speculative: a usage error naming them, not silently ignored
    assert main([*argv, "--block-size", "8", "--adaptive"]) == 2
    assert "--block-size, --adaptive: for speculative decoding, add --speculative" in capsys.readouterr().err
    assert main([*argv, "--speculative", "--block-size", "0"]) == 2


@pytest.mark.parametrize(
    ("draft", "adaptive", "greedy"),
    [(SNLPConfig(iterations=1, init="warm"), False, True), (SNLPConfig(iterations=2), True, True),
     (SNLPConfig(iterations=1, init="warm"), True, True), (SNLPConfig(iterations=1, init="warm"), False, False)],
)  # fmt: skip
def test_graphed_rounds_run_eagerly(draft: SNLPConfig, adaptive: bool, greedy: bool) -> None:
    """The code the CUDA graphs capture (``GraphedSteps(capture=False)``: the greedy draft block,
    the shared warm-start trace with its h0 variant, the per-size verifiers and the one-token tail)
    gives the sequential tokens and caches, twice in a row, on the CPU."""
    from snlp_compile.speculative_graphs import GraphedSteps

    model = reference_model("nanochat-tiny", scaled=True)
    ref_tokens, ref = _sequential(model, 41)
    dec = Decoder(model, batch=1, max_len=49, speculative=draft, block_size=4, adaptive_block_size=adaptive)
    blocks = [1, 2, 3, 4] if adaptive else [4]
    dec.graphed = GraphedSteps(
        dec.draft_step, dec.verify_step, blocks, dec.k_cache, dec.v_cache, capture=False
    )
    dec.cuda_graphs = True
    plain = Decoder(model, batch=1, max_len=49, speculative=draft, block_size=4, adaptive_block_size=adaptive)
    sampling: dict[str, Any] = {} if greedy else {"greedy": False, "top_k": 1, "seed": 0}
    for _ in range(2):
        tokens, stats = generate(dec, _prompt(), 41, return_stats=True, **sampling)
        assert torch.equal(tokens, ref_tokens)
        assert float((dec.k_cache - ref.k_cache).abs().max()) < 1e-12
        assert stats is not None and stats.emitted == 40
    eager = generate(plain, _prompt(), 41, return_stats=True, **sampling)[1]
    assert eager is not None and abs(eager.accepted - stats.accepted) <= 4  # (only the tail differs)


@pytest.mark.parametrize(
    ("name", "adaptive"), [("nanochat-tiny", False), ("mhc-tiny", True)]
)  # fmt: skip
def test_exact_seq_verifier(name: str, adaptive: bool) -> None:
    """``verifier="exact-seq"``: the compiler's exact sequential lowering (one layer per stage)
    verifies, transformed once per block length used; tokens and caches stay the sequential
    model's."""
    from snlp_compile.solve.handle import SolveHandle

    model = reference_model(name, scaled=True, sinkhorn_iters=5)
    ref_tokens, ref = _sequential(model, 40)
    dec = Decoder(
        model, batch=1, max_len=48, speculative=SNLPConfig(iterations=1, init="warm"), block_size=4,
        adaptive_block_size=adaptive, verifier="exact-seq",
    )  # fmt: skip
    tokens, stats = generate(dec, _prompt(), 40, return_stats=True)
    assert torch.equal(tokens, ref_tokens)
    assert float((dec.k_cache - ref.k_cache).abs().max()) < 1e-12
    assert float((dec.v_cache - ref.v_cache).abs().max()) < 1e-12
    assert stats is not None and stats.emitted == 39 and stats.accepted > 0
    assert 5 in dec.verify_steps and set(dec.verify_steps) <= set(range(1, 6))
    for step in dec.verify_steps.values():  # (lazily, one per length used: K = 1, a layer a stage)
        handle = SolveHandle.of(step)
        assert handle is not None and handle.iterations == 1
        assert handle.solve.stage_sizes == [1] * model.config.n_layer
    assert dec.verify_step(5) is dec.verify_steps[5]
    with pytest.raises(SNLPConfigError, match="verifier"):
        Decoder(model, batch=1, max_len=48, verifier="exact-seq")
    with pytest.raises(SNLPConfigError, match="verifier"):
        Decoder(model, batch=1, max_len=48, speculative=SNLPConfig(), verifier="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("init", "graphed", "verifier"),
    [("warm", False, "sequential"), ("h0", False, "exact-seq"), ("warm", True, "exact-seq")],
)
def test_staged_drafts(init: str, graphed: bool, verifier: str) -> None:
    """Partial-parallel drafts, ``stages=(1, 1, 2)`` (two layers one after another, then two
    layer-parallel): lossless with init warm (its rewind after a rejection restores the whole
    trace, every stage's rows) and h0, eagerly and through the graphed code (capture=False)."""
    from snlp_compile.speculative_graphs import GraphedSteps

    model = reference_model("nanochat-tiny", scaled=True)
    ref_tokens, ref = _sequential(model, 41)
    draft = SNLPConfig(iterations=1, stages=(1, 1, 2), init=init)  # type: ignore[arg-type]
    dec = Decoder(model, batch=1, max_len=49, speculative=draft, block_size=4, verifier=verifier)  # type: ignore[arg-type]
    if graphed:
        dec.graphed = GraphedSteps(
            dec.draft_step, dec.verify_step, [4], dec.k_cache, dec.v_cache, capture=False
        )
        dec.cuda_graphs = True
    for _ in range(2 if graphed else 1):
        tokens, stats = generate(dec, _prompt(), 41, return_stats=True)
        assert torch.equal(tokens, ref_tokens)
        assert float((dec.k_cache - ref.k_cache).abs().max()) < 1e-12
        assert stats is not None and 0 < stats.accepted < stats.drafted  # (rejections: rewinds)
