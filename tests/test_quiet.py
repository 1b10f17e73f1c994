"""The torch log lines and warnings the package drops (snlp_compile.quiet): exactly those, only
inside the block, and the logger left as it was."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

from helpers import emitted_log_messages

from snlp_compile.quiet import dropped_log_lines, quiet_onnx_exporter

REGISTRATION = "torch.onnx._internal.exporter._registration"


def _seen(logger: str, block: Any, *messages: str) -> list[str]:
    with emitted_log_messages(logger) as seen, block:
        for m in messages:
            logging.getLogger(logger).warning(m)
    return seen


def test_only_the_named_lines_are_dropped_and_only_inside_the_block() -> None:
    lines = ("torchvision is not installed. Skipping torchvision::nms", "something the user should see")
    assert _seen(REGISTRATION, quiet_onnx_exporter(), *lines) == [lines[1]]
    assert _seen("x.y", dropped_log_lines("x.y", "drop me"), "drop me now", "keep") == ["keep"]
    assert not logging.getLogger(REGISTRATION).filters  # (removed on the way out)
    assert _seen(REGISTRATION, contextlib.nullcontext(), lines[0]) == [lines[0]]


def test_the_exporters_pytree_deprecation_is_silenced_inside_only() -> None:
    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_onnx_exporter():
            warnings.warn(message, FutureWarning, stacklevel=1)
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
        warnings.warn(message, FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another FutureWarning", message]


def test_the_specialisation_line_is_dropped_by_the_exporter_too() -> None:
    line = "dimension inputs['input_ids'].shape[1] 0/1 specialized; Dim.AUTO was specified along with"
    assert _seen("torch._export.non_strict_utils", quiet_onnx_exporter(), line, "other") == ["other"]
