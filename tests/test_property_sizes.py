"""Property test of the batching rules where sizes coincide (issue 22): batch, sequence length,
heads, head width and model width each drawn equal to the number of layers or not, so that a rule
that found the layer axis by its size (or put it in the wrong place) would mix axes up. Every
rewrite must equal the sequential model (float64) at the example's sizes and at other ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import snlp_compile


class Block(nn.Module):
    """Attention over heads (view/transpose/SDPA), a gate pooled over the batch and expanded back
    (``expand`` adding a leading dim), a per-head scale and a sum over time."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        width = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.head_scale = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.gate = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q * self.head_scale, k, v, is_causal=True)
        y = self.proj(att.transpose(1, 2).reshape(b, t, c))
        pooled = torch.sigmoid(self.gate(y).mean(0))  # (t, c): over the batch
        summed = y.sum(1, keepdim=True) / t  # (b, 1, c): over time
        return x + y * pooled.expand(b, -1, -1) + 0.1 * summed


class Stack(nn.Module):
    def __init__(self, layers: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(heads, head_dim) for _ in range(layers))
        self.head = nn.Linear(heads * head_dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@st.composite
def sizes(draw: st.DrawFn) -> tuple[int, int, int, int, int, int]:
    layers = draw(st.integers(2, 4))
    near = st.sampled_from([layers, layers, 2, 3, 5])  # the layer count half of the time
    batch, seq, heads = draw(near), draw(near), draw(near)
    head_dim = draw(st.sampled_from([layers, 2, 4]))
    # a second call at other sizes: one of batch / seq swapped for the layer count or another value
    other = draw(st.sampled_from([layers, 2, 3, 6]))
    return layers, batch, seq, heads, head_dim, other


@settings(max_examples=12, deadline=None)
@given(sizes(), st.integers(0, 2**16))
def test_batching_rules_where_sizes_coincide(dims: tuple[int, int, int, int, int, int], seed: int) -> None:
    layers, batch, seq, heads, head_dim, other = dims
    torch.manual_seed(seed)
    model = Stack(layers, heads, head_dim).double().eval()
    width = heads * head_dim
    x = torch.randn(batch, seq, width, dtype=torch.float64)
    fast = snlp_compile.transform(model, (x,), iterations=layers)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-9, atol=1e-9)
        # sizes the example fixed (1) stay fixed; the others take the other value
        b2 = batch if batch == 1 else other
        t2 = seq if seq == 1 else max(other - 1, 2)
        y = torch.randn(b2, t2, width, dtype=torch.float64)
        torch.testing.assert_close(fast(y), model(y), rtol=1e-9, atol=1e-9)
