"""The emitted graph's matmul and attention count does not grow with the number of parallel layers."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.fx as fx
from conftest import MATMUL_OPS

import snlp_compile
from snlp_compile.models import build_model


def _kind(node: fx.Node) -> str | None:
    if node.op not in ("call_function", "call_method"):
        return None
    name = str(getattr(node.target, "__name__", node.target))
    if "attention" in name:
        return "attention"
    return "matmul" if name.split(".")[0] in MATMUL_OPS else None


def heavy_ops(graph: fx.Graph) -> Counter[str]:
    return Counter(k for n in graph.nodes if (k := _kind(n)))


def exported_ops(module: torch.nn.Module, idx: torch.Tensor) -> Counter[str]:
    ep = torch.export.export(module, (idx,), strict=False)
    counts: Counter[str] = Counter()
    for n in ep.graph.nodes:
        if n.op == "call_function":
            name = str(n.target)
            if "attention" in name:
                counts["attention"] += 1
            elif any(f"aten.{m}." in name for m in MATMUL_OPS):
                counts["matmul"] += 1
    return counts


@pytest.mark.parametrize("family", ["nanochat-tiny", "gpt-tiny"])
def test_counts_independent_of_depth(family: str) -> None:
    idx = torch.randint(0, 200, (1, 8))
    per_depth = {}
    for depth in (4, 16):
        model = build_model(family, n_layer=depth)
        fast = snlp_compile.transform(model, (idx,), iterations=1)
        body = heavy_ops(fast.snlp_solve.layers.graph)
        top = heavy_ops(fast.graph)
        k1 = exported_ops(fast, idx)
        fast.snlp_solve.iterations = 2
        k2 = exported_ops(fast, idx)
        per_iteration = k2 - k1
        per_depth[depth] = (body, top, per_iteration)
        assert body["matmul"] >= 4 and body["attention"] == 1, body
        assert per_iteration == body, (per_iteration, body)
        if depth == 4:
            # the original model's op count grows with depth: the comparison means something
            original = exported_ops(model, idx)
            assert original["matmul"] >= depth * body["matmul"]
    assert per_depth[4] == per_depth[16]
