"""How often an SNLP decode step agrees with the same model's sequential step, token by token.

Speculative decoding (``snlp_compile.speculative``) drafts with the SNLP step and verifies with the
sequential one, so its speed-up is set by the draft's cost and by this agreement: the greedy
acceptance (the two steps' argmax equal) and the acceptance of speculative sampling at temperature
1 (sum over the vocabulary of min(p, q), one minus the total variation). Measured teacher-forced on
held-out text, both steps fed the same tokens and writing their own caches, as ``decode_eval``
measures perplexity: a planning figure that needs no GPU. In real speculative decoding the prefix is
the model's own output, not the text, so the measured acceptance can differ somewhat.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import SNLPConfig
from ..decoding import Decoder
from .decode_eval import DecodeSetting, step_logits


@dataclass(frozen=True)
class Agreement:
    """One draft setting against the sequential step, over ``tokens`` positions."""

    setting: DecodeSetting
    greedy: float  # fraction of positions whose argmax is the sequential step's
    sampling: float  # mean over positions of sum_v min(p_draft, p_sequential)
    tokens: int


def _probabilities(decoder: Decoder, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One cached step at ``pos`` (its K/V written): the next-token distribution (float32 at least)."""
    return torch.softmax(step_logits(decoder, idx, pos), dim=-1)


@torch.no_grad()
def draft_agreement(
    model: nn.Module, windows: torch.Tensor, settings: Iterable[DecodeSetting]
) -> list[Agreement]:
    """Teacher-forced agreement of each draft setting's decode step with ``model``'s sequential
    decode step over ``windows`` (B, T + 1) token ids (the reference models, like
    ``decode_perplexity``). Settings sharing parallel layers, init and fusion share one transform."""
    if windows.dim() != 2 or windows.size(1) < 2:
        raise ValueError(f"windows must be (batch, length >= 2) token ids, got {tuple(windows.shape)}")
    chosen = list(settings)
    if any(s.sequential for s in chosen):
        raise ValueError(
            "draft_agreement: every setting is a draft (iterations set); the sequential step is the reference"
        )
    model = model.eval()
    device = next(model.parameters()).device
    win = windows.to(device)
    b, t_len = win.size(0), win.size(1) - 1
    reference = Decoder(model, None, batch=b, max_len=t_len)
    idx = torch.empty(b, 1, dtype=torch.long, device=device)
    pos = torch.zeros((), dtype=torch.long, device=device)
    results: list[Agreement] = []
    for s in chosen:
        assert s.iterations is not None  # (checked above: every setting is a draft)
        init: Any = s.init  # (DecodeSetting keeps a plain str; SNLPConfig checks it)
        cfg = SNLPConfig(
            iterations=s.iterations, parallel_layers=s.parallel_layers, init=init, fused_layers=s.fused_layers
        )
        draft = Decoder(model, cfg, batch=b, max_len=t_len)
        reference.reset()
        draft.reset()
        greedy = torch.zeros((), dtype=torch.float64, device=device)
        sampling = torch.zeros((), dtype=torch.float64, device=device)
        for t in range(t_len):
            idx.copy_(win[:, t : t + 1])
            pos.fill_(t)
            q = _probabilities(reference, idx, pos)
            p = _probabilities(draft, idx, pos)
            greedy += (p.argmax(-1) == q.argmax(-1)).sum().double()
            sampling += torch.minimum(p, q).sum().double()
        n = b * t_len
        results.append(Agreement(s, float(greedy) / n, float(sampling) / n, n))
        del draft
    return results
