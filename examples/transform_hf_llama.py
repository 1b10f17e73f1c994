"""Rewrite a Hugging Face Llama (random weights, small config: nothing is downloaded) into the
layer-parallel solve, read what the compiler matched, and check the error against the model as
written for every K: K = number of layers is exact.

    python examples/transform_hf_llama.py
"""

from __future__ import annotations

import torch
import transformers

import snlp_compile


def main(layers: int = 6) -> dict[int, float]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    idx = torch.randint(0, 128, (2, 16))
    kwargs = {"use_cache": False}  # the compiler rewrites the full forward; see generate_kv.py for decoding
    print(snlp_compile.explain(model, (idx,), example_kwargs=kwargs))
    with torch.no_grad():
        expected = model(idx, **kwargs).logits
        errors = {}
        for k in range(1, layers + 1):
            fast = snlp_compile.transform(model, (idx,), example_kwargs=kwargs, iterations=k)
            got = fast(idx, **kwargs).logits
            errors[k] = float((got - expected).norm() / expected.norm())
            print(f"K={k}: relative error of the logits {errors[k]:.2e}")
    assert errors[layers] < 1e-5, "K = number of layers must reproduce the model"
    return errors


if __name__ == "__main__":
    main()
