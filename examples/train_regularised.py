"""Train with the SNLP-aware regulariser: the loss adds the error of the K=1 layer-parallel trace
against the sequential one, so the trained model converges in one or two iterations. A few steps
on synthetic token streams (copy tasks) show the term falling; `snlp-compile train` runs the real
loop on text.

    python examples/train_regularised.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from snlp_compile.models import build_model
from snlp_compile.train.regulariser import RegulariserConfig, SNLPRegulariser


def main(steps: int = 30, weight: float = 1.0) -> list[float]:
    torch.manual_seed(0)
    model = build_model("nanochat-tiny")
    vocab = model.config.vocab_size
    example = torch.randint(0, vocab, (2, 16))
    reg = SNLPRegulariser(model, (example,), RegulariserConfig(weight=weight))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    terms = []
    for step in range(steps):
        half = torch.randint(0, vocab, (8, 16))
        x = torch.cat([half, half], dim=1)[:, :-1]  # the second half repeats the first
        y = torch.cat([half, half], dim=1)[:, 1:]
        model.train()
        out = reg(x)
        ce = F.cross_entropy(out.output.flatten(0, 1).float(), y.flatten())
        loss = ce + reg.config.weight_at(step) * out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        terms.append(float(out.loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  cross-entropy {float(ce.detach()):.3f}  K=1 trace error {terms[-1]:.3f}")
    return terms


if __name__ == "__main__":
    main()
