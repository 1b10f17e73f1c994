"""The model's own weights made views of the stacked weights a compiled solve reads.

The rewrite stacks the layers' weights into new buffers of the solve (copies). Making each
model weight a view of its row (``weight.data = stacked[i]``) instead lets every in-place edit of
the weight, ``.data`` edits included, write what the compiled graph reads: no per-call check of
the copies' content is needed for them, only that the weight was not replaced (another tensor
object or storage). A weight is aliased only when that is provably the whole story: its row is a
plain copy of it (``WeightSources.rows``), nothing else was computed from it at transform time
(``WeightSources.folded``), the rewritten module keeps no other copy of it, and its row has its
shape, strides, dtype, device and bytes. Every other weight keeps the content check.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import SNLPError
from ..ir.plan import WeightSources


@dataclass(frozen=True)
class Alias:
    """Graph input ``position`` (a model weight) is now a view of the solve's ``buffer`` row."""

    position: int
    buffer: str
    row: int
    data_ptr: int


def _rows(module: torch.nn.Module) -> dict[str, tuple[str, int]]:
    """attribute path -> (stacked buffer, row) over the module's solves; a path read by several
    rows (or folded into something) is left out, as are the solves' folded attributes."""
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
    return {p: w for p, w in where.items() if seen[p] == 1 and p not in folded}


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
    views of the rows of ``module``'s stacked buffers that copy them, where that provably keeps
    the compiled graph reading what the model holds; returns what was aliased.

    ``ours``: data pointers of earlier aliases (a weight that is one may be aliased again)."""
    rows = _rows(module)
    kept = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    kept |= {name for name, _ in module.named_buffers(remove_duplicate=False)}
    aliases: list[Alias] = []
    with torch.no_grad():
        for position, path in weights:
            weight = inputs[position]
            if path not in rows or path in kept or not isinstance(weight, torch.Tensor):
                continue
            buffer, i = rows[path]
            row = module.get_buffer(buffer)[i]
            if weight.data_ptr() not in ours and not _owns_storage(weight):
                continue
            same = (row.shape, row.stride(), row.dtype, row.device) == (
                weight.shape,
                weight.stride(),
                weight.dtype,
                weight.device,
            )
            if not same or not _same_bytes(row, weight):
                continue
            weight.data = row
            aliases.append(Alias(position, buffer, i, row.data_ptr()))
    return aliases


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    flat_a = a.reshape(-1).view(torch.uint8) if a.numel() else a.reshape(-1)
    flat_b = b.reshape(-1).view(torch.uint8) if b.numel() else b.reshape(-1)
    return bool(torch.equal(flat_a, flat_b))
