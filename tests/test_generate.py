"""generate(): prefill then decode, sequential or through the layer-parallel solve. In exact mode
(K = layers) the greedy tokens and the KV caches equal the sequential model's."""

from __future__ import annotations

import pytest
import torch

import snlp_compile
from snlp_compile import SNLPConfig, SNLPConfigError
from snlp_compile.decoding import Decoder, generate
from snlp_compile.models import build_model
from snlp_compile.models.kv import CachedStep

N_NEW = 200


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("nanochat-tiny", dtype=torch.float64, sequence_len=256)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def sequential(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, Decoder]:
    dec = Decoder(model, batch=1, max_len=8 + N_NEW)
    return generate(dec, prompt, N_NEW), dec


@pytest.fixture(scope="module")
def exact(model: torch.nn.Module) -> Decoder:
    """The decode step transformed once, in exact mode (K = layers)."""
    return Decoder(model, SNLPConfig(iterations=model.config.n_layer), batch=1, max_len=8 + N_NEW)


def test_exact_mode_greedy_tokens_and_caches_equal_sequential(
    exact: Decoder, prompt: torch.Tensor, sequential: tuple[torch.Tensor, Decoder]
) -> None:
    ref_tokens, ref_dec = sequential
    dec = exact
    tokens = generate(dec, prompt, N_NEW)
    assert tokens.shape == (1, 8 + N_NEW)
    assert torch.equal(tokens[:, :8], prompt)
    assert torch.equal(tokens, ref_tokens)
    assert len(set(tokens[0, 8:].tolist())) > 5  # a real sequence, not one token repeated
    # the last token is returned, not run, so its slot stays empty in both caches
    filled = 8 + N_NEW - 1
    assert float((dec.k_cache[:, :, :, :filled] - ref_dec.k_cache[:, :, :, :filled]).abs().max()) < 1e-10
    assert float((dec.v_cache - ref_dec.v_cache).abs().max()) < 1e-10
    assert ref_dec.k_cache[:, :, :, :filled].abs().amin(dim=-1).gt(0).float().mean() > 0.5


def test_exact_mode_with_warm_init_and_solved_prefill(
    model: torch.nn.Module, prompt: torch.Tensor, sequential: tuple[torch.Tensor, Decoder]
) -> None:
    config = SNLPConfig(iterations=model.config.n_layer, init="warm")
    tokens = generate(model, prompt, N_NEW, config, prefill="solve")
    assert torch.equal(tokens, sequential[0])


def test_decoder_takes_a_step_transformed_by_the_caller(
    model: torch.nn.Module, prompt: torch.Tensor, sequential: tuple[torch.Tensor, Decoder]
) -> None:
    example = Decoder(model, batch=1, max_len=8 + N_NEW).example_inputs(1)
    step = snlp_compile.transform(CachedStep(model), example, iterations=model.config.n_layer)
    dec = Decoder(model, batch=1, max_len=8 + N_NEW, decode_step=step)
    assert dec.decode_step is step
    assert torch.equal(generate(dec, prompt, 50), sequential[0][:, : 8 + 50])
    with pytest.raises(SNLPConfigError, match="not both"):
        Decoder(model, SNLPConfig(iterations=2), batch=1, max_len=16, decode_step=step)


def test_decoder_flushes_a_compiled_deferred_step(
    model: torch.nn.Module, prompt: torch.Tensor, sequential: tuple[torch.Tensor, Decoder]
) -> None:
    """A deferred step the caller compiled: the Decoder finds its solve through torch.compile's
    wrapper, so it skips the provisional writes and flushes the last token's K/V."""
    example = Decoder(model, batch=1, max_len=8 + N_NEW).example_inputs(1)
    step = snlp_compile.transform(
        CachedStep(model), example, iterations=model.config.n_layer, deferred_kv=True
    )
    dec = Decoder(model, batch=1, max_len=8 + N_NEW, decode_step=torch.compile(step, backend="eager"))
    assert torch.equal(generate(dec, prompt, N_NEW), sequential[0])
    ref = sequential[1]
    assert torch.allclose(dec.k_cache, ref.k_cache, rtol=0, atol=1e-10)
    assert torch.allclose(dec.v_cache, ref.v_cache, rtol=0, atol=1e-10)


def test_inexact_solve_still_decodes(model: torch.nn.Module, prompt: torch.Tensor) -> None:
    """K=1 with warm init on an untrained model: runs and returns valid tokens (no equality claim)."""
    tokens = generate(model, prompt, 12, SNLPConfig(iterations=1, init="warm"))
    assert tokens.shape == (1, 20) and tokens.min() >= 0 and tokens.max() < model.config.vocab_size


def test_gpt_exact_mode_batch_of_two() -> None:
    gpt = build_model("gpt-tiny", dtype=torch.float64)
    prompt = torch.randint(0, 256, (2, 5))
    ref = generate(gpt, prompt, 40)
    assert torch.equal(generate(gpt, prompt, 40, iterations=gpt.config.n_layer), ref)


def test_sampling_is_seeded_and_respects_top_k(
    model: torch.nn.Module, prompt: torch.Tensor, exact: Decoder
) -> None:
    kw = {"greedy": False, "temperature": 0.8, "top_k": 5}
    a = generate(model, prompt, 30, seed=3, **kw)
    assert torch.equal(a, generate(model, prompt, 30, seed=3, **kw))
    assert not torch.equal(a, generate(model, prompt, 30, seed=4, **kw))
    assert torch.equal(a, generate(exact, prompt, 30, seed=3, **kw))
    # top_k=1 sampling is greedy decoding
    greedy = generate(model, prompt, 30)
    assert torch.equal(generate(model, prompt, 30, greedy=False, top_k=1, seed=0), greedy)


def test_bad_arguments_are_named(model: torch.nn.Module, prompt: torch.Tensor) -> None:
    with pytest.raises(SNLPConfigError, match="prompt_ids"):
        generate(model, prompt.float(), 4)
    with pytest.raises(SNLPConfigError, match="max_new_tokens"):
        generate(model, prompt, -1)
    with pytest.raises(SNLPConfigError, match="temperature"):
        generate(model, prompt, 4, greedy=False, temperature=0.0)
    with pytest.raises(SNLPConfigError, match="top_k"):
        generate(model, prompt, 4, greedy=False, top_k=0)
    with pytest.raises(SNLPConfigError, match="max_len"):
        generate(model, prompt, 300)  # beyond the model's 256 positions
    dec = Decoder(model, batch=1, max_len=16)
    with pytest.raises(SNLPConfigError, match="exceeds the cache length 16"):
        generate(dec, prompt, 10)
    with pytest.raises(SNLPConfigError, match="batch 1"):
        generate(dec, prompt.repeat(2, 1), 2)
    with pytest.raises(SNLPConfigError, match="carries its own config"):
        generate(dec, prompt, 2, SNLPConfig(iterations=2))
    with pytest.raises(SNLPConfigError, match="prefill"):
        Decoder(model, batch=1, max_len=16, prefill="parallel")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="forward_cached"):
        generate(torch.nn.Linear(2, 2), prompt, 2)


def test_generate_is_exported_at_top_level() -> None:
    assert snlp_compile.generate is generate


def test_generate_stays_the_function_after_importing_the_decoding_module() -> None:
    """In a fresh process without torch imported first (the package's lazy names): importing the
    module that defines Decoder leaves ``snlp_compile.generate`` the function."""
    import subprocess
    import sys

    code = "import snlp_compile.decoding, snlp_compile; print(callable(snlp_compile.generate))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
