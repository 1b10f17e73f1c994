"""Issue 22, "What must be shown" 2 and 4: a zoo of `transformers` families with tiny random configs.

Each family is built from a seeded tiny config (hidden 32, 3 layers, 2-4 heads, vocab 96, float32,
eager attention, nothing downloaded) and passed to ``transform(..., iterations=layers)`` (exact mode).
The outcome must be one of

* rewritten: the rewritten model agrees with the model's own output to relative error <= 1e-5, and
  is called once more on a second input of the same shape, again exact; or
* refused at transform time by ``SNLPRefusal`` / ``SNLPCaptureError`` with a non-empty one-line reason.

Anything else (a wrong answer, another exception type, a crash on the second call) fails. ``EXPECTED``
says which of the two each family gets today, so a regression in either direction fails too.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import torch

import snlp_compile
from snlp_compile import SNLPCaptureError, SNLPRefusal

transformers = pytest.importorskip("transformers")

LAYERS = 3
VOCAB = 96
T = 8
BATCH = 2
RTOL = 1e-5

# common tiny sizes; a family's own entry overrides or renames them
_BASE: dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
_GQA = dict(_BASE, num_key_value_heads=2)

# family -> (model class, config class, config kwargs)

# OPT's tiny config; the pre- and post-norm variants differ in do_layer_norm_before alone
_OPT = dict(
    hidden_size=32,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    ffn_dim=64,
    word_embed_proj_dim=32,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
# the BART family's (its ForCausalLM classes build the decoder alone)
_BART = dict(
    d_model=32,
    decoder_layers=LAYERS,
    encoder_layers=LAYERS,
    decoder_attention_heads=4,
    encoder_attention_heads=4,
    decoder_ffn_dim=64,
    encoder_ffn_dim=64,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)

FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", _GQA),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _GQA),
    # layer 0 full attention, layers 1-2 a window of 4 < T (issue 22: accepted, then crashed at call time)
    "qwen2_sliding": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(_GQA, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_GQA, head_dim=8)),
    "mistral": ("MistralForCausalLM", "MistralConfig", _GQA),
    "phi": ("PhiForCausalLM", "PhiConfig", _BASE),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", _GQA),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(_GQA, head_dim=8)),
    # sliding-window layers (window 4 < T) alternating with full ones: two mask types in one stack
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(_GQA, head_dim=8, sliding_window=4)),
    "gemma3_text": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        dict(
            _GQA,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(n_embd=32, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64),
    ),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(_BASE, new_decoder_architecture=False)),
    "gptj": (
        "GPTJForCausalLM",
        "GPTJConfig",
        dict(n_embd=32, n_layer=LAYERS, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64),
    ),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", _BASE),
    "bloom": (
        "BloomForCausalLM",
        "BloomConfig",
        dict(hidden_size=32, n_layer=LAYERS, n_head=4, vocab_size=VOCAB),
    ),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", _GQA),
    "olmo": ("OlmoForCausalLM", "OlmoConfig", _GQA),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", _GQA),
    "cohere": ("CohereForCausalLM", "CohereConfig", _GQA),
    "mixtral": (
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(
            _GQA,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
    ),
    "t5_encoder": (
        "T5EncoderModel",
        "T5Config",
        dict(d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=4, vocab_size=VOCAB),
    ),
    "mbart": ("MBartForCausalLM", "MBartConfig", _BART),
    "granite": ("GraniteForCausalLM", "GraniteConfig", _GQA),
    "mpt": (
        "MptForCausalLM",
        "MptConfig",
        dict(d_model=32, n_layers=LAYERS, n_heads=4, vocab_size=VOCAB, max_seq_len=64),
    ),
    "codegen": (
        "CodeGenForCausalLM",
        "CodeGenConfig",
        dict(n_embd=32, n_layer=LAYERS, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64, n_ctx=64),
    ),
    "opt_post_norm": ("OPTForCausalLM", "OPTConfig", dict(_OPT, do_layer_norm_before=False)),
    "opt_pre_norm": ("OPTForCausalLM", "OPTConfig", dict(_OPT, do_layer_norm_before=True)),
    "bert": ("BertModel", "BertConfig", _BASE),
    "roberta": ("RobertaModel", "RobertaConfig", dict(_BASE, max_position_embeddings=72)),
    "bart": ("BartForCausalLM", "BartConfig", _BART),
    "gpt_neo": (
        "GPTNeoForCausalLM",
        "GPTNeoConfig",
        dict(
            hidden_size=32,
            num_layers=LAYERS,
            num_heads=4,
            attention_types=[[["global"], LAYERS]],
            vocab_size=VOCAB,
            max_position_embeddings=64,
        ),
    ),
    "persimmon": ("PersimmonForCausalLM", "PersimmonConfig", _BASE),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", _GQA),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(_GQA, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    ),
    "glm": ("GlmForCausalLM", "GlmConfig", dict(_GQA, head_dim=8)),
    "nemotron": ("NemotronForCausalLM", "NemotronConfig", dict(_GQA, head_dim=8)),
    "gpt_bigcode": (
        "GPTBigCodeForCausalLM",
        "GPTBigCodeConfig",
        dict(n_embd=32, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64),
    ),
    "xglm": (
        "XGLMForCausalLM",
        "XGLMConfig",
        dict(
            d_model=32,
            num_layers=LAYERS,
            attention_heads=4,
            ffn_dim=64,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        ),
    ),
    "biogpt": ("BioGptForCausalLM", "BioGptConfig", _BASE),
    # MoE with attention sinks; its attention reads only the values of ``max(dim)`` (issue 22: refused
    # because the unused indices "read an intermediate value"); sliding and full layers alternate
    "gpt_oss": (
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(
            _GQA,
            head_dim=8,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    # MLA attention writing k into a ``new_empty`` buffer in place (issue 22: refused for the wrong
    # reason); layer 0 is dense, layers 1-2 MoE: the first stays sequential
    "deepseek_v3": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            _BASE,
            num_key_value_heads=4,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
    ),
}

# what each family gets today: "rewritten", or ("refused", a regex the reason must match)
EXPECTED: dict[str, Any] = {name: "rewritten" for name in FAMILIES}
EXPECTED.update(
    {
        # post-norm (norm after the residual add): no h + f(h) form, refused by design
        "bert": ("refused", r"layer 'encoder\.layer\.\d' has no residual skip path.*post-norm"),
        "roberta": ("refused", r"layer 'encoder\.layer\.\d' has no residual skip path.*post-norm"),
        "bart": ("refused", r"layer 'model\.decoder\.layers\.\d' has no residual skip path.*post-norm"),
        "opt_post_norm": (
            "refused",
            r"layer 'model\.decoder\.layers\.\d' has no residual skip path.*post-norm",
        ),
    }
)


def _build(name: str) -> torch.nn.Module:
    model_cls, config_cls, kwargs = FAMILIES[name]
    if not hasattr(transformers, model_cls) or not hasattr(transformers, config_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}/{config_cls}")
    # pad_token_id 0: some configs default to a pad id outside the tiny vocabulary
    config = getattr(transformers, config_cls)(**{"pad_token_id": 0, **kwargs})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


def _out(result: Any) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    if hasattr(result, "logits") and result.logits is not None:
        return result.logits
    if hasattr(result, "last_hidden_state"):
        return result.last_hidden_state
    return result[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_zoo_family(name: str) -> None:
    model = _build(name)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, T), generator=gen)
    ids2 = torch.randint(0, VOCAB, (BATCH, T), generator=gen)
    kwargs = {"use_cache": False}
    with torch.no_grad():
        ref = _out(model(ids, **kwargs))
        ref2 = _out(model(ids2, **kwargs))
    t0 = time.perf_counter()
    try:
        fast = snlp_compile.transform(model, (ids,), example_kwargs=kwargs, iterations=LAYERS)
    except (SNLPRefusal, SNLPCaptureError) as e:
        reason = str(e).strip()
        print(
            f"ZOO {name}: refused ({time.perf_counter() - t0:.1f}s): {reason.splitlines()[0] if reason else ''}"
        )
        assert reason, f"{name}: refused with an empty reason"
        assert "\n" not in reason, f"{name}: the reason is not one line: {reason!r}"
        expected = EXPECTED[name]
        assert expected != "rewritten", f"{name}: expected to be rewritten, refused: {reason}"
        assert re_search(expected[1], reason), f"{name}: refused for another reason: {reason}"
        return
    with torch.no_grad():
        err = _rel(_out(fast(ids, **kwargs)), ref)
        err2 = _rel(_out(fast(ids2, **kwargs)), ref2)
    print(
        f"ZOO {name}: rewritten ({time.perf_counter() - t0:.1f}s): rel err {err:.1e}, second input {err2:.1e}"
    )
    assert err <= RTOL, f"{name}: rewritten but wrong, relative error {err:.2e}"
    assert err2 <= RTOL, f"{name}: rewritten but wrong on a second input, relative error {err2:.2e}"
    assert EXPECTED[name] == "rewritten", f"{name}: expected a refusal ({EXPECTED[name][1]}), was rewritten"


def re_search(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.S) is not None
