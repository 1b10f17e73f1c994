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


def quiet_specialisation() -> contextlib.AbstractContextManager[None]:
    """torch.export's "dimension ... 0/1 specialized; Dim.AUTO was specified" line: the capture
    note names the static dims, a call at another size gets the call convention's error, and the
    exporters note fixed input dims themselves."""
    return dropped_log_lines("torch._export.non_strict_utils", "specialized; Dim.AUTO was specified")


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """An export for deployment (ONNX, AOTInductor): the specialisation line, and torch's own
    pytree deprecation inside its copies ("isinstance(treespec, LeafSpec) is deprecated")."""
    with quiet_specialisation(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        yield


@contextlib.contextmanager
def quiet_onnx_exporter() -> Iterator[None]:
    """``quiet_export`` and torch.onnx.export's lines on a machine without torchvision
    ("torchvision is not installed. Skipping torchvision::nms", four of them): none concerns the
    user's model."""
    with (
        dropped_log_lines("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
        quiet_export(),
    ):
        yield
