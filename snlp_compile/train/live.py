"""Running a captured graph with a model's *live* parameters, so training reaches the model itself.

The regulariser (``regulariser.py``) and the SNLP forward (``snlp_forward.py``) both capture the
model once (``api.analyse``), build a graph of their own over the capture, drop the capture's
private copies of the weights and call that graph with the model's current parameters and buffers
(``torch.func.functional_call``): whatever the graph computes from them (per-layer weights stacked
on a layer axis with ``torch.stack``, every call) is differentiable with respect to the model's
own parameters, and a change to the weights is seen at the next call.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx

from ..errors import SNLPRefusal


def live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by their (possibly duplicated) names."""
    live: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    live.update(model.named_buffers(remove_duplicate=False))
    return live


class LiveGraph:
    """``module`` (a graph built over ``captured``, the capture of ``model``) run with the model's
    live tensors. Raises SNLPRefusal when the capture reads a tensor the model does not expose
    under the same name."""

    def __init__(self, model: torch.nn.Module, captured: fx.GraphModule, module: fx.GraphModule) -> None:
        self.model = model
        self.module = module
        live = live_tensors(model)
        names = [n for n, _ in captured.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in captured.named_buffers(remove_duplicate=False)]
        missing = [n for n in names if n not in live]
        if missing:
            raise SNLPRefusal(
                f"the captured graph reads tensors the model does not expose by these names: {missing[:5]}"
            )
        # drop the capture's private copies: the graph reads the live tensors at every call (a
        # tensor whose owner the graph no longer has is not read: it is not passed either)
        self.names: list[str] = []
        for n in names:
            owner_path, _, attr = n.rpartition(".")
            try:
                owner = module.get_submodule(owner_path) if owner_path else module
            except AttributeError:
                continue
            owner._parameters.pop(attr, None)
            owner._buffers.pop(attr, None)
            self.names.append(n)

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        live = live_tensors(self.model)
        return torch.func.functional_call(self.module, {n: live[n] for n in self.names}, args, kwargs)


@contextmanager
def training_capture() -> Iterator[None]:
    """Capture a model that is being trained: the capture's warning that a model in training mode
    is captured in eval mode is for ``transform()`` users, not for the training objectives, whose
    captured graph runs with the live parameters (the project's models have no dropout)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* is in training mode; transform\(\) captures it")
        yield
