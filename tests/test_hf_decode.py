"""Issue 24 item 1: KV-cached (layer-parallel) decoding of `transformers` causal LMs without user code.

``generate()`` and ``Decoder`` wrap a supported `transformers` model in models.hf_decode's adapter
(its own modules, no weight copies). Shown on tiny seeded float64 configs (3 layers, hidden 32,
vocab 96; weights drawn with std 0.3 so greedy tokens vary): exact mode (K = layers) and the
sequential adapter step equal ``model.generate(do_sample=False)`` over 64 tokens; the adapter's
caches equal the model's DynamicCache; K=1 and K=2 from a warm start run; speculative decoding is
lossless; what the adapter cannot reproduce is refused when it is built, naming the config field.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import snlp_compile
from snlp_compile import SNLPConfig, SNLPRefusal, SNLPUsageError
from snlp_compile.models.hf_decode import HFCachedLM

transformers = pytest.importorskip("transformers")

LAYERS = 3
VOCAB = 96
NEW = 64
_BASE: dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    initializer_range=0.3,
)
_NEOX = {k: v for k, v in _BASE.items() if k != "num_key_value_heads"}
_GPT2 = dict(n_embd=32, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=128, initializer_range=0.3)

_LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=16,
)  # fmt: skip

# family -> (model class, config class, config kwargs): the required five, then the cheap extras
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", _BASE),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _BASE),  # q/k/v biases
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_BASE, sliding_window=96)),  # window > cache
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", _GPT2),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(_NEOX, rotary_pct=0.5)),
    "gpt_neox_sequential": (
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        dict(_NEOX, rotary_pct=0.25, use_parallel_residual=False),
    ),
    # Llama-3.2's RoPE (frequencies rescaled once by the rotary module), scaling active at these lengths
    "llama_rope_llama3": ("LlamaForCausalLM", "LlamaConfig", dict(_BASE, rope_parameters=_LLAMA3_ROPE)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(_BASE, head_dim=16)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(_BASE, partial_rotary_factor=0.5)),
}


def build(family: str, **overrides: Any) -> torch.nn.Module:
    model_cls, config_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        **{**kwargs, **overrides}, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    return getattr(transformers, model_cls)(config).double().eval()


def prompt(batch: int = 1, length: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def hf_greedy(model: torch.nn.Module, ids: torch.Tensor, new: int = NEW) -> torch.Tensor:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new)
    assert out.shape[1] == ids.shape[1] + new
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exact_mode_and_sequential_step_equal_hf_greedy(family: str) -> None:
    model = build(family)
    ids = prompt()
    ref = hf_greedy(model, ids)
    assert len(set(ref[0, ids.shape[1] :].tolist())) > 8  # (a varied sequence, not one repeated token)
    assert torch.equal(snlp_compile.generate(model, ids, NEW), ref)
    exact = snlp_compile.generate(model, ids, NEW, SNLPConfig(iterations=LAYERS))
    assert torch.equal(exact, ref), (exact, ref)


def test_batched_exact_mode_equals_hf_greedy() -> None:
    model = build("qwen2")
    ids = prompt(batch=2)
    ref = hf_greedy(model, ids, 16)
    assert torch.equal(snlp_compile.generate(model, ids, 16, SNLPConfig(iterations=LAYERS)), ref)


@pytest.mark.parametrize("family", ["qwen2", "gpt_neox"])
def test_deferred_kv_exact_mode_equals_hf_greedy(family: str) -> None:
    """SNLPConfig(deferred_kv=True) (the K/V of token t written by step t+1) applies to the
    adapter's step: each layer hands out K (after RoPE) then V, as the deferral pass needs."""
    model = build(family)
    ids = prompt()
    ref = hf_greedy(model, ids, 16)
    cfg = SNLPConfig(iterations=LAYERS, deferred_kv=True)
    assert torch.equal(snlp_compile.generate(model, ids, 16, cfg), ref)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_adapter_caches_equal_the_dynamic_cache(family: str) -> None:
    """After a prefill and 6 decode steps the Decoder's stacked caches hold what the model's own
    DynamicCache holds (keys after RoPE), and the step's logits match the model's."""
    model = build(family)
    ids = prompt()
    dec = snlp_compile.Decoder(model, batch=1, max_len=32)
    pos = torch.zeros((), dtype=torch.long)
    logits = dec.prefill(ids, pos)
    pos += ids.shape[1]
    tokens = [logits.argmax(-1)]
    for _ in range(6):
        logits = dec.step(tokens[-1], pos)
        pos += 1
        tokens.append(logits.argmax(-1))
    seq = torch.cat([ids, torch.stack(tokens[:-1], 1)], dim=1)
    with torch.no_grad():
        out = model(seq, use_cache=True)
    n = seq.shape[1]
    cache = out.past_key_values
    hf_k = torch.stack([layer.keys for layer in cache.layers])
    hf_v = torch.stack([layer.values for layer in cache.layers])
    torch.testing.assert_close(dec.k_cache[:, :, :, :n], hf_k, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dec.v_cache[:, :, :, :n], hf_v, rtol=1e-10, atol=1e-10)
    assert dec.k_cache[:, :, :, n:].abs().sum() == 0
    torch.testing.assert_close(logits, out.logits[:, -1], rtol=1e-10, atol=1e-10)


