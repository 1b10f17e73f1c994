"""The rewritten model's call convention (issue 22): what the captured graph accepts, and clear
errors for what it does not.

torch.export's module accepts only the example's exact call: the same positional arguments, the
same keywords (``fast(ids)`` after a capture with ``use_cache=False`` raised "kwarg keyword
mismatch") and, at sizes the example fixed (export specialises an example size of 0 or 1, e.g. a
batch of 1), the same sizes ("Guard failed: input_ids.size()[0] == 1"). The rewritten model
accepts, before its graph runs,

* positional parameters passed by keyword (``fast(input_ids=ids)``), moved into place;
* non-tensor keywords of the example left out (``use_cache``): filled in with the captured value;

and refuses with an ``SNLPUsageError`` naming the argument a non-tensor keyword with another value
than the captured one, a keyword the capture did not see, a tensor argument left out, a size that
the example fixed, and a tensor of another rank than the example's, which would otherwise fail deep
inside the graph (a reshape's error under FX's printed traceback). Another dtype is left to the
graph: an attention mask captured as int64 may be passed as bool or float, as the model allows.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .errors import SNLPUsageError

_META = "snlp_call_convention"


@dataclass
class CallConvention:
    positional: list[str]  # the forward's parameter names the example passed positionally
    keywords: list[str]  # the example's keywords
    fixed: dict[str, Any]  # non-tensor keywords and their captured values (use_cache=False)
    static: dict[tuple[str, int], int] = field(default_factory=dict)  # (argument, dim) -> fixed size
    ranks: dict[str, int] = field(default_factory=dict)  # tensor argument -> the example's rank


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def record(
    gm: fx.GraphModule, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: bool
) -> None:
    """Note the example's call convention on ``gm`` (transform()'s result)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    positional = named[: len(args)] if len(named) >= len(args) else []
    fixed = {k: v for k, v in kwargs.items() if not _has_tensor(v)}
    static: dict[tuple[str, int], int] = {}
    examples = list(zip(positional, args)) + list(kwargs.items())
    if dynamic:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        vals = [n.meta.get("val") for n in placeholders]
        tensors = [(name, v) for name, v in examples if isinstance(v, torch.Tensor)]
        # the user inputs are the placeholders in call order (parameters are attributes)
        if len(tensors) == len([v for v in vals if isinstance(v, torch.Tensor)]):
            for (name, _), val in zip(tensors, [v for v in vals if isinstance(v, torch.Tensor)]):
                for d, s in enumerate(val.shape):
                    if isinstance(s, int) and s <= 1:
                        static[(name, d)] = s
    ranks = {name: v.dim() for name, v in examples if isinstance(v, torch.Tensor)}
    gm.meta[_META] = CallConvention(positional, list(kwargs), fixed, static, ranks)


def _pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    conv: CallConvention | None = getattr(module, "meta", {}).get(_META)
    if conv is None:
        return None
    given, kwargs = list(args), dict(kwargs)
    for i, name in enumerate(conv.positional):
        if i >= len(given) and name in kwargs:
            given.append(kwargs.pop(name))
    if len(given) != len(conv.positional) and conv.positional:
        raise SNLPUsageError(
            f"the rewritten model takes {len(conv.positional)} positional argument(s) "
            f"({', '.join(conv.positional)}), as in the example it was captured with; got {len(given)}"
        )
    for name, value in kwargs.items():
        if name not in conv.keywords:
            raise SNLPUsageError(
                f"the rewritten model was captured without the keyword argument '{name}'; transform() "
                f"again with it in example_kwargs to pass it"
            )
        if name in conv.fixed and not _same(value, conv.fixed[name]):
            raise SNLPUsageError(
                f"the rewritten model was captured with {name}={conv.fixed[name]!r} and computes that "
                f"case only; got {name}={value!r}: transform() again with example_kwargs "
                f"{{{name!r}: {value!r}}} for that"
            )
    for name in conv.keywords:
        if name not in kwargs:
            if name not in conv.fixed:
                raise SNLPUsageError(
                    f"the rewritten model was captured with the tensor argument '{name}' and needs it"
                )
            kwargs[name] = conv.fixed[name]
    values = dict(zip(conv.positional, given)) | kwargs
    for name, rank in conv.ranks.items():
        value = values.get(name)
        if isinstance(value, torch.Tensor) and value.dim() != rank:
            raise SNLPUsageError(
                f"'{name}' has {value.dim()} dims {tuple(value.shape)}; the rewritten model was captured "
                f"with {rank} there and computes that case only"
            )
    for (name, dim), size in conv.static.items():
        value = values.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > dim and value.shape[dim] != size:
            raise SNLPUsageError(
                f"'{name}' has size {value.shape[dim]} in dim {dim}, which the example fixed at {size} "
                f"(torch.export specialises example sizes 0 and 1); transform() with an example of size 2 "
                f"or more there to call it with other sizes"
            )
    return tuple(given), kwargs


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # (an object without a boolean comparison)
        return a is b


def install(gm: torch.nn.Module) -> None:
    """The pre-hook that applies the recorded convention (re-installed on deep copies)."""
    if not any(h is _pre_hook for h in gm._forward_pre_hooks.values()):
        gm.register_forward_pre_hook(_pre_hook, with_kwargs=True, prepend=True)
