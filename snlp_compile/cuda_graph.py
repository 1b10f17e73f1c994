"""One way to capture a CUDA graph, for the speculative decoder and the benchmarks alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from .errors import SNLPConfigError

Out = TypeVar("Out")


@dataclass(frozen=True)
class GraphReplay(Generic[Out]):
    """A captured CUDA graph and the static outputs its replay overwrites; calling it replays the
    graph and returns those outputs (the same tensors every time: copy what must outlive the next
    replay). Holding the graph here keeps it alive as long as the replay is."""

    graph: torch.cuda.CUDAGraph
    outputs: Out

    def __call__(self) -> Out:
        self.graph.replay()
        return self.outputs


def capture(fn: Callable[[], Out], device: torch.device, warmup: int = 3) -> GraphReplay[Out]:
    """Capture ``fn`` (no arguments, reading and writing static buffers) in a CUDA graph.

    ``warmup`` calls run on a side stream first, as ``torch.cuda.graphs`` requires: compiles,
    cuBLAS handles and lazy allocations happen there, not inside the capture."""
    if device.type != "cuda":
        raise SNLPConfigError(f"CUDA graphs need a CUDA device, got {device}")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return GraphReplay(graph, outputs)
