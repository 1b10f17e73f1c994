"""Perplexity of the KV-cached decode step (train.decode_eval): the quality of the path that is timed."""

from __future__ import annotations

import math

import pytest
import torch

from snlp_compile import SNLPConfig, transform
from snlp_compile.train.decode_eval import DecodeSetting, decode_perplexity, settings_grid
from snlp_compile.train.evaluate import perplexity


def test_sequential_and_exact_decode_equal_the_full_sequence(nanochat_f64, token_windows) -> None:
    full = perplexity(nanochat_f64, token_windows, 2, "cpu", 1.0)
    grid = [
        DecodeSetting(None),
        DecodeSetting(4, None, "h0"),
        DecodeSetting(4, None, "warm"),
        DecodeSetting(2, 2),
    ]
    results = decode_perplexity(nanochat_f64, token_windows, grid, bytes_per_token=1.0)
    assert [r.setting for r in results] == grid
    for r in results:  # K >= parallel layers: exact, whatever the init
        assert r.ce == pytest.approx(full["ce"], rel=1e-6), (
            r.setting.label()
        )  # (perplexity() casts logits to float32)
        assert r.tokens == token_windows.numel() - token_windows.size(0)
        assert not r.graphs  # (CPU: the eager loop)


def test_decode_ppl_at_small_k_is_the_teacher_forced_decode_step(nanochat_f64, token_windows) -> None:
    """K=1 differs from sequential, and equals a hand-written token-by-token loop over the
    transformed step (past K/V from each token's corrected trace, as Decoder writes them)."""
    from snlp_compile import Decoder

    (res,) = decode_perplexity(
        nanochat_f64, token_windows, [DecodeSetting(1, None, "warm")], bytes_per_token=1.0
    )
    dec = Decoder(nanochat_f64, SNLPConfig(iterations=1, init="warm"), batch=2, max_len=12)
    dec.reset()
    total = 0.0
    for t in range(12):
        logits = dec.step(token_windows[:, t], torch.tensor(t))
        total += torch.nn.functional.cross_entropy(logits, token_windows[:, t + 1], reduction="sum").item()
    assert res.ce == pytest.approx(total / 24, rel=1e-12)
    seq = perplexity(nanochat_f64, token_windows, 2, "cpu", 1.0)["ce"]
    assert abs(res.ce - seq) > 1e-6
    # the full-sequence forward at K=1 is a different computation (K/V from the current iterate)
    fast = transform(nanochat_f64, (token_windows[:, :-1],), iterations=1)
    assert perplexity(fast, token_windows, 2, "cpu", 1.0)["ce"] != pytest.approx(res.ce, rel=1e-9)
    assert math.isclose(res.ppl, math.exp(res.ce))


def test_settings_grid_and_bad_windows(nanochat_f64) -> None:
    grid = settings_grid([None, 2], [1, 2], ["h0", "warm"])
    assert grid[0].sequential and len(grid) == 1 + 2 * 2 * 2
    assert grid[1].label() == "par=all K=1 init=h0"
    with pytest.raises(ValueError, match="windows must be"):
        decode_perplexity(nanochat_f64, torch.zeros(3, dtype=torch.long), grid, bytes_per_token=1.0)


def test_fused_decode_path_is_the_fused_function_token_by_token(nanochat_f64, token_windows) -> None:
    """Wide layers (fused_layers=2): every token, the first included, goes through the fused solve
    (no sequential prefill of the unfused model), so at exact K (the number of wide layers) the
    decode-path perplexity is the fused full-sequence forward's; K=1 differs from it."""
    wide = nanochat_f64.config.n_layer // 2
    grid = [DecodeSetting(1, None, "h0", fused_layers=2), DecodeSetting(wide, None, "h0", fused_layers=2)]
    k1, exact = decode_perplexity(nanochat_f64, token_windows, grid, bytes_per_token=1.0)
    assert exact.setting.label() == f"par=all K={wide} init=h0 fused=2"
    assert exact.row()["fused_layers"] == 2
    fused = transform(nanochat_f64, (token_windows[:, :-1],), iterations=wide, fused_layers=2)
    want = perplexity(fused, token_windows, 2, "cpu", 1.0)["ce"]
    assert exact.ce == pytest.approx(want, rel=1e-6)
    assert (
        abs(exact.ce - perplexity(nanochat_f64, token_windows, 2, "cpu", 1.0)["ce"]) > 1e-6
    )  # (another function)
    assert abs(k1.ce - exact.ce) > 1e-6
    with pytest.raises(ValueError, match="fused_layers needs iterations"):
        DecodeSetting(None, fused_layers=2)
