"""Failures turned into reasons (issue 22): explain() never raises, and bad input gets a one-line
error naming what to change instead of a TypeError from deep inside torch.

- ``check_example_kwargs``: ``example_kwargs`` must be a dict of keyword names (SNLPConfigError).
- ``private_copy``: the deep copy transform() works on; a model holding something that cannot be
  copied (a ``threading.Lock``, an open file) is an SNLPRefusal naming the attribute's path.
- ``capture_hint``: what to do about a capture failure (``transformers`` models and their
  DynamicCache: ``example_kwargs={"use_cache": False}``).
- ``capture_warnings``: a model in training mode (captured in eval mode) and forward hooks (run
  on fake tensors during capture, absent from the rewritten model) are warned about.
- ``failed``: an exception as the refusal of an explain() report.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import torch

from .errors import SNLPConfigError, SNLPRefusal
from .report import ExplainReport


def check_example_kwargs(example_kwargs: Any) -> None:
    """SNLPConfigError unless ``example_kwargs`` is None or a dict with str keys."""
    if example_kwargs is None:
        return
    if not isinstance(example_kwargs, dict) or not all(isinstance(k, str) for k in example_kwargs):
        raise SNLPConfigError(
            "example_kwargs must be a dict of the forward's keyword arguments (e.g. {'use_cache': False}) "
            f"or None, got {type(example_kwargs).__name__} {example_kwargs!r:.80}; positional example "
            "inputs go in example_inputs"
        )


def private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(model)``, or an SNLPRefusal naming the attribute that cannot be copied."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        where = _uncopyable(model)
        path, value = where if where is not None else ("", model)
        raise SNLPRefusal(
            f"transform() works on a private copy of the model (the user's model is never modified), and "
            f"'{path or '<root>'}' ({type(value).__name__}) cannot be deep-copied ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}): drop it from the model or give it a "
            "__deepcopy__",
            module_path=path.rsplit(".", 1)[0] if "." in path else "",
        ) from exc


def _uncopyable(model: torch.nn.Module) -> tuple[str, Any] | None:
    """(dotted path, value) of the first plain attribute of a module that deepcopy refuses."""
    internal = {"_parameters", "_buffers", "_modules"}
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if name in internal or isinstance(value, (torch.Tensor, torch.nn.Module, int, float, str, bool)):
                continue
            try:
                copy.deepcopy(value)
            except Exception:
                return (f"{prefix}.{name}" if prefix else name), value
    return None


def capture_warnings(model: torch.nn.Module) -> None:
    """Warn about what the capture silently changes: training mode and forward hooks."""
    if model.training:
        warnings.warn(
            f"{type(model).__name__} is in training mode; transform() captures it in eval mode (dropout "
            "off, running statistics used): call model.eval() first to silence this",
            UserWarning,
            stacklevel=4,
        )
    hooked = [
        name or "<root>" for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks
    ]
    if hooked:
        warnings.warn(
            f"forward hooks on {hooked[:5]}{' ...' if len(hooked) > 5 else ''} run on fake tensors during "
            "capture and are not part of the rewritten model",
            UserWarning,
            stacklevel=4,
        )


def capture_hint(model: Any, example_kwargs: dict[str, Any] | None, errors: str) -> str:
    """What to do about a capture failure, '' when there is nothing specific to say."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return ""
    if "use_cache" in params and "use_cache" not in (example_kwargs or {}):
        why = "its KV cache object (DynamicCache) " if "Cache" in errors else "its KV cache "
        return (
            f"\n  hint: {type(model).__name__} takes use_cache; {why}cannot be captured: pass "
            "example_kwargs={'use_cache': False} (and call the rewritten model with use_cache=False)"
        )
    return ""


def failed(report: ExplainReport, exc: BaseException) -> ExplainReport:
    """``report`` with ``exc`` as its refusal (explain() never raises): the error's type and first
    lines, the pass it came from where known."""
    notes = getattr(exc, "__notes__", None) or []
    passed = next((n for n in notes if n.startswith("(in the '")), None)
    if passed is not None and report.refused_in is None:
        report.refused_in = passed.split("'")[1]
    text = str(exc).strip()
    lines = text.splitlines()
    short = "\n".join(lines[:6]) + (" ..." if len(lines) > 6 else "")
    kind = "" if isinstance(exc, SNLPRefusal) else f"{type(exc).__name__}: "
    report.refusal = kind + (short or "(no message)")
    report.error = exc if isinstance(exc, Exception) else None
    return report
