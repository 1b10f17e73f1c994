"""Helpers and tiny models shared by the tests: reference models in float64, tokens, error
measures, decode-step inputs, the sequential decode reference and structural graph equality."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from snlp_compile.models import build_model
from snlp_compile.models.kv import new_cache, write_cache

F64 = torch.float64

StepOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a cached step's (logits, new_k, new_v)


def reference_model(
    name: str, *, sinkhorn_iters: int | None = None, scaled: bool = False, **overrides: object
) -> nn.Module:
    """A registered reference model (``models.build_model``) in float64.

    sinkhorn_iters: fewer Sinkhorn iterations for the mHC models (a faster capture; exactness is
        unaffected). scaled: nanochat's resid_lambdas drawn from U(0.6, 1.4) (generator seed 3),
        so that scaled skips other than 1 are exercised."""
    if sinkhorn_iters is not None and name.startswith("mhc"):
        overrides.setdefault("sinkhorn_iters", sinkhorn_iters)
    model = build_model(name, dtype=F64, **overrides)
    if scaled and name.startswith("nanochat"):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            model.resid_lambdas.copy_(
                0.6 + 0.8 * torch.rand(model.resid_lambdas.shape, generator=g, dtype=F64)
            )
    return model


def tiny_llama(seed: int | None = 0, **overrides: object) -> nn.Module:
    """A random transformers LlamaForCausalLM in eval mode (3 layers, d=32, 4 heads, 2 kv heads,
    vocab 64; ``overrides`` change LlamaConfig fields), its weights drawn after
    ``torch.manual_seed(seed)`` (None: from the global generator as it stands). Skips the test
    where transformers is not installed."""
    transformers = pytest.importorskip("transformers")
    fields: dict[str, object] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    config = transformers.LlamaConfig(**{**fields, **overrides})
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@contextlib.contextmanager
def emitted_log_messages(logger: str) -> Iterator[list[str]]:
    """The messages ``logger`` emits inside the block (after its filters), in order."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield seen
    finally:
        target.removeHandler(handler)


def tokens(model: nn.Module, batch: int = 2, t: int = 9, seed: int = 1) -> torch.Tensor:
    """Token ids (batch, t) for ``model``, from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, t), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all elements."""
    return float((a - b).detach().norm() / b.detach().norm())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, the one number every tolerance in the decode tests is checked on."""
    return float((a - b).detach().abs().max())


def step_inputs(
    model: nn.Module, batch: int = 2, t_max: int = 24, pos: int = 9, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's inputs with a cache holding random (non-zero) keys/values before ``pos``, so a
    step that ignored the cache would not pass; ``seed`` draws from its own generator, else the global one."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    k_cache, v_cache = new_cache(model, batch, t_max)
    k_cache[:, :, :, :pos] = torch.randn(k_cache[:, :, :, :pos].shape, generator=g, dtype=k_cache.dtype)
    v_cache[:, :, :, :pos] = torch.randn(v_cache[:, :, :, :pos].shape, generator=g, dtype=v_cache.dtype)
    idx = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g)
    return idx, torch.tensor(pos), k_cache, v_cache


def prefill_then_decode(
    model: nn.Module, idx: torch.Tensor, prompt: int, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> Iterator[StepOut]:
    """Prefill ``idx[:, :prompt]``, then decode the rest of ``idx`` token by token through
    ``model.forward_cached``, the sequential reference the cached steps are checked against.

    Yields each step's output *before* writing its K/V into the caches (written when the generator is
    resumed), so a test can check a step, or the still-unwritten cache, between steps; consume it to
    the end to have every step written. Run it under ``torch.no_grad()``."""
    spans = [(0, prompt), *((t, t + 1) for t in range(prompt, idx.shape[1]))]
    for start, stop in spans:
        pos = torch.tensor(start)
        out = model.forward_cached(idx[:, start:stop], pos, k_cache, v_cache)
        yield out
        write_cache(k_cache, v_cache, out[1], out[2], pos)


def assert_same_graph(actual: fx.Graph, expected: fx.Graph) -> None:
    """Assert that two graphs compute the same thing the same way (TVM's structural equality):
    a one-to-one map of their nodes with equal ops, targets and non-node arguments, and node
    arguments mapped onto each other. Node names and node order are ignored; placeholders,
    attributes and submodules are compared by target; nodes without users (the output, asserts,
    guards) anchor the match, in order."""
    pairs: dict[fx.Node, fx.Node] = {}
    mapped: set[fx.Node] = set()

    def fail(why: str) -> NoReturn:
        raise AssertionError(f"graphs differ: {why}\n-- actual:\n{actual}\n-- expected:\n{expected}")

    def same_args(a: Any, e: Any, at: fx.Node) -> None:
        if isinstance(a, fx.Node) and isinstance(e, fx.Node):
            match(a, e)
        elif isinstance(a, (tuple, list)) and type(a) is type(e) and len(a) == len(e):
            for x, y in zip(a, e):
                same_args(x, y, at)
        elif isinstance(a, dict) and isinstance(e, dict) and a.keys() == e.keys():
            for k in a:
                same_args(a[k], e[k], at)
        elif type(a) is not type(e) or isinstance(a, (fx.Node, tuple, list, dict)) or a != e:
            # (a node against a constant, containers of other lengths or keys, unequal constants)
            fail(f"{at.name} takes {a!r} where {pairs[at].name} takes {e!r}")

    def match(a: fx.Node, e: fx.Node) -> None:
        if a in pairs:
            if pairs[a] is not e:
                fail(f"{a.name} corresponds to both {pairs[a].name} and {e.name}")
            return
        if e in mapped:
            fail(f"{e.name} corresponds to two nodes, {a.name} among them")
        if a.op != e.op or not (a.target is e.target or a.target == e.target):
            fail(f"{a.name} is {a.op} {a.target} where {e.name} is {e.op} {e.target}")
        pairs[a] = e
        mapped.add(e)
        same_args(a.args, e.args, a)
        same_args(dict(a.kwargs), dict(e.kwargs), a)

    def anchors(g: fx.Graph) -> list[fx.Node]:
        return [n for n in g.nodes if not n.users]

    roots_a, roots_e = anchors(actual), anchors(expected)
    if len(roots_a) != len(roots_e):
        fail(f"{len(roots_a)} nodes without users where {len(roots_e)} are expected")
    for a, e in zip(roots_a, roots_e):
        match(a, e)
    if len(actual.nodes) != len(expected.nodes) or len(pairs) != len(actual.nodes):
        fail(f"{len(actual.nodes)} nodes ({len(pairs)} matched) where {len(expected.nodes)} are expected")
