"""Property-based: random residual stacks keep invariants 1 (exact recovery) and 2 (triangular)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import sequential_trace
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import snlp_compile

SUBLAYERS = ["mlp", "attn", "gated", "ln_mlp"]


class Sublayer(nn.Module):
    def __init__(self, kind: str, width: int):
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(width)
        self.a = nn.Linear(width, 2 * width)
        self.b = nn.Linear(2 * width if kind != "attn" else width, width)
        self.c = nn.Linear(width, 2 * width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            return self.b(F.gelu(self.a(F.rms_norm(x, (x.size(-1),)))))
        if self.kind == "ln_mlp":
            return self.b(torch.tanh(self.a(self.norm(x))))
        if self.kind == "gated":
            h = self.norm(x)
            return self.b(F.silu(self.a(h)) * self.c(h))
        q, k = self.a(self.norm(x)).chunk(2, dim=-1)
        att = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), x.unsqueeze(1), is_causal=True)
        return self.b(att.squeeze(1))


class Block(nn.Module):
    def __init__(self, kinds: list[str], width: int, scaled: bool):
        super().__init__()
        self.subs = nn.ModuleList(Sublayer(k, width) for k in kinds)
        self.scale = nn.Parameter(torch.rand(()) * 0.5 + 0.75) if scaled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = self.scale * x
        for sub in self.subs:
            x = x + 0.5 * sub(x)
        return x


class Stack(nn.Module):
    def __init__(self, depth: int, width: int, kinds: list[str], scaled: bool):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Block(kinds, width, scaled) for _ in range(depth))
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


@given(
    depth=st.integers(2, 6),
    width=st.sampled_from([8, 16, 24]),
    kinds=st.lists(st.sampled_from(SUBLAYERS), min_size=1, max_size=3),
    scaled=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_residual_stacks(depth: int, width: int, kinds: list[str], scaled: bool, seed: int) -> None:
    torch.manual_seed(seed)
    model = Stack(depth, width, kinds, scaled).double().eval()
    x = torch.randn(2, 5, width, dtype=torch.float64)
    fast = snlp_compile.transform(model, (x,), iterations=depth)
    assert ("scaled" in fast.snlp_report.skip) == scaled
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)
    expected = sequential_trace(model, list(model.blocks), x)
    for k in range(1, depth + 1):
        with torch.no_grad():
            trace = snlp_compile.solve_trace(fast, x, iterations=k)
        torch.testing.assert_close(trace[:k], expected[:k], rtol=1e-10, atol=1e-10)
