"""Torch's log lines and warnings that tell a user nothing they can act on, dropped where the
package calls into torch (each use names the lines it drops and says why)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


class _DropLines(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


@contextlib.contextmanager
def dropped_log_lines(logger: str, *fragments: str) -> Iterator[None]:
    """Inside the block, ``logger``'s records containing any of ``fragments`` are not emitted."""
    target, drop = logging.getLogger(logger), _DropLines(fragments)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


@contextlib.contextmanager
def quiet_onnx_exporter() -> Iterator[None]:
    """torch.onnx.export's noise on a machine without torchvision ("torchvision is not installed.
    Skipping torchvision::nms", four lines) and torch's own pytree deprecation inside its copies
    ("isinstance(treespec, LeafSpec) is deprecated"): neither concerns the user's model."""
    with (
        dropped_log_lines("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        yield
