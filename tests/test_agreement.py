"""Draft agreement (train.agreement): the acceptance a speculative decoder can expect from an SNLP
draft, teacher-forced, against the same model's sequential decode step."""

from __future__ import annotations

import pytest
import torch

from snlp_compile import Decoder, SNLPConfig
from snlp_compile.train.agreement import draft_agreement
from snlp_compile.train.decode_eval import DecodeSetting


def test_an_exact_draft_agrees_at_every_token(
    nanochat_f64: torch.nn.Module, token_windows: torch.Tensor
) -> None:
    """K >= the parallel layers: the draft is the sequential function, so every token agrees."""
    model, windows = nanochat_f64, token_windows
    (a,) = draft_agreement(model, windows, [DecodeSetting(4, None, "h0")])
    assert a.greedy == 1.0 and a.sampling == pytest.approx(1.0, abs=1e-9) and a.tokens == 24


def test_a_k1_draft_is_compared_token_by_token(
    nanochat_f64: torch.nn.Module, token_windows: torch.Tensor
) -> None:
    """Expected: a hand-written loop stepping both decoders on the same tokens, comparing argmax and
    summing min(p, q)."""
    model, windows = nanochat_f64, token_windows
    (a,) = draft_agreement(model, windows, [DecodeSetting(1, None, "warm")])
    seq = Decoder(model, None, batch=2, max_len=12)
    draft = Decoder(model, SNLPConfig(iterations=1, init="warm"), batch=2, max_len=12)
    seq.reset()
    draft.reset()
    same = overlap = 0.0
    for t in range(12):
        q = torch.softmax(seq.step(windows[:, t], torch.tensor(t)), -1)
        p = torch.softmax(draft.step(windows[:, t], torch.tensor(t)), -1)
        same += (p.argmax(-1) == q.argmax(-1)).sum().item()
        overlap += torch.minimum(p, q).sum().item()
    assert a.greedy == same / 24 and a.sampling == pytest.approx(overlap / 24, rel=1e-9)
    assert a.sampling < 1 - 1e-6  # (K=1 of all layers is not the sequential function)


def test_bad_input_is_refused_in_one_line(nanochat_f64: torch.nn.Module, token_windows: torch.Tensor) -> None:
    model, windows = nanochat_f64, token_windows
    with pytest.raises(ValueError, match="every setting is a draft"):
        draft_agreement(model, windows, [DecodeSetting(None)])
    with pytest.raises(ValueError, match=r"windows must be \(batch, length >= 2\) token ids, got \(13,\)"):
        draft_agreement(model, windows[0], [DecodeSetting(1)])
