"""The model's own weights made to share storage with what a compiled rewrite reads.

The rewrite works on a private copy of the weights and stacks the layers' weights into new
buffers of the solve (copies). Making each model weight a view of its row (``weight.data =
stacked[i]``), or of the rewritten module's own copy for a weight outside the layers, instead
lets every in-place edit of the weight, ``.data`` edits included, write what the compiled graph
reads: no per-call check of the copies' content is needed for them, only that the weight was not
replaced (another tensor object or storage). A weight is aliased only when that is provably the
whole story: its row is a plain copy of it (``WeightSources.rows``) or the module reads its copy
as it is, nothing else was computed from it at transform time (``WeightSources.folded``), no
other copy of it is kept, and the target has its shape, strides, dtype, device and bytes. Every
other weight keeps the content check."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import SNLPError
from ..ir.plan import WeightSources


@dataclass(frozen=True)
class Alias:
    """Graph input ``position`` (a model weight) now shares the storage of ``target`` of the
    rewritten module: row ``row`` of a stacked buffer, or (row None) the module's own copy of
    the weight, which its graph reads as it is."""

    position: int
    target: str
    row: int | None
    data_ptr: int


@dataclass(frozen=True)
class _Sources:
    """rows: attribute path -> (stacked buffer, row) for the attributes one row copies as it is;
    touched: every attribute a stacked row copies or something was folded from."""

    rows: dict[str, tuple[str, int]]
    touched: frozenset[str]


def _sources(module: torch.nn.Module) -> _Sources:
    """The module's solves' ``WeightSources`` together; a path copied by several rows, or also
    folded into something, is left out of ``rows``."""
    where: dict[str, tuple[str, int]] = {}
    seen: Counter[str] = Counter()
    folded: set[str] = set()
    for prefix, sub in module.named_modules():
        sources = getattr(sub, "weight_sources", None)
        if not isinstance(sources, WeightSources):
            continue
        folded |= sources.folded
        for name, targets in sources.rows.items():
            buffer = f"{prefix}.stacked_{name}" if prefix else f"stacked_{name}"
            if len(targets) != sub.get_buffer(f"stacked_{name}").shape[0]:
                raise SNLPError(
                    f"{buffer}: {len(targets)} source attributes for its rows, stale WeightSources"
                )
            for i, target in enumerate(targets):
                seen[target] += 1
                where[target] = (buffer, i)
    rows = {p: w for p, w in where.items() if seen[p] == 1 and p not in folded}
    return _Sources(rows, frozenset(seen) | frozenset(folded))


def _owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` is all of its storage: making it a view elsewhere unties nothing else."""
    nbytes = t.numel() * t.element_size()
    return t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == nbytes


def alias_weights(
    module: torch.nn.Module,
    weights: Sequence[tuple[int, str]],
    inputs: Sequence[object],
    ours: frozenset[int] = frozenset(),
) -> list[Alias]:
    """Make the model weights among ``inputs`` (``(position, attribute path)`` in ``weights``)
    share the storage of what ``module`` (the rewritten graph) reads for them, where that
    provably keeps the compiled graph reading what the model holds; returns what was aliased.

    A weight copied by one stacked row (and by nothing else the module keeps) becomes a view of
    that row. A parameter the module keeps a copy of at its own path, that no stacked row copies
    and nothing was folded from, shares that copy's storage (a buffer, which the graph may write,
    e.g. a cache, is left checked). Weights sharing a storage are left checked. ``ours``: data pointers of earlier aliases (a weight that is
    one may be aliased again)."""
    sources = _sources(module)
    kept: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    kept.update(module.named_buffers(remove_duplicate=False))
    given = [(p, inputs[p]) for p, _ in weights if isinstance(inputs[p], torch.Tensor)]
    storages = Counter(t.untyped_storage().data_ptr() for _, t in given if isinstance(t, torch.Tensor))
    aliases: list[Alias] = []
    with torch.no_grad():
        for position, path in weights:
            weight = inputs[position]
            if not isinstance(weight, torch.Tensor):
                continue
            if storages[weight.untyped_storage().data_ptr()] > 1 and weight.data_ptr() not in ours:
                continue  # tied to another weight through its storage: aliasing would untie them
            if path in sources.rows and path not in kept:
                buffer, i = sources.rows[path]
                target: torch.Tensor = module.get_buffer(buffer)[i]
                row: int | None = i
            elif isinstance(weight, torch.nn.Parameter) and path in kept and path not in sources.touched:
                target, row = kept[path].detach(), None
            else:
                continue
            if weight.data_ptr() not in ours and not _owns_storage(weight):
                continue
            if _layout(target) != _layout(weight) or not _same_bytes(target, weight):
                continue
            weight.data = target
            aliases.append(
                Alias(position, path if row is None else sources.rows[path][0], row, target.data_ptr())
            )
    return aliases


def _layout(t: torch.Tensor) -> tuple[object, ...]:
    return (t.shape, t.stride(), t.dtype, t.device)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    flat_a = a.reshape(-1).view(torch.uint8) if a.numel() else a.reshape(-1)
    flat_b = b.reshape(-1).view(torch.uint8) if b.numel() else b.reshape(-1)
    return bool(torch.equal(flat_a, flat_b))
