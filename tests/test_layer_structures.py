"""Issue 22, "refused for the wrong reason" and heterogeneous stacks: layer structures that used to
be refused by a mistaken rule are rewritten exactly (checked against the sequential model in
float64 at several sizes), and the ones that cannot be get the right reason.

* a skip path through a reshape round trip (pre-norm OPT: ``(B, T, C) -> (B*T, C) -> (B, T, C)``);
* the unused indices of ``max(dim)`` (GPT-OSS's attention);
* a root ``nn.Sequential`` of blocks, with or without other modules around them;
* container entries that are small ModuleLists the model unpacks, with the residual add in the
  loop and attention and feed-forward as separate entries;
* repeating patterns of layer kinds (three sliding-window layers, then a full one: "SSSL").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snlp_compile
from snlp_compile import SNLPRefusal

C = 16


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(C), Mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class OptLikeBlock(Block):
    """Pre-norm OPT's feed-forward half: the residual goes through ``reshape(-1, C)`` and back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, x.size(-1))
        return (flat + self.mlp(self.norm(flat))).view(shape)


class ScrambledSkip(Block):
    """The skip re-arranges the state (a transpose read back as the original shape): not h + f(h)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape) + self.mlp(self.norm(x))


class MaxShift(Block):
    """GPT-OSS's attention subtracts ``max(dim).values`` and leaves the indices unread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.mlp(self.norm(x))
        return x + torch.softmax(logits - logits.max(dim=-1, keepdim=True).values, dim=-1)


class Windowed(nn.Module):
    """Causal attention over a window of ``window`` tokens (None: all of them). Built with an
    explicit mask (the mask, independent of h, is a layer input, so windowed and full layers have
    the same body) or, for full layers with ``sdpa``, by SDPA's is_causal (another body)."""

    def __init__(self, window: int | None, sdpa: bool = False) -> None:
        super().__init__()
        self.window, self.sdpa = window, sdpa
        self.norm, self.qkv, self.proj = nn.LayerNorm(C), nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        if self.window is None and self.sdpa:
            return x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        t = torch.arange(x.shape[1], device=x.device)
        keep = t[:, None] >= t[None, :]
        if self.window is not None:
            keep = keep & (t[:, None] - t[None, :] < self.window)
        att = (q @ k.transpose(-1, -2) / C**0.5).masked_fill(~keep, float("-inf")).softmax(-1)
        return x + self.proj(att @ v)


class Model(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(C, C), nn.Linear(C, 3)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


class Entries(nn.Module):
    """Each entry a ModuleList [norm, sublayer] the loop unpacks; attention-like and feed-forward
    entries alternate; the residual add is in the loop."""

    def __init__(self, pairs: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(pairs):
            self.layers.append(nn.ModuleList([nn.LayerNorm(C), Windowed(None, sdpa=True)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(C), Mlp()]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, sub in self.layers:
            x = x + sub(norm(x))
        return x


def _exact(model: nn.Module, iterations: int, shapes=((2, 6, C), (3, 4, C))) -> nn.Module:
    torch.manual_seed(0)
    model = model.double().eval()
    fast = snlp_compile.transform(
        model, (torch.randn(*shapes[0], dtype=torch.float64),), iterations=iterations
    )
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(*shape, dtype=torch.float64)
            torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)
    return fast


def test_skip_through_a_reshape_round_trip_is_the_identity() -> None:
    """Pre-norm OPT was refused as "no residual skip path ... through aten.view"."""
    torch.manual_seed(0)
    fast = _exact(Model([OptLikeBlock() for _ in range(4)]), 4)
    assert fast.snlp_report.skip.startswith("identity skip")
    assert len(fast.snlp_report.parallel_layers) == 4


def test_a_skip_that_rearranges_the_state_is_refused() -> None:
    torch.manual_seed(0)
    model = Model([ScrambledSkip() for _ in range(4)]).eval()
    with pytest.raises(
        SNLPRefusal, match=r"layer 'blocks\.3' has a linear skip path that is not a stream mixing"
    ):
        snlp_compile.transform(model, (torch.randn(2, 6, C),), iterations=4)


def test_unread_indices_of_max_are_not_a_reader() -> None:
    """GPT-OSS was refused: "getitem reads max_1, an intermediate value of layer ..."."""
    torch.manual_seed(0)
    fast = _exact(Model([MaxShift() for _ in range(4)]), 4)
    assert len(fast.snlp_report.parallel_layers) == 4


def test_root_sequential_of_blocks() -> None:
    """A root nn.Sequential was refused: "no layer stack found"."""
    torch.manual_seed(0)
    fast = _exact(nn.Sequential(*[Block() for _ in range(4)]), 4)
    assert fast.snlp_report.container == "" and fast.snlp_report.parallel_layers == ["0", "1", "2", "3"]


def test_root_sequential_with_modules_around_the_blocks() -> None:
    """The first and last entries (an input projection and a head) differ from the blocks: the
    first stays sequential before the chain, the last after it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(C, C), *[Block() for _ in range(4)], nn.Linear(C, 3))
    fast = _exact(model, 4)
    report = fast.snlp_report
    assert report.parallel_layers == ["1", "2", "3", "4"]
    assert any("layers 5..5 stay sequential after the chain" in n for n in report.notes), report.notes
    assert any("layers 0..0 stay sequential" in n for n in report.notes), report.notes


def test_unpacked_entries_with_the_residual_in_the_loop() -> None:
    """Was refused: "layers of 'layers.3' seen in the graph are ..." / the wrong container. Each
    layer solved in parallel is an (attention, feed-forward) pair of entries."""
    torch.manual_seed(0)
    fast = _exact(Entries(3), 6)
    report = fast.snlp_report
    assert report.container == "layers" and report.parallel_layers == ["layers.1", "layers.3", "layers.5"]
    assert any("each layer solved in parallel is 2 consecutive entries" in n for n in report.notes)


@pytest.mark.parametrize("sdpa", [False, True], ids=["mask_inputs", "two_bodies"])
def test_sliding_and_full_layers_in_a_repeating_pattern(sdpa: bool) -> None:
    """nanochat's "SSSL": three sliding-window layers, then a full one, twice. With explicit masks
    the masks are layer inputs and all 8 layers share one body (exact at K = 8, as Gemma2); with
    SDPA's is_causal for full layers there are two bodies, and each layer solved in parallel is
    one SSSL group (exact at K = 2)."""
    torch.manual_seed(0)
    pattern = [2, 2, 2, None] * 2
    fast = _exact(
        Model([Windowed(w, sdpa) for w in pattern]), 2 if sdpa else 8, shapes=((2, 7, C), (1, 9, C))
    )
    if sdpa:
        assert fast.snlp_report.parallel_layers == ["blocks.3", "blocks.7"]
        assert any("4 consecutive entries" in n for n in fast.snlp_report.notes)
    else:
        assert fast.snlp_report.parallel_layers == [f"blocks.{i}" for i in range(8)]


def test_a_different_layer_in_the_middle_stays_sequential() -> None:
    """A, A, B, A: the chain is the longest run of matching layers (blocks 0-1); the differing
    layer and the one after it stay sequential after it."""
    torch.manual_seed(0)
    fast = _exact(Model([Block(), Block(), Windowed(None, sdpa=True), Block()]), 2)
    report = fast.snlp_report
    assert report.parallel_layers == ["blocks.0", "blocks.1"]
    assert any("layers 2..3 stay sequential after the chain" in n for n in report.notes), report.notes
