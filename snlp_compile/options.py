"""Lowering options: which kernels the rewritten graphs call, and how. The one place the package
reads the environment.

A transform takes its ``SNLPConfig.lowering``; the environment gives the process defaults
(``ENVIRONMENT``) for transforms without one and for the model as written (the reference models'
decode attention). The switches are on by default; each can be turned off for A/B timing:

``SNLP_GEMV_KERNEL=0``       every batched linear is ``torch.einsum`` (cuBLAS), as on a CPU; this
                             turns every kernel off
``SNLP_ATTENTION_KERNEL=0``  a decode step's attention products (``layer_ops.layer_matmul``) go
                             back to ``torch.matmul`` (the GEMV kernel stays on for the linears)
``SNLP_DECODE_ATTENTION=0``  a decode step's attention stays its ops instead of the fused
                             decode-attention kernel; ``all`` also fuses it in the rewritten
                             (layer-batched) step
``SNLP_PDL=0``               kernels launch without programmatic dependent launch (Hopper+)
``SNLP_LAST_ROW=0``          no last-row solves: a forward's solve returns the whole trace

0, false, off or no turn a switch off. The environment is read once, when the package is
imported (``ENVIRONMENT``, never changed afterwards); ``LoweringOptions`` is validated like
``SNLPConfig``. What a transform's options become in its graph: ``passes.lowering``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from .errors import SNLPConfigError

_OFF = ("0", "false", "off", "no")


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """An on-by-default switch from the environment: 0, false, off or no turn it off."""
    env = os.environ if environ is None else environ
    return env.get(name, "1").strip().lower() not in _OFF


@dataclass(frozen=True)
class LoweringOptions:
    """How a transform's rewritten graph is lowered (see the module docstring for the variables);
    the kernel choices become keyword arguments of the graph's calls (``passes.lowering``).

    gemv_kernel: batched linears with few rows per layer on a GPU use ``torch.ops.snlp.layer_gemv``.
    attention_kernel: the attention products of a decode step also use it.
    decode_attention: one layer's decode attention (one new token) is the fused kernel.
    decode_attention_in_layers: the rewritten step's layer-batched attention too.
    pdl: kernels launch with programmatic dependent launch where the GPU supports it.
    last_row: a forward's solve may correct and return the trace's last row only.
    """

    gemv_kernel: bool = True
    attention_kernel: bool = True
    decode_attention: bool = True
    decode_attention_in_layers: bool = False
    pdl: bool = True
    last_row: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool):
                raise SNLPConfigError(f"LoweringOptions.{f.name} must be a bool, got {value!r}")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> LoweringOptions:
        """The options the ``SNLP_*`` variables of ``environ`` (default: the process's) ask for."""
        env = os.environ if environ is None else environ
        return cls(
            gemv_kernel=env_flag("SNLP_GEMV_KERNEL", env),
            attention_kernel=env_flag("SNLP_ATTENTION_KERNEL", env),
            decode_attention=env_flag("SNLP_DECODE_ATTENTION", env),
            decode_attention_in_layers=env.get("SNLP_DECODE_ATTENTION", "1").strip().lower() == "all",
            pdl=env_flag("SNLP_PDL", env),
            last_row=env_flag("SNLP_LAST_ROW", env),
        )


# read once, at import: the process's defaults
ENVIRONMENT = LoweringOptions.from_environment()
