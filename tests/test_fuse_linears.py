"""fuse_shared_input_linears: linears reading one input share one concatenated stacked weight, and
a fused weight made of blocks of an earlier one (the decode step's side-output k/v inside the
solve's q/k/v) is a view of it, so the solve holds every layer weight once."""

from __future__ import annotations

import torch

import snlp_compile
from snlp_compile.ir.plan import SOLVE_NAME
from snlp_compile.models import build_model, model_config
from snlp_compile.models.kv import CachedStep, new_cache

N_LAYERS = model_config("nanochat-tiny").n_layer


def _step(iterations: int) -> tuple[CachedStep, tuple[torch.Tensor, ...], torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = build_model("nanochat-tiny", vocab_size=256).double().eval()
    k, v = new_cache(model, 1, 16)
    k[:, :, :, :9].normal_()
    v[:, :, :, :9].normal_()
    inputs = (torch.randint(0, 256, (1, 1)), torch.tensor(9), k, v)
    step = CachedStep(model)
    return step, inputs, snlp_compile.transform(step, inputs, iterations=iterations)


def test_side_output_weights_are_views_of_the_fused_qkv() -> None:
    step, _, fast = _step(iterations=1)
    solve = fast.get_submodule(SOLVE_NAME)
    qkv = solve.stacked_fused_attn_c_q_attn_c_k_attn_c_v
    kv = solve.stacked_fused_attn_c_k_attn_c_v
    assert kv.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    q_rows = solve.stacked_attn_c_q_weight.shape[1]
    torch.testing.assert_close(kv, qkv[:, q_rows:], rtol=0, atol=0)
    layer_bytes = sum(p.numel() * p.element_size() for p in step.model.transformer.h.parameters())
    held = sum(
        {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in solve.buffers()}.values()
    )
    assert held <= layer_bytes * 1.01  # every layer weight once (plus per-layer scalars)


def test_exact_mode_with_viewed_side_weights_matches_sequential() -> None:
    step, inputs, fast = _step(iterations=N_LAYERS)
    logits, new_k, new_v = step(*inputs)
    got = fast(*inputs)
    for a, b in zip((logits, new_k, new_v), got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_moving_the_solve_keeps_one_copy_of_each_weight() -> None:
    """.to(device)/.cuda() copy every buffer on its own (Module._apply); the solve rebuilds its
    row-block weights as views of the fused weight afterwards, so a moved model still holds each
    weight once and computes the same. (A clone per buffer stands in for the device copy here; a
    captured graph keeps its dtype, so .to(dtype) is not a supported move.)"""
    step, inputs, fast = _step(iterations=N_LAYERS)
    fast._apply(lambda t: t.clone())
    solve = fast.get_submodule(SOLVE_NAME)
    qkv = solve.stacked_fused_attn_c_q_attn_c_k_attn_c_v
    for name in ("attn_c_q_weight", "attn_c_k_weight", "attn_c_v_weight", "fused_attn_c_k_attn_c_v"):
        part = getattr(solve, f"stacked_{name}")
        assert part.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr(), name
    held = sum(
        {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in solve.buffers()}.values()
    )
    layer_bytes = sum(p.numel() * p.element_size() for p in step.model.transformer.h.parameters())
    assert held <= layer_bytes * 1.01
    for a, b in zip(step(*inputs), fast(*inputs)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