def test_training_mode_step_is_refused() -> None:
    """The step applies no dropout, so it runs in eval mode only (Decoder and generate() run a
    model given in training mode in eval mode, and leave its modes as they were)."""
    model = build("gpt2", resid_pdrop=0.5).train()
    step = HFCachedLM(model)
    idx = prompt()
    caches = torch.zeros(2, LAYERS, 1, 4, 16, 8, dtype=torch.float64)
    with pytest.raises(SNLPUsageError, match=r"eval mode only"):
        step.forward_cached(idx, torch.tensor(0), caches[0], caches[1])
    ref = hf_greedy(model.eval(), idx, 8)
    assert torch.equal(snlp_compile.generate(model.train(), idx, 8), ref) and model.training


def test_adapter_shares_the_models_parameters() -> None:
    model = build("llama")
    step = HFCachedLM(model)
    ours = {id(p) for p in step.parameters()}
    assert ours == {id(p) for p in model.parameters()}  # every parameter once, none copied
    assert (step.config.n_layer, step.config.n_kv_head, step.config.head_dim) == (LAYERS, 2, 8)


@pytest.mark.parametrize("k", [1, 2])
def test_few_iterations_from_a_warm_start_run(k: int) -> None:
    """K < layers is an approximation: generation runs (the first token, from the sequential
    prefill, is the model's), and one step from the model's own caches gives finite logits near
    the sequential step's (default-scale weights: a model near its trained regime's smoothness)."""
    model = build("llama", initializer_range=0.02)
    ids = prompt()
    ref = hf_greedy(model, ids, 16)
    dec = snlp_compile.Decoder(model, SNLPConfig(iterations=k, init="warm"), batch=1, max_len=24)
    tokens = snlp_compile.generate(dec, ids, 16)
    assert tokens.shape == ref.shape
    assert torch.equal(tokens[:, : ids.shape[1] + 1], ref[:, : ids.shape[1] + 1])
    seq = snlp_compile.Decoder(model, batch=1, max_len=24)
    with torch.no_grad():
        seq.prefill(ref[:, :-1], torch.tensor(0))
        dec.k_cache.copy_(seq.k_cache)
        dec.v_cache.copy_(seq.v_cache)
        pos = torch.tensor(ref.shape[1] - 1)
        want, got = seq.step(ref[:, -1], pos), dec.step(ref[:, -1], pos)
    assert torch.isfinite(got).all()
    rel = float((got - want).norm() / want.norm())
    assert rel < {1: 0.3, 2: 0.05}[k], rel  # (measured 0.12 and 0.007; K = layers is exact)


def test_speculative_decoding_of_a_transformers_model_is_lossless() -> None:
    model = build("qwen2")
    ids = prompt()
    ref = hf_greedy(model, ids, 24)
    tokens, stats = snlp_compile.generate(
        model, ids, 24, speculative=SNLPConfig(iterations=1, init="warm"), block_size=3, return_stats=True
    )
    assert torch.equal(tokens, ref)
    assert stats is not None and stats.rounds > 0 and stats.drafted > 0


# -- refusals: named config field, at construction, never a wrong answer ----------------------------
def _one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_active_sliding_window_is_refused_naming_the_field() -> None:
    model = build("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(SNLPRefusal, match=r"config\.sliding_window=8 is shorter than max_len=16") as err:
        snlp_compile.Decoder(model, batch=1, max_len=16)
    _one_line(err)
    # within the window the sliding layers attend to everything: accepted and exact
    ids = prompt(length=3)
    assert torch.equal(
        snlp_compile.generate(model, ids, 5, SNLPConfig(iterations=LAYERS)), hf_greedy(model, ids, 5)
    )


def test_mistral_window_counts_whatever_the_layer_types() -> None:
    """Mistral's attention slides in every layer when sliding_window is set (it does not read
    layer_types): a window shorter than max_len is refused even with layer_types saying "full"."""
    model = build("mistral", sliding_window=8, layer_types=["full_attention"] * LAYERS)
    with pytest.raises(SNLPRefusal, match=r"config\.sliding_window=8 is shorter than max_len=9"):
        snlp_compile.Decoder(model, batch=1, max_len=9)
    assert HFCachedLM(model).config.block_size == 8  # (without max_len: the window bounds the positions)


def test_dynamic_rope_is_refused_naming_the_field() -> None:
    model = build("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(SNLPRefusal, match=r"config\.rope_parameters\['rope_type'\]='dynamic'") as err:
        snlp_compile.generate(model, prompt(), 4)
    _one_line(err)


def test_gpt2_attention_scale_variants_are_refused() -> None:
    with pytest.raises(SNLPRefusal, match=r"config\.scale_attn_by_inverse_layer_idx=True"):
        HFCachedLM(build("gpt2", scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(SNLPRefusal, match=r"config\.scale_attn_weights=False"):
        HFCachedLM(build("gpt2", scale_attn_weights=False))


def test_soft_capping_and_unknown_families_are_refused() -> None:
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(**dict(_BASE, head_dim=8))
    with pytest.raises(SNLPRefusal, match=r"config\.final_logit_softcapping=30\.0") as err:
        snlp_compile.Decoder(transformers.Gemma2ForCausalLM(cfg), batch=1, max_len=8)
    _one_line(err)
    opt_config = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=VOCAB
    )
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(**opt_config, word_embed_proj_dim=32))
    with pytest.raises(SNLPRefusal, match=r"config\.model_type='opt' is not a family"):
        snlp_compile.generate(opt, prompt(), 4)


def test_base_model_without_head_is_refused() -> None:
    model = build("llama")
    with pytest.raises(SNLPRefusal, match="LlamaModel is not a transformers causal LM"):
        HFCachedLM(model.model)
